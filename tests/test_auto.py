"""Automatic stacks: ``highway_grad`` on models nobody rewrote (Flax's own modules, hand-written scans).

Every case is checked in float64 against independent references:

- ``k >= L`` equals ``jax.grad`` of the unmodified model;
- ``k = 0`` differs from it and equals the residual-path gradient, computed by ``jax.grad`` of a
  *detached* copy of the step written in the test (the block reads ``stop_gradient`` of the carry,
  the residual path is kept), which is what ``k = 0`` means;
- ``find_stacks`` reports the scan with the residual kinds the rule gives;
- the gradient's jaxpr holds no loop of length ``L`` besides the forward.
"""

import dataclasses
import functools
import importlib.util
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hbpjax
from helpers import assert_trees_close, fixture_over_cases, loops, model_grad, source_file, tree_rel_error

sg = jax.lax.stop_gradient
T, D_IN, H, B = 7, 3, 4, 2  # T is distinct from every other size and from the sweep counts used


def _xs(key=1):
    return jax.random.normal(jax.random.key(key), (B, T, D_IN), jnp.float64)


def _weights():
    return jnp.arange(1.0, T + 1, dtype=jnp.float64)[:, None]  # a different weight per step


# ------------------------------------------------------------------------------- the cases


@dataclasses.dataclass
class Case:
    """``loss(*args)`` is the model as its author wrote it; ``detached`` computes the same values with
    the block's reads of the carry detached (``None`` where only ``k >= L`` is checked): a function of
    the same arguments, or for a module case ``(loss, detached_module)``. Every argument is
    differentiated; for a module case (``module=True``) the ``nnx.Param``s of ``args[0]``."""

    loss: Callable
    args: tuple
    detached: Any
    kinds: tuple
    L: int
    module: bool = False

    def grad(self, k=None, **options):
        """``k`` sweeps (``None``: exact ``jax.grad``/``nnx.grad``) of the parameters (``args[0]``)
        and, for a function case, of every other argument."""
        return model_grad(self.loss, self.args, k, module=self.module, **options)

    def detached_grad(self):
        if self.module:
            loss, module = self.detached
            return nnx.grad(loss)(nnx.clone(module), *self.args[1:])
        return jax.grad(self.detached, tuple(range(len(self.args))))(*self.args)


def _nnx_rnn(cell, detached_step):
    graphdef, params, rest = nnx.split(nnx.RNN(cell), nnx.Param, ...)
    xs = _xs()
    zeros = jnp.zeros((B, H), jnp.float64)
    init = zeros if isinstance(cell, nnx.GRUCell) else (zeros, zeros)  # no carry RNG to advance

    def loss(params, xs):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, params, rest)(xs, initial_carry=init)) * _weights())

    def detached(params, xs):
        cell = nnx.merge(graphdef, params, rest).cell
        carry, ys = init, []
        for t in range(T):
            carry, y = detached_step(cell, carry, xs[:, t])
            ys.append(y)
        return jnp.sum(jnp.sin(jnp.stack(ys, 1)) * _weights())

    return loss, (params, xs), detached


def _gru_detached(cell, h, x):
    xi_r, xi_z, xi_n = jnp.split(cell.dense_i(x), 3, axis=-1)
    hh_r, hh_z, hh_n = jnp.split(cell.dense_h(sg(h)), 3, axis=-1)
    r, z = jax.nn.sigmoid(xi_r + hh_r), jax.nn.sigmoid(xi_z + hh_z)
    n = jnp.tanh(xi_n + r * hh_n)
    h = (1.0 - z) * n + z * h  # K = z: the residual path keeps h
    return h, h


def _lstm_detached(gates):
    def step(cell, carry, x):
        c, h = carry
        i, f, g, o = gates(cell, x, sg(h))
        i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
        c_new = f * c + i * g  # K_c = f
        h_new = o * jnp.tanh(f * sg(c) + i * g)  # h' reads c' (another leaf): all block, K_h = 0
        return (c_new, h_new), h_new

    return step


def _optimized_lstm_gates(cell, x, h):
    return jnp.split(cell.dense_i(x) + cell.dense_h(h), 4, axis=-1)


def _lstm_gates(cell, x, h):
    return (cell.ii(x) + cell.hi(h), cell.if_(x) + cell.hf(h), cell.ig(x) + cell.hg(h), cell.io(x) + cell.ho(h))


def _cell(cls):
    return cls(D_IN, H, param_dtype=jnp.float64, dtype=jnp.float64, rngs=nnx.Rngs(0))


def case_nnx_gru():
    return Case(*_nnx_rnn(_cell(nnx.GRUCell), _gru_detached), ("diagonal",), T)


def case_nnx_optimized_lstm():
    return Case(*_nnx_rnn(_cell(nnx.OptimizedLSTMCell), _lstm_detached(_optimized_lstm_gates)), ("diagonal", "none"), T)


def case_nnx_lstm():
    return Case(*_nnx_rnn(_cell(nnx.LSTMCell), _lstm_detached(_lstm_gates)), ("diagonal", "none"), T)


def case_linen_gru():
    rnn = nn.RNN(nn.GRUCell(features=H, param_dtype=jnp.float64, dtype=jnp.float64))
    xs = _xs()
    params = rnn.init(jax.random.key(0), xs)["params"]

    def loss(params, xs):
        return jnp.sum(jnp.sin(rnn.apply({"params": params}, xs)) * _weights())

    def detached(params, xs):
        p = params["cell"]
        dense = lambda name, v: v @ p[name]["kernel"] + p[name].get("bias", 0.0)
        h, ys = jnp.zeros((B, H), jnp.float64), []
        for t in range(T):
            x, hd = xs[:, t], sg(h)
            r = jax.nn.sigmoid(dense("ir", x) + dense("hr", hd))
            z = jax.nn.sigmoid(dense("iz", x) + dense("hz", hd))
            n = jnp.tanh(dense("in", x) + r * dense("hn", hd))
            h = (1.0 - z) * n + z * h
            ys.append(h)
        return jnp.sum(jnp.sin(jnp.stack(ys, 1)) * _weights())

    return Case(loss, (params, xs), detached, ("diagonal",), T)


class PreLNLayer(nnx.Module):
    """A pre-LN residual layer with BatchNorm and Dropout, as a user writes one for nnx.scan."""

    def __init__(self, rngs, detach=False):
        self.norm = nnx.LayerNorm(H, param_dtype=jnp.float64, rngs=rngs)
        self.linear = nnx.Linear(H, H, param_dtype=jnp.float64, rngs=rngs)
        self.bn = nnx.BatchNorm(H, param_dtype=jnp.float64, rngs=rngs)
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.detach = detach

    def __call__(self, h):
        read = sg(h) if self.detach else h
        return h + 0.5 * self.drop(self.bn(jnp.tanh(self.linear(self.norm(read)))))


def case_nnx_scan_layers():
    """nnx.scan over stacked layers (the NNX scan-over-layers pattern), BatchNorm and Dropout in
    train mode: per-layer RNG streams and statistics travel through the scan. Differentiated with
    nnx.grad / hbpjax.nnx.grad, as NNX models are."""
    L = 6

    def build(detach):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return PreLNLayer(rngs, detach)

        layers = create(nnx.Rngs(0, dropout=1))
        # BatchNorm statistics in float64 too (nnx keeps them in float32 whatever param_dtype says)
        nnx.update(layers, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(layers, nnx.BatchStat)))
        return layers

    def loss(layers, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(layer, h):
            return layer(h)

        return jnp.sum(jnp.sin(run(layers, x)))

    x = jax.random.normal(jax.random.key(2), (8, H), jnp.float64)
    model, detached_model = build(False), build(True)
    nnx.update(detached_model, nnx.state(model))  # the same weights, statistics and RNG state
    return Case(loss, (model, x), (loss, detached_model), ("identity",), L, module=True)


class LinenLayer(nn.Module):
    detach: bool = False

    @nn.compact
    def __call__(self, h, _):
        read = sg(h) if self.detach else h
        z = nn.Dense(H, param_dtype=jnp.float64)(nn.LayerNorm(param_dtype=jnp.float64)(read))
        return h + 0.5 * nn.Dropout(0.25, deterministic=False)(jnp.tanh(z)), None


def case_linen_scan_layers():
    """nn.scan over layers with variable_axes / split_rngs, as in the Flax examples."""
    L = 5

    def stack(detach):
        return nn.scan(
            functools.partial(LinenLayer, detach=detach), variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True}, length=L,
        )()

    x = jax.random.normal(jax.random.key(3), (8, H), jnp.float64)
    params = stack(False).init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, None)["params"]

    def run(detach, params, x):
        h, _ = stack(detach).apply({"params": params}, x, None, rngs={"dropout": jax.random.key(5)})
        return jnp.sum(jnp.sin(h))

    return Case(functools.partial(run, False), (params, x), functools.partial(run, True), ("identity",), L)


def _mlp_params(L=9, key=4, dtype=jnp.float64):
    k1, k2 = jax.random.split(jax.random.key(key))
    return 0.5 * jax.random.normal(k1, (L, H, H), dtype), jax.random.normal(k2, (B, H), dtype)


def case_lax_scan_relu():
    """A hand-written lax.scan: relu(h + f(h)), a per-step output read by the loss (ys = h_prev)."""
    W, h0 = _mlp_params()

    def make(detach):
        def loss(W, h0):
            def step(h, w):
                read = sg(h) if detach else h
                return jax.nn.relu(h + jnp.tanh(read @ w)), h  # y = h_prev: any function of (h, x)

            h, prev = jax.lax.scan(step, h0, W)
            return jnp.sum(h**2) + jnp.sum(jnp.cos(prev))

        return loss

    return Case(make(False), (W, h0), make(True), ("diagonal",), W.shape[0])


def case_reverse_scan():
    """reverse=True (as in a bidirectional RNN's backward direction), a gated update."""
    W, h0 = _mlp_params(L=8, key=5)

    def make(detach):
        def loss(W, h0):
            def step(h, w):
                read = sg(h) if detach else h
                a = jax.nn.sigmoid(read @ w)
                h = a * h + (1 - a) * jnp.tanh(read @ w.T)
                return h, h

            _, hs = jax.lax.scan(step, h0, W, reverse=True)
            return jnp.sum(jnp.sin(hs) * jnp.arange(1.0, 9.0)[:, None, None])

        return loss

    return Case(make(False), (W, h0), make(True), ("diagonal",), 8)


def _gated(update, L=8, key=8):
    """A gated scan ``h <- update(h, a) + tanh(h W^T)``, ``a = sigmoid(h W)``, where ``update``
    multiplies ``h`` by the gate the way the model's author wrote it."""
    W, h0 = _mlp_params(L=L, key=key)

    def make(detach):
        def loss(W, h0):
            def step(h, w):
                read = sg(h) if detach else h
                return update(h, jax.nn.sigmoid(read @ w)) + jnp.tanh(read @ w.T), h

            h, prev = jax.lax.scan(step, h0, W)
            return jnp.sum(h**2) + jnp.sum(jnp.cos(prev))

        return loss

    return Case(make(False), (W, h0), make(True), ("diagonal",), L)


def case_einsum_gate():
    """The gate applied with ``einsum("bi,bi->bi")``: a ``dot_general`` with batch axes only."""
    return _gated(lambda h, a: jnp.einsum("bi,bi->bi", h, a))


def case_einsum_per_feature_decay():
    """A per-feature decay from the gate's mean, ``einsum("bi,i->bi")``: a ``dot_general`` whose
    output has the batch axis last, transposed back (ParaRNN's and Mamba ports' diagonal cells)."""
    return _gated(lambda h, a: jnp.einsum("bi,i->bi", h, jnp.mean(a, 0)), key=9)


def case_unit_axis_added_and_removed():
    """``h[:, None, :] * a[:, None, :]``, squeezed back: a broadcast that only adds a unit axis."""
    return _gated(lambda h, a: jnp.squeeze(h[:, None, :] * a[:, None, :], 1), key=10)


def case_reshape_into_heads():
    """The carry split into heads and merged back, the gate applied per head."""
    heads = lambda v: v.reshape(B, 2, H // 2)
    return _gated(lambda h, a: (heads(h) * heads(a)).reshape(B, H), key=11)


def case_fori_loop():
    """lax.fori_loop with static bounds: a scan whose carry holds the integer counter."""
    W, h0 = _mlp_params(L=7, key=6)

    def make(detach):
        def loss(W, h0):
            def body(i, h):
                read = sg(h) if detach else h
                return h + jnp.tanh(read @ W[i])

            return jnp.sum(jnp.sin(jax.lax.fori_loop(0, 7, body, h0)))

        return loss

    return Case(make(False), (W, h0), make(True), ("none", "identity"), 7)


def case_jit_inside_loss():
    """The scan sits in a jax.jit inside the loss; two carries, shared weights, per-step inputs and
    a per-step output of (h_prev, x)."""
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    U = 0.5 * jax.random.normal(k1, (H, H), jnp.float64)
    xs = jax.random.normal(k2, (T, B, H), jnp.float64)
    h0 = jax.random.normal(k3, (B, H), jnp.float64)

    def make(detach):
        @jax.jit
        def encode(U, xs, h0):
            def step(carry, x):
                h, m = carry
                h_new = h + jnp.tanh(h @ U + x)
                y = jnp.sum(h_new * x, -1)  # any function of (h_prev, x): its whole VJP is taken
                if detach:  # k = 0: each leaf keeps its own residual path, the rest is detached
                    h_cut = sg(h) + jnp.tanh(sg(h) @ U + x)
                    h_new, m = h + jnp.tanh(sg(h) @ U + x), 0.9 * m + 0.1 * h_cut
                else:
                    m = 0.9 * m + 0.1 * h_new  # a running mean: K_m = 0.9, h_new is a cut value
                return (h_new, m), y

            return jax.lax.scan(step, (h0, jnp.zeros_like(h0)), xs)

        def loss(U, xs, h0):
            (h, m), ys = encode(U, xs, h0)
            return jnp.sum(h**2) + jnp.sum(jnp.sin(m)) + jnp.sum(jnp.cos(ys))

        return loss

    return Case(make(False), (U, xs, h0), make(True), ("identity", "diagonal"), T)


def _input_projection(reverse):
    """Per-step inputs read through a matmul and a tanh that never meet the carry (the forward
    computes them for all steps before the loop); that value is also a per-step output."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(8 + reverse), 4)
    U = 0.5 * jax.random.normal(k1, (H, H), jnp.float64)
    Wx = jax.random.normal(k2, (D_IN, H), jnp.float64)
    xs = jax.random.normal(k3, (T, B, D_IN), jnp.float64)
    h0 = jax.random.normal(k4, (B, H), jnp.float64)

    def make(detach):
        def loss(U, Wx, xs, h0):
            def step(h, x):
                read = sg(h) if detach else h
                p = jnp.tanh(x @ Wx)
                h = h + 0.5 * jnp.tanh(read @ U + p)
                return h, (h, p)

            _, (hs, ps) = jax.lax.scan(step, h0, xs, reverse=reverse)
            return jnp.sum(jnp.sin(hs) * _weights()[:, :, None]) + jnp.sum(jnp.cos(ps) * _weights()[:, :, None])

        return loss

    return Case(make(False), (U, Wx, xs, h0), make(True), ("identity",), T)


def case_input_projection():
    return _input_projection(reverse=False)


def case_input_projection_reverse():
    return _input_projection(reverse=True)


case = fixture_over_cases(globals())


def test_k_ge_L_equals_jax_grad(case):
    with jax.enable_x64(True):
        exact = case.grad()
        assert_trees_close(case.grad(case.L), exact)
        assert tree_rel_error(case.grad(0), exact) > 1e-6


def test_k0_is_the_residual_path_gradient(case):
    """k = 0 counts only paths along the residual path: the gradient of the detached model."""
    with jax.enable_x64(True):
        got, expected = case.grad(0), case.detached_grad()
        if not case.module:  # the parameters; the initial carry gets layer 1's whole Jacobian
            got, expected = got[0], expected[0]
        assert_trees_close(got, expected)


def test_find_stacks_reports_the_split(case):
    with jax.enable_x64(True):
        stacks = hbpjax.find_stacks(case.loss, *case.args)
    scans = [s for s in stacks if s.kind == "scan"]
    assert len(scans) == 1, str(stacks)
    (info,) = scans
    assert info.residual == case.kinds and info.length == case.L and info.converted, str(stacks)
    assert source_file(info.source) == __file__, info.source  # the user's line, not Flax's or ours
    assert not os.path.isabs(info.source)  # shown relative to the working directory
    assert info.source in str(stacks)


def test_backward_has_no_loop_over_the_layers(case):
    with jax.enable_x64(True):
        exact = loops(jax.make_jaxpr(lambda *a: case.grad())())
        found = loops(jax.make_jaxpr(lambda *a: case.grad(2))())
    L = case.L
    assert exact.count(("scan", L)) == 2, exact  # the detector sees backprop's backward loop
    assert found.count(("scan", L)) == 1, found  # the forward
    assert set(found) <= {("scan", L), ("scan", 2)}, found  # and the loop over the 2 sweeps


# ------------------------------------------------------------------- against the hand-split modules


@pytest.mark.parametrize(
    "theirs, ours",
    [(nnx.GRUCell, hbpjax.nnx.GRUCell), (nnx.OptimizedLSTMCell, hbpjax.nnx.LSTMCell)],
)
def test_flax_cells_split_like_the_hand_written_ones_at_every_k(theirs, ours):
    """nnx.RNN over Flax's own cell, converted automatically, equals hbpjax's hand-split module."""
    with jax.enable_x64(True):
        flax_model = nnx.RNN(_cell(theirs))
        hand = hbpjax.nnx.ResidualRNN(ours(D_IN, H, param_dtype=jnp.float64, rngs=nnx.Rngs(1)))
        nnx.update(hand, nnx.state(flax_model, nnx.Param))  # the same weights
        xs = _xs()

        def loss(model, xs):
            return jnp.sum(jnp.sin(model(xs)) * _weights())

        exact = nnx.grad(loss)(flax_model, xs)
        # k traced: one compilation per model for all T + 1 sweep counts.
        grad_at = nnx.jit(lambda model, xs, k: hbpjax.nnx.grad(loss, iterations=k)(model, xs))
        for k in range(T + 1):
            got = grad_at(flax_model, xs, jnp.asarray(k))
            assert_trees_close(got, grad_at(hand, xs, jnp.asarray(k)), rtol=1e-12, atol=1e-12)
            if k == 0:
                assert tree_rel_error(got, exact) > 1e-3
        assert_trees_close(got, exact)


def test_not_residual_stays_exact_and_is_reported():
    """nnx.RNN over SimpleCell (an Elman RNN, tanh(W h + U x)) has no residual path."""
    with jax.enable_x64(True):
        model = nnx.RNN(_cell(nnx.SimpleCell))
        xs = _xs()
        loss = lambda m, xs: jnp.sum(jnp.sin(m(xs)))
        (info,) = hbpjax.find_stacks(loss, model, xs)
        assert (info.residual, info.converted) == (("none",), False) and "no carry leaf" in info.reason
        with pytest.warns(hbpjax.NoStackWarning, match="hbpjax.nnx.grad: found no residual stack"):
            got = hbpjax.nnx.grad(loss, iterations=0)(model, xs)
        assert_trees_close(got, nnx.grad(loss)(model, xs), rtol=0, atol=0)


@pytest.mark.parametrize("make", [case_nnx_gru, case_jit_inside_loss, case_lax_scan_relu])
def test_forward_values_are_bit_for_bit_those_of_the_model(make):
    """The value is the unmodified function's, to the bit (eager and jitted). (jax.value_and_grad's
    own value can differ from it in the last bits: it runs the JVP of the forward.)"""
    with jax.enable_x64(True):
        case = make()
        for k in (0, 3):
            fn = hbpjax.highway_value_and_grad(case.loss, iterations=k)
            np.testing.assert_array_equal(fn(*case.args)[0], case.loss(*case.args))
            np.testing.assert_array_equal(jax.jit(fn)(*case.args)[0], jax.jit(case.loss)(*case.args))


def test_nested_scans():
    """A scan in the block of a converted scan: both are converted, k >= both lengths is exact."""
    with jax.enable_x64(True):
        W, h0 = _mlp_params(L=5, key=8)
        V = 0.3 * jax.random.normal(jax.random.key(9), (3, H, H), jnp.float64)

        def loss(W, V, h0):
            def layer(h, w):
                def inner(g, v):
                    return g + jnp.tanh(g @ v), None

                g, _ = jax.lax.scan(inner, jnp.tanh(h @ w), V)
                return h + 0.5 * g, None

            h, _ = jax.lax.scan(layer, h0, W)
            return jnp.sum(jnp.sin(h))

        stacks = hbpjax.find_stacks(loss, W, V, h0)
        assert [(s.length, s.converted) for s in stacks] == [(5, True), (3, True)]
        assert "nested" in stacks[1].reason
        exact = jax.grad(loss, (0, 1, 2))(W, V, h0)
        assert_trees_close(jax.jit(hbpjax.highway_grad(loss, (0, 1, 2), iterations=5))(W, V, h0), exact)
        assert tree_rel_error(jax.jit(hbpjax.highway_grad(loss, (0, 1, 2), iterations=1))(W, V, h0), exact) > 1e-6


# --------------------------------------------------------------------------------- options


def test_scans_option_chooses_what_is_converted():
    with jax.enable_x64(True):
        W, h0 = _mlp_params(L=6, key=10)

        def loss(W, h0):
            h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), h0, W)
            g, _ = hbpjax.residual_scan(lambda g, w: jnp.tanh(g @ w), h, W)
            return jnp.sum(jnp.sin(g))

        exact = jax.grad(loss)(W, h0)
        auto = hbpjax.highway_grad(loss, iterations=0)(W, h0)
        marked = hbpjax.highway_grad(loss, iterations=0, scans="marked")(W, h0)
        only_long = hbpjax.highway_grad(loss, iterations=0, scans=lambda info: info.kind == "scan")(W, h0)
        none = hbpjax.highway_grad(loss, iterations=0, scans=lambda info: False)

        # Each choice leaves the other stack exact: all four differ, and "none" is jax.grad.
        errors = [tree_rel_error(g, exact) for g in (auto, marked, only_long)]
        assert min(errors) > 1e-6 and len({round(e, 12) for e in errors}) == 3, errors
        with pytest.warns(hbpjax.NoStackWarning):
            assert_trees_close(none(W, h0), exact)


def test_gamma_option_applies_to_automatic_stacks_only():
    with jax.enable_x64(True):
        W, h0 = _mlp_params(L=6, key=11)

        def auto_loss(W, h0):
            h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), h0, W)
            return jnp.sum(jnp.sin(h))

        def marked_loss(W, h0):
            h, _ = hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), h0, W)  # gamma=0 of its own
            return jnp.sum(jnp.sin(h))

        for loss in (auto_loss, marked_loss):
            exact = jax.grad(loss)(W, h0)
            g0 = hbpjax.highway_grad(loss, iterations=1)(W, h0)
            g2 = hbpjax.highway_grad(loss, iterations=1, gamma=0.2)(W, h0)
            assert_trees_close(hbpjax.highway_grad(loss, iterations=6, gamma=0.2)(W, h0), exact)
            if loss is auto_loss:
                assert tree_rel_error(g0, g2) > 1e-6
            else:
                assert_trees_close(g0, g2, rtol=0, atol=0)


@pytest.mark.parametrize(
    "scans, error, match",
    [
        ("all", ValueError, r"`scans` must be 'auto' .*'marked' .*callable.*got 'all'"),
        (3, TypeError, r"`scans` must be 'auto', 'marked' or a callable StackInfo -> bool; got 3"),
    ],
)
def test_errors_scans_option(scans, error, match):
    for transform in (hbpjax.highway_grad, hbpjax.highway_value_and_grad, hbpjax.nnx.grad, hbpjax.nnx.value_and_grad):
        with pytest.raises(error, match=match):
            transform(lambda x: x, scans=scans)


def test_no_stack_warning_once_per_trace():
    def loss(x):
        return jnp.sum(jnp.sin(x))

    step = jax.jit(hbpjax.highway_grad(loss))
    with pytest.warns(hbpjax.NoStackWarning) as record:
        step(jnp.ones(3))
        step(jnp.ones(3))  # cached: not traced again, not warned again
    assert len(record) == 1


def test_python_loop_of_blocks_is_a_chain():
    """Blocks written one after the other (tests/test_chains.py checks chains in depth)."""
    W, h0 = _mlp_params(L=4, key=12, dtype=jnp.float32)

    def loss(W, h0):
        h = h0
        for w in W:  # a Python loop: four blocks traced one after the other
            h = h + jnp.tanh(h @ w)
        return jnp.sum(h)

    (info,) = hbpjax.find_stacks(loss, W, h0)
    assert (info.kind, info.length, info.period, info.converted) == ("chain", 4, 1, True)
    assert "written one after the other" in info.reason and source_file(info.source) == __file__


def test_sources_are_shown_as_a_user_reads_them(tmp_path, monkeypatch):
    """Relative to the working directory where the file lies below it, else relative to the
    directory holding hbpjax (its example models), else absolute: a table printed on one machine
    (a notebook's committed output) carries no other machine's paths."""
    from hbpjax.examples import models

    model = models.LoopResNet(channels=(4,), blocks_per_stage=3, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 8, 8, 1))
    loss = lambda model, x: jnp.mean(model(x))
    (here,) = hbpjax.find_stacks(loss, model, x)
    assert here.source.startswith(os.path.join("hbpjax", "examples", "models.py:")), here.source
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the package is not below it: relative to the package's directory
    (elsewhere,) = hbpjax.find_stacks(loss, model, x)
    assert elsewhere.source == here.source
    user = tmp_path / "user_loss.py"  # below neither: absolute
    user.write_text("import jax, jax.numpy as jnp\n\ndef loss(W, h):\n    return jnp.sum(jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), h, W)[0])\n")
    spec = importlib.util.spec_from_file_location("user_loss", user)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (mine,) = hbpjax.find_stacks(module.loss, *_mlp_params(L=4, key=12, dtype=jnp.float32))
    assert mine.source == f"{user}:4"


def test_gradient_agreement_on_an_nnx_module():
    with jax.enable_x64(True):
        model = nnx.RNN(_cell(nnx.GRUCell))
        xs = _xs()
        loss = lambda m, xs: jnp.sum(jnp.sin(m(xs)) * _weights())
        report = hbpjax.gradient_agreement(loss, model, xs, iterations=(0, T))
        assert report.relative_error[0] > 1e-3 and report.relative_error[1] < 1e-12
        exact = nnx.grad(loss)(model, xs)
        g0 = hbpjax.nnx.grad(loss, iterations=0)(model, xs)
        assert report.relative_error[0] == pytest.approx(tree_rel_error(g0, exact), rel=1e-9)
        gamma = hbpjax.gradient_agreement(loss, model, xs, iterations=(1,), gamma=0.5)
        assert gamma.relative_error[0] == pytest.approx(
            tree_rel_error(hbpjax.nnx.grad(loss, iterations=1, gamma=0.5)(model, xs), exact), rel=1e-9
        )


def test_input_path_that_cannot_be_vmapped_stays_in_the_loop():
    """A pure_callback without vmap_method on the per-step inputs' path cannot be computed for all
    steps at once: the forward leaves that path in the loop, and k >= L is still exact."""
    with jax.enable_x64(True):
        k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
        U = 0.5 * jax.random.normal(k1, (H, H), jnp.float64)
        Wx = jax.random.normal(k2, (D_IN, H), jnp.float64)
        xs = jax.random.normal(k3, (T, B, D_IN), jnp.float64)

        def loss(U, Wx, h0):
            def step(h, x):
                q = jax.pure_callback(np.cos, jax.ShapeDtypeStruct(x.shape, x.dtype), sg(x))
                return h + jnp.tanh(h @ U + jnp.tanh(q @ Wx)), h

            return jnp.sum(jnp.sin(jax.lax.scan(step, h0, xs)[0]))

        args = (U, Wx, jnp.ones((B, H), jnp.float64))
        assert_trees_close(model_grad(loss, args, T), model_grad(loss, args))
