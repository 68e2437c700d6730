"""Large-model code as its authors write it: steps under remat or custom rules, stacks nested in
loops, maps and branches, blocks with in-block constants, and honest reports.

Every case is the model written with Flax's or JAX's own transforms, checked in float64 against
``jax.grad``: ``k >= L`` equals it, ``k = 0`` differs from it exactly when ``find_stacks`` says a
stack is converted (the report says what the gradient does).
"""

import contextlib
import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hbpjax
from helpers import assert_trees_close, fixture_over_cases, loops, model_grad, tree_rel_error

L, B, D = 5, 2, 8  # layers (or time steps), batch, width


@dataclasses.dataclass
class Case:
    loss: Callable
    args: tuple
    converted: bool  # whether some stack is converted (and so k = 0 differs from jax.grad)
    module: bool = False  # args[0] is an NNX module: nnx.grad / hbpjax.nnx.grad of its Params

    def grad(self, k=None):
        return model_grad(self.loss, self.args, k, module=self.module)


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape, jnp.float64)


def _layer_weights(key=0):
    return _normal(key, (L, D, D), 0.8 / np.sqrt(D)), _normal(key + 1, (B, D))


def _params_loss(module, *extra):
    """``(loss(params, x), (params, x))`` of a Flax NNX module, unmodified."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    x = _normal(9, (B, D))

    def loss(params, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, params, rest)(x, *extra)))

    return loss, (params, x)


# ---------------------------------------------------------------------- steps under a wrapper


def case_checkpoint_no_policy():
    W, x = _layer_weights()
    step = jax.checkpoint(lambda h, w: (h + jnp.tanh(h @ w), None))
    return Case(lambda W, x: jnp.sum(jnp.sin(jax.lax.scan(step, x, W)[0])), (W, x), True)


def case_checkpoint_dots_saveable():
    W, x = _layer_weights(2)
    step = jax.checkpoint(lambda h, w: (h + jnp.tanh(h @ w), None), policy=jax.checkpoint_policies.dots_saveable)
    return Case(lambda W, x: jnp.sum(jnp.sin(jax.lax.scan(step, x, W)[0])), (W, x), True)


class _PreLN(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D, param_dtype=jnp.float64, rngs=rngs)
        self.mlp = nnx.Linear(D, D, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.mlp(self.norm(x)))


class _RematStack(nnx.Module):
    """Layers stacked with nnx.vmap and run with nnx.scan over nnx.remat, as large models do."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _PreLN(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def step(x, layer):
            return layer(x)

        return step(x, self.layers)


def case_nnx_scan_over_nnx_remat():
    return Case(*_params_loss(_RematStack(nnx.Rngs(0))), True)


class _LinenLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        y = nn.Dense(D, param_dtype=jnp.float64)(nn.LayerNorm(param_dtype=jnp.float64)(x))
        return x + jnp.tanh(y), None


class _LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            nn.remat(_LinenLayer), variable_axes={"params": 0}, split_rngs={"params": True}, length=L
        )
        return scan()(x, None)[0]


def case_nn_scan_of_nn_remat():
    model, x = _LinenStack(), _normal(9, (B, D))
    params = model.init(jax.random.key(0), x)["params"]
    return Case(lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x))), (params, x), True)


def case_step_with_a_custom_vjp_rule():
    """The whole step under a custom_vjp whose backward is not the primal's derivative: the rule's
    Jacobian is what k >= L must equal."""

    @jax.custom_vjp
    def step(h, w):
        return h + jnp.tanh(h @ w)

    step.defvjp(lambda h, w: (step(h, w), (h, w)), lambda r, g: (g + 0.5 * g @ r[1].T, 0.1 * r[0].T @ g))
    W, x = _layer_weights(4)
    return Case(lambda W, x: jnp.sum(jnp.sin(jax.lax.scan(lambda h, w: (step(h, w), None), x, W)[0])), (W, x), True)


def case_step_with_a_custom_jvp_rule():
    @jax.custom_jvp
    def step(h, w):
        return h + jnp.tanh(h @ w)

    @step.defjvp
    def _(primals, tangents):
        (h, w), (dh, dw) = primals, tangents
        return step(h, w), dh + 0.5 * dh @ w + 0.3 * h @ dw

    W, x = _layer_weights(6)
    return Case(lambda W, x: jnp.sum(jnp.sin(jax.lax.scan(lambda h, w: (step(h, w), None), x, W)[0])), (W, x), True)


# ------------------------------------------------------------------------------ in-block constants


def case_arange_in_the_block():
    """The issue's reproducer: jnp.arange (an equation with no inputs) inside the block."""
    W, x = _layer_weights(8)

    def loss(W, x):
        def step(h, w):
            pos = jnp.arange(h.shape[-1], dtype=h.dtype)
            return h + jnp.tanh((h * pos) @ w), None

        return jnp.sum(jax.lax.scan(step, x, W)[0] ** 2)

    return Case(loss, (W, x), True)


class _RotaryAttention(nnx.Module):
    """Pre-LN self-attention with rotary position embeddings (positions from jnp.arange)."""

    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D, param_dtype=jnp.float64, rngs=rngs)
        self.qkv = nnx.Linear(D, 3 * D, param_dtype=jnp.float64, rngs=rngs)
        self.out = nnx.Linear(D, D, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):  # x: (batch, seq, D)
        q, k, v = jnp.split(self.qkv(self.norm(x)), 3, axis=-1)
        pos = jnp.arange(x.shape[-2], dtype=x.dtype)[:, None]
        freq = 1.0 / (10000.0 ** (jnp.arange(0, D, 2, dtype=x.dtype) / D))
        cos, sin = jnp.cos(pos * freq), jnp.sin(pos * freq)

        def rotate(t):
            a, b = t[..., ::2], t[..., 1::2]
            return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

        scores = jnp.einsum("bqd,bkd->bqk", rotate(q), rotate(k)) / np.sqrt(D)
        mask = jnp.tril(jnp.ones((x.shape[-2],) * 2, bool))
        weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), -1)
        return x + self.out(jnp.einsum("bqk,bkd->bqd", weights, v))


class _RotaryStack(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _RotaryAttention(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, layer):
            return layer(x)

        return step(x, self.layers)


def case_rotary_attention_block():
    loss, (params, _) = _params_loss(_RotaryStack(nnx.Rngs(1)))
    return Case(loss, (params, _normal(10, (B, 6, D))), True)


# --------------------------------------------------------------- stacks nested in other loops


class _StackedRNN(nnx.Module):
    """A stack of nnx.RNN layers run by nnx.scan: the outer loop has no residual path."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.RNN(nnx.GRUCell(D, D, dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs))

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, rnn):
            return rnn(x)

        return step(x, self.layers)


def case_stacked_nnx_rnn():
    loss = lambda model, x: jnp.sum(jnp.sin(model(x)))
    return Case(loss, (_StackedRNN(nnx.Rngs(2)), _normal(11, (B, L, D))), True, module=True)


def _gru(params, xs):
    U, V = params

    def cell(h, x):
        gate = jax.nn.sigmoid(x @ U + h @ V)
        h = gate * h + (1.0 - gate) * jnp.tanh(x @ V + h @ U)
        return h, h

    return jax.lax.scan(cell, jnp.zeros((B, D), xs.dtype), xs)[1]


def _gru_params():
    return (_normal(12, (D, D), 0.4), _normal(13, (D, D), 0.4)), _normal(14, (3, L, B, D))


def case_lax_map_over_sequences():
    params, seqs = _gru_params()
    return Case(lambda p, s: jnp.sum(jnp.sin(jax.lax.map(lambda q: _gru(p, q), s))), (params, seqs), True)


def case_vmap_over_sequences():
    params, seqs = _gru_params()
    return Case(lambda p, s: jnp.sum(jnp.sin(jax.vmap(lambda q: _gru(p, q))(s))), (params, seqs), True)


def case_scan_in_a_cond_branch():
    params, seqs = _gru_params()

    def loss(p, s):
        ys = jax.lax.cond(jnp.sum(s) > -1e9, lambda q: _gru(p, q), lambda q: q, s[0])
        return jnp.sum(jnp.sin(ys))

    return Case(loss, (params, seqs), True)


def case_scan_inside_a_custom_vjp():
    """The user's own backward for the whole scan is kept: nothing is converted, and said so."""
    params, seqs = _gru_params()

    @jax.custom_vjp
    def run(p, s):
        return _gru(p, s)

    run.defvjp(lambda p, s: jax.vjp(_gru, p, s), lambda vjp, g: vjp(g))
    return Case(lambda p, s: jnp.sum(jnp.sin(run(p, s[0]))), (params, seqs), False)


case = fixture_over_cases(globals())


def test_k_ge_L_equals_jax_grad(case):
    with jax.enable_x64(True), contextlib.nullcontext() if case.converted else pytest.warns(hbpjax.NoStackWarning):
        assert_trees_close(case.grad(L), case.grad())


def test_find_stacks_says_what_the_gradient_does(case):
    """``converted`` in find_stacks' rows <=> k = 0 differs from jax.grad."""
    with jax.enable_x64(True):
        stacks = hbpjax.find_stacks(case.loss, *case.args)
        assert any(s.converted for s in stacks) == case.converted, str(stacks)
        assert stacks and all("no carry leaf has a residual path" not in s.reason for s in stacks if s.length == L)
        if case.converted:
            assert tree_rel_error(case.grad(0), case.grad()) > 1e-6, str(stacks)
        else:
            with pytest.warns(hbpjax.NoStackWarning, match="inside custom_vjp_call: kept exact"):
                assert_trees_close(case.grad(0), case.grad(), rtol=0, atol=0)


def test_remat_is_kept_around_the_block():
    """A remat'd step's block is recomputed under the user's policy: the backward holds the
    step's checkpoint (and with dots_saveable, the policy object itself)."""
    with jax.enable_x64(True):
        case = case_checkpoint_dots_saveable()
        policies = []

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                if "policy" in eqn.params:
                    policies.append(eqn.params["policy"])
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(getattr(sub, "jaxpr", sub))

        walk(jax.make_jaxpr(hbpjax.highway_grad(case.loss, iterations=2))(*case.args).jaxpr)
        assert jax.checkpoint_policies.dots_saveable in policies, policies
        (info,) = hbpjax.find_stacks(case.loss, *case.args)
        assert info.converted and "checkpoint" in info.reason


@pytest.mark.parametrize("recompute_layers", [None, 1, 3, L])
@pytest.mark.parametrize("make", [case_checkpoint_no_policy, case_checkpoint_dots_saveable])
def test_remat_recomputed_any_layers_at_once_is_exact(make, recompute_layers):
    """However many layers a remat'd stack recomputes at once (one, the default; a group size that
    does not divide L; all of them), k >= L is backprop."""
    with jax.enable_x64(True):
        case = make()
        got = hbpjax.highway_grad(case.loss, (0, 1), iterations=L, recompute_layers=recompute_layers)(*case.args)
        assert_trees_close(got, case.grad())


@pytest.mark.parametrize("recompute_layers, groups", [(None, 8), (1, 8), (2, 4), (3, 4), (8, 1)])
def test_remat_recomputes_layers_as_asked(recompute_layers, groups):
    """A remat'd stack's VJPs loop over groups of at most ``recompute_layers`` layers (default: one
    layer at a time, as backprop's backward recomputes them); the layers of a group are recomputed
    at once (vmapped), never in a loop of their own."""
    W, x = 0.3 * jax.random.normal(jax.random.key(0), (8, D, D)), jnp.ones((B, D))
    step = jax.checkpoint(lambda h, w: (h + jnp.tanh(h @ w), None))
    loss = lambda W, x: jnp.sum(jnp.sin(jax.lax.scan(step, x, W)[0]))
    jaxpr = jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=2, recompute_layers=recompute_layers))(W, x)
    found = [n for kind, n in loops(jaxpr) if kind == "scan"]
    assert set(found) == {8, groups} and (groups == 8 or found.count(8) == 1), found


# ------------------------------------------------------------------------------ exact regions


@pytest.mark.parametrize("jit", [False, True])
def test_exact_around_the_transform_call(jit):
    with jax.enable_x64(True):
        case = case_checkpoint_no_policy()
        fn = hbpjax.highway_grad(case.loss, (0, 1), iterations=0)
        fn = jax.jit(fn) if jit else fn
        with hbpjax.exact():
            got = fn(*case.args)
        assert_trees_close(got, case.grad())
        assert tree_rel_error(fn(*case.args), case.grad()) > 1e-6  # outside the region: converted


# ---------------------------------------------------------------------- gradient_agreement state


class _Noisy(nnx.Module):
    """Dropout and BatchNorm (state a forward reads and changes) around Flax's own GRU."""

    def __init__(self, rngs):
        self.rnn = nnx.RNN(nnx.GRUCell(D, D, rngs=rngs))
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.norm = nnx.BatchNorm(D, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.drop(self.rnn(x)))


def _state_values(model):
    keys = lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a
    return [np.asarray(keys(a)) for a in jax.tree.leaves(nnx.state(model))]


def test_gradient_agreement_takes_every_gradient_from_the_same_state():
    model = _Noisy(nnx.Rngs(0, dropout=1))
    xs = jax.random.normal(jax.random.key(15), (B, L, D))
    loss = lambda m, xs: jnp.sum(jnp.sin(m(xs)))
    before = _state_values(model)
    report = hbpjax.gradient_agreement(loss, model, xs, iterations=(0, L))
    # k >= L agrees to rounding (float32) only if the reference and k = L drew the same dropout
    # mask and read the same batch statistics (other masks: relative errors of order 1).
    assert report.relative_error[1] < 1e-5 and report.cosine[1] > 1 - 1e-6, str(report)
    assert report.relative_error[0] > 1e-4, str(report)
    for a, b in zip(before, _state_values(model)):  # the user's model, RNG counts and statistics included
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------- blocks JAX cannot vmap


@pytest.mark.parametrize(
    "length, options, fallback",
    [
        # The forward computes each layer's linearization step by step: nothing is vmapped but the
        # linear part, which holds no callback.
        (L, {}, None),
        # Recomputing the linearization vmaps the block: layer by layer instead, or exact.
        (L, dict(save_linearization=False), "one by one"),
        (hbpjax._backward.linearize.UNROLL_AT_MOST + 1, dict(save_linearization=False), "exact backprop"),
    ],
)
def test_unbatchable_block_falls_back_with_a_warning(length, options, fallback):
    """A pure_callback without vmap_method (on a path with no derivative) in a block: jax.grad
    works, so highway_grad must too."""
    with jax.enable_x64(True):
        W, x = _normal(16, (length, D, D), 0.8 / np.sqrt(D)), _normal(17, (B, D))

        def loss(W, x):
            def step(h, w):
                half = jax.ShapeDtypeStruct(h.shape, h.dtype)
                scale = jax.pure_callback(lambda a: np.full_like(a, 0.5), half, jax.lax.stop_gradient(h))
                return h + scale * jnp.tanh(h @ w), None

            return jnp.sum(jnp.sin(jax.lax.scan(step, x, W)[0]))

        grad = hbpjax.highway_grad(loss, (0, 1), iterations=length, **options)
        with pytest.warns(hbpjax.UnbatchableWarning, match=fallback) if fallback else contextlib.nullcontext():
            got = grad(W, x)
        assert_trees_close(got, jax.grad(loss, (0, 1))(W, x))
