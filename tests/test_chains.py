"""Chains: residual blocks written one after the other (a Python loop of layers), as Flax's own
examples write them, converted without changing the model.

Each model is written with Flax's modules in a Python loop and checked in float64 against
``jax.grad`` of the same model: ``k >= L`` equals it, ``k = 0`` and ``k = 2`` differ from it, the
gradient has the parameters' tree. Near misses (layers that differ, a layer reading another's
weights) stay exact, and ``find_stacks`` says why.
"""

import dataclasses
import warnings
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hbpjax
from helpers import assert_trees_close, count, equations, fixture_over_cases, model_grad, source_file, tree_rel_error

B, T, D = 2, 6, 8
f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def _normal(key, shape, scale=1.0, dtype=jnp.float64):
    return scale * jax.random.normal(jax.random.key(key), shape, dtype)


@dataclasses.dataclass
class Case:
    """``loss(params, *rest)``, a function of a parameter tree (or of an NNX module, ``module=True``)."""

    loss: Callable
    args: tuple
    L: int
    period: int = 1
    module: bool = False
    has_aux: bool = False

    def grad(self, k=None, **options):
        return model_grad(self.loss, self.args, k, module=self.module, argnums=0, has_aux=self.has_aux, **options)


# ------------------------------------------------------------------------------------- models


class _LinenDecoderBlock(nn.Module):
    """A pre-LN decoder block written as Flax's lm1b example writes it."""

    @nn.compact
    def __call__(self, x, mask):
        y = nn.LayerNorm(**f64)(x)
        y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=D, **f64)(y, y, mask=mask)
        x = x + y
        y = nn.LayerNorm(**f64)(x)
        y = nn.Dense(2 * D, **f64)(y)
        y = nn.Dense(D, **f64)(nn.relu(y))
        return x + y


class _LinenDecoder(nn.Module):
    layers: int = 4
    remat: bool = False  # each layer under nn.remat

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(11, D, **f64)(tokens)
        mask = nn.make_causal_mask(tokens)
        block = nn.remat(_LinenDecoderBlock) if self.remat else _LinenDecoderBlock
        for _ in range(self.layers):  # a Python loop of layers, as lm1b's Decoder
            x = block()(x, mask)
        return nn.Dense(11, **f64)(nn.LayerNorm(**f64)(x))


def case_linen_pre_ln_decoder():
    model = _LinenDecoder()
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, 11)
    params = model.init(jax.random.key(1), tokens)["params"]
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape, a.dtype), params)

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    return Case(loss, (params, tokens), L=4, period=2)


class _Attention(nnx.Module):
    """Pre-LN causal self-attention over a window (``window=None``: global), NNX."""

    def __init__(self, window, heads, rngs):
        self.window = window
        self.norm = nnx.LayerNorm(D, rngs=rngs, **f64)
        self.attn = nnx.MultiHeadAttention(heads, D, decode=False, rngs=rngs, **f64)

    def __call__(self, x):
        pos = jnp.arange(x.shape[1])
        mask = pos[:, None] >= pos[None, :]
        if self.window is not None:
            mask = mask & (pos[:, None] - pos[None, :] < self.window)
        return x + self.attn(self.norm(x), mask=mask)


class _Alternating(nnx.Module):
    """Local (2 heads, a window of 2) and global (4 heads) attention layers alternating, as gemma
    does, each followed by an MLP: a repeating pattern of four different blocks."""

    def __init__(self, rngs, layers=6):
        self.attn = nnx.List([_Attention(2, 2, rngs) if i % 2 == 0 else _Attention(None, 4, rngs) for i in range(layers)])
        self.mlp = nnx.List([nnx.Linear(D, D, rngs=rngs, **f64) for _ in range(layers)])

    def __call__(self, x):
        for attn, mlp in zip(self.attn, self.mlp):
            x = attn(x)
            x = x + jnp.tanh(mlp(x))
        return x


def case_nnx_alternating_attention():
    model = _Alternating(nnx.Rngs(3))
    return Case(lambda m, x: jnp.sum(jnp.sin(m(x))), (model, _normal(4, (B, T, D))), L=3, period=4, module=True)


class _PostActBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))`` with BatchNorm in train mode."""

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (3, 3), use_bias=False, **f64)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=False, **f64)(y))
        y = nn.Conv(4, (3, 3), use_bias=False, **f64)(y)
        y = nn.BatchNorm(use_running_average=False, **f64)(y)
        return nn.relu(x + y)


class _PostActResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), **f64)(x))
        for _ in range(3):
            x = _PostActBlock()(x)
        return jnp.mean(x, axis=(1, 2))


def _post_act_resnet():
    model = _PostActResNet()
    x = _normal(5, (B, 6, 6, 2))
    variables = model.init(jax.random.key(6), x)

    def loss(params, x):
        out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out)), updates

    return loss, variables["params"], x


def case_linen_post_activation_resnet_batch_norm():
    loss, params, x = _post_act_resnet()
    return Case(loss, (params, x), L=3, has_aux=True)


class _PreActBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs, **f64)
        self.linear = nnx.Linear(D, D, rngs=rngs, **f64)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x):
        return x + self.drop(self.linear(jax.nn.relu(self.norm(x))))


class _PreActResNet(nnx.Module):
    def __init__(self, rngs, layers=4):
        self.blocks = nnx.List([_PreActBlock(rngs) for _ in range(layers)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def case_nnx_pre_activation_resnet_dropout():
    model = _PreActResNet(nnx.Rngs(7, dropout=8))
    return Case(lambda m, x: jnp.sum(jnp.sin(m(x))), (model, _normal(9, (B, D))), L=4, module=True)


class _RematResNet(nnx.Module):
    """Each layer under ``nnx.remat`` (as Griffin and large NNX models run their blocks)."""

    def __init__(self, rngs, layers=4):
        self.blocks = nnx.List([_PreActBlock(rngs) for _ in range(layers)])

    def __call__(self, x):
        for block in self.blocks:
            x = nnx.remat(lambda block, x: block(x))(block, x)
        return x


def case_nnx_remat_per_layer():
    model = _RematResNet(nnx.Rngs(10, dropout=11))
    return Case(lambda m, x: jnp.sum(jnp.sin(m(x))), (model, _normal(12, (B, D))), L=4, module=True)


def case_linen_remat_per_layer():
    model = _LinenDecoder(layers=3, remat=True)  # lm1b's decoder with each layer remat'd
    tokens = jax.random.randint(jax.random.key(13), (B, T), 0, 11)
    params = model.init(jax.random.key(14), tokens)["params"]
    return Case(lambda params, tokens: jnp.mean(jnp.sin(model.apply({"params": params}, tokens))), (params, tokens), L=3)


def _loop_of_5(wrap, seed):
    """Five two-matmul residual layers, each wrapped in ``wrap`` (a checkpoint, a jit), in a loop."""
    layer = wrap(lambda x, w: x + jnp.tanh(x @ w["a"]) @ w["b"])
    params = [{"a": _normal(seed + i, (D, D), 0.4), "b": _normal(seed + 10 + i, (D, D), 0.4)} for i in range(5)]

    def loss(params, x):
        for w in params:
            x = layer(x, w)
        return jnp.sum(jnp.sin(x))

    return Case(loss, (params, _normal(seed + 20, (B, D))), L=5)


def case_checkpoint_with_a_policy_per_layer():
    """``jax.checkpoint`` around each whole layer, with a policy that saves the matmuls."""
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return _loop_of_5(lambda f: jax.checkpoint(f, policy=policy), seed=15)


case = fixture_over_cases(globals())

REMAT = ("nnx_remat_per_layer", "linen_remat_per_layer", "checkpoint_with_a_policy_per_layer")


@pytest.mark.parametrize("name", REMAT)
def test_remat_per_layer_keeps_the_checkpoint(name):
    """A loop of checkpointed layers is a chain whose step reads through the checkpoint and keeps it."""
    with jax.enable_x64(True):
        case = globals()[f"case_{name}"]()
        (info,) = [s for s in hbpjax.find_stacks(case.loss, *case.args) if s.kind == "chain"]
    assert info.converted and info.length == case.L and "jax.checkpoint" in info.reason, info


def test_k_ge_L_equals_jax_grad(case):
    with jax.enable_x64(True):
        exact = case.grad()
        got = case.grad(case.L)
        assert jax.tree.structure(got) == jax.tree.structure(exact)  # the parameters' own tree
        assert_trees_close(got, exact)
        assert tree_rel_error(case.grad(0), exact) > 1e-6
        if case.L > 3:  # L - 1 sweeps are exact
            assert tree_rel_error(case.grad(2), exact) > 1e-9


def test_find_stacks_lists_the_chain(case):
    with jax.enable_x64(True):
        stacks = hbpjax.find_stacks(case.loss, *case.args)
    chains = [s for s in stacks if s.kind == "chain" and s.converted]
    assert [(s.length, s.period) for s in chains] == [(case.L, case.period)], str(stacks)
    (info,) = chains
    assert source_file(info.source) == __file__ and source_file(info.last_source) == __file__, str(stacks)


def test_batch_statistics_equal_jax_value_and_grads():
    with jax.enable_x64(True):
        loss, params, x = _post_act_resnet()
        (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
        forward_value, forward_updates = jax.jit(loss)(params, x)
        for k in (0, 3):
            (v, u), g = jax.jit(hbpjax.highway_value_and_grad(loss, has_aux=True, iterations=k))(params, x)
            # The model's own forward to the bit; jax.value_and_grad's (its JVP) to rounding.
            np.testing.assert_array_equal(v, forward_value)
            assert_trees_close(u, forward_updates, rtol=0, atol=0)
            assert_trees_close(u, updates)


def test_chain_inside_jit_with_every_option():
    """A chain inside a jax.jit in the loss; gamma, tol, return_report, save_linearization and a
    scans= callable apply to it as to a scan."""
    with jax.enable_x64(True):
        W, h0 = _normal(10, (5, D, D), 0.4), _normal(11, (B, D))

        @jax.jit
        def net(W, h):
            for w in W:
                h = h + jnp.tanh(h @ w)
            return h

        loss = lambda W, h0: jnp.sum(jnp.sin(net(W, h0)))
        exact = jax.grad(loss, (0, 1))(W, h0)
        for options in (dict(gamma=0.3), dict(tol=1e-3), dict(save_linearization=False)):
            assert_trees_close(hbpjax.highway_grad(loss, (0, 1), iterations=5, **options)(W, h0), exact)
        g, report = hbpjax.highway_grad(loss, (0, 1), iterations=2, return_report=True)(W, h0)
        assert report.sweeps.tolist() == [2] and source_file(report.sources[0]) == __file__
        assert tree_rel_error(g, exact) > 1e-9
        only_scans = hbpjax.highway_grad(loss, (0, 1), iterations=0, scans=lambda info: info.kind != "chain")
        with pytest.warns(hbpjax.NoStackWarning):
            assert_trees_close(only_scans(W, h0), exact, rtol=0, atol=0)


def test_shape_change_ends_a_chain():
    """Two stages of three blocks, a widening between them: two chains of three."""
    with jax.enable_x64(True):
        W1, W2, P = _normal(12, (3, 4, 4), 0.4), _normal(13, (3, 6, 6), 0.4), _normal(14, (4, 6))

        def loss(W1, W2, P, h):
            for w in W1:
                h = h + jnp.tanh(h @ w)
            h = h @ P
            for w in W2:
                h = h + jnp.tanh(h @ w)
            return jnp.sum(jnp.sin(h))

        args = (W1, W2, P, _normal(15, (B, 4)))
        stacks = hbpjax.find_stacks(loss, *args)
        assert [(s.kind, s.length, s.converted) for s in stacks] == [("chain", 3, True), ("chain", 3, True)], str(stacks)
        exact = jax.grad(loss, (0, 1, 2, 3))(*args)
        assert_trees_close(hbpjax.highway_grad(loss, (0, 1, 2, 3), iterations=3)(*args), exact)


# --------------------------------------------------------------------------------- near misses


@pytest.mark.parametrize(
    "name, most",
    [
        ("different wiring", 2),  # layer 3 applies the same primitives wired otherwise: 2 + 1 + 1
        ("another layer's weights", 0),  # layer 4 reads the very array layer 3 reads: no chain
        ("a value of another layer", 3),  # layer 4 reads a value layer 2 computed: layers 1-3 at most
    ],
)
def test_near_misses_stay_exact_and_say_why(name, most):
    with jax.enable_x64(True):
        W, h0 = _normal(16, (4, D, D), 0.4), _normal(17, (B, D))

        def loss(W, h):
            ws, saved = [W[0], W[1], W[2], W[3]], None
            for i in range(4):
                if name == "different wiring":
                    h = h + (jnp.tanh(h) @ ws[i] if i == 2 else jnp.tanh(h @ ws[i]))
                elif name == "another layer's weights":
                    h = h + jnp.tanh(h @ ws[min(i, 2)])
                else:
                    z = jnp.tanh(h @ ws[i])
                    saved = z if i == 1 else saved
                    h = h + (z + saved if i == 3 else z)
            return jnp.sum(jnp.sin(h))

        stacks = hbpjax.find_stacks(loss, W, h0)
        converted = [s for s in stacks if s.converted]
        assert all(s.length <= most for s in converted), str(stacks)  # never across the layer that differs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hbpjax.NoStackWarning)
            got = hbpjax.highway_grad(loss, (0, 1), iterations=4)(W, h0)
        assert_trees_close(got, jax.grad(loss, (0, 1))(W, h0))
        if not converted:
            assert stacks and all("left to backprop" in s.reason for s in stacks), str(stacks)


def test_stacked_inputs_over_the_limit_are_left_to_backprop(monkeypatch):
    monkeypatch.setattr("hbpjax._analysis.chains.STACK_LIMIT", 100)
    W, h0 = _normal(20, (4, D, D), 0.4, jnp.float32), _normal(21, (B, D), 1.0, jnp.float32)

    def loss(W, h):
        for w in W:
            h = h + jnp.tanh(h @ w)
        return jnp.sum(h)

    (info,) = hbpjax.find_stacks(loss, W, h0)
    assert not info.converted and "limit" in info.reason and "MiB" in info.reason
    with pytest.warns(hbpjax.NoStackWarning, match="limit"):
        assert_trees_close(hbpjax.highway_grad(loss, iterations=0)(W, h0), jax.grad(loss)(W, h0), rtol=0, atol=0)


def test_chain_backward_has_no_loop_over_the_layers():
    from helpers import loops

    W, h0 = _normal(22, (12, D, D), 0.3, jnp.float32), _normal(23, (B, D), 1.0, jnp.float32)

    def loss(W, h):
        for w in W:
            h = h + jnp.tanh(h @ w)
        return jnp.sum(h)

    found = loops(jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=2))(W, h0))
    assert all(length != 12 for _, length in found), found  # the forward is the user's straight-line code


# ------------------------------------------------------------------ how the layers are linearized


def _matmuls_batched_over(closed_jaxpr, size: int) -> int:
    """How many matmuls of a program are batched over a dimension of ``size``: the layers' matmuls
    vmapped into one."""
    found = 0
    for eqn in equations(closed_jaxpr):
        if eqn.primitive.name == "dot_general":
            (_, _), (batch, _) = eqn.params["dimension_numbers"]
            found += any(eqn.invars[0].aval.shape[d] == size for d in batch)
    return found


def _linen_decoder_of_3():
    model = _LinenDecoder(layers=3)  # lm1b's decoder: the Dense matmuls, attention's in einsum calls
    tokens = jax.random.randint(jax.random.key(44), (B, T), 0, 11)
    params = model.init(jax.random.key(45), tokens)["params"]
    return Case(lambda params, tokens: jnp.mean(jnp.sin(model.apply({"params": params}, tokens))), (params, tokens), L=3)


def _jitted_layers_of_5():
    return _loop_of_5(jax.jit, seed=46)  # the matmuls inside a call


def _scanned_layers_of_5():
    params = {"a": _normal(67, (5, D, D), 0.4), "b": _normal(68, (5, D, D), 0.4)}  # a scan over layers

    def loss(params, x):
        h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w["a"]) @ w["b"], None), x, params)
        return jnp.sum(jnp.sin(h))

    return Case(loss, (params, _normal(69, (B, D))), L=5)


@pytest.mark.parametrize("build", [_linen_decoder_of_3, _jitted_layers_of_5, _scanned_layers_of_5])
def test_short_chains_of_matmuls_are_linearized_layer_by_layer_on_cpu(build, monkeypatch):
    """On a CPU, a short stack whose layers multiply by matrices of their own (chains with them
    inside calls: attention's einsums, a jitted layer; a scan over layers) is linearized one layer
    at a time when its matmuls are large enough (here: any size): its backward holds no matmul
    batched over the layers. Vmapped (matmuls this small by default; or the rule switched off) it
    does. All are exact at k >= L."""
    from hbpjax._analysis import findings

    settings = {"unrolled": dict(UNROLL_MATMUL_FLOPS=0), "small, by default": {}, "rule off": dict(UNROLL_MATMUL_FLOPS=0, UNROLL_MATMULS=0)}
    with jax.enable_x64(True):
        case = build()
        exact = case.grad()
        batched = {}
        for name, setting in settings.items():
            with monkeypatch.context() as patch:
                for attribute, value in setting.items():
                    patch.setattr(findings, attribute, value)
                assert_trees_close(case.grad(case.L), exact)
                program = jax.make_jaxpr(hbpjax.highway_grad(case.loss, 0, iterations=0))(*case.args)
                batched[name] = _matmuls_batched_over(program, case.L)
    assert batched["unrolled"] == 0 and batched["small, by default"] > 0 and batched["rule off"] > 0, batched


def test_operand_labels_follow_values_through_scan_carries_and_conds():
    """What the rule reads: which inputs each matmul's operands are computed from, inside a jit, a
    scan (a value reaches the carry on the first trip and the matmul on the second) and a cond."""
    from hbpjax._analysis.jaxprs import operand_labels

    def f(w, h, p):
        def body(c, _):
            return c + h, jnp.tanh(c) @ w  # c reads h from the second trip on

        _, ys = jax.lax.scan(body, jnp.zeros_like(h), None, length=3)
        inner = jax.jit(lambda a, b: a @ b)(h, w)
        picked = jax.lax.cond(p > 0, lambda: h @ h.T, lambda: w @ w.T)
        return ys, inner, picked

    W, H = jnp.ones((4, 4)), jnp.ones((4, 4))
    jaxpr = jax.make_jaxpr(f)(W, H, 1.0).jaxpr
    w, h, p = jaxpr.invars
    found = [labels[:2] for _, labels in operand_labels(jaxpr.eqns, {w: 1, h: 2, p: 4}, ["dot_general"])]
    assert found == [(2, 1), (2, 1), (1, 1), (2, 2)], found  # a cond lists its false branch first


def test_shared_weights_stay_vmapped(monkeypatch):
    """An RNN's step multiplies by weights every step shares: vmapped, its matmuls fold into one
    plain matmul, so the rule leaves it vmapped (the same program with the rule switched off)."""
    from hbpjax._analysis import findings

    W, U = _normal(40, (D, D), 0.3, jnp.float32), _normal(41, (D, D), 0.3, jnp.float32)
    xs, h0 = _normal(42, (5, B, D), 1.0, jnp.float32), _normal(43, (B, D), 1.0, jnp.float32)

    def loss(W, U, xs, h0):
        h, _ = jax.lax.scan(lambda h, x: (h + jnp.tanh(h @ W + x @ U), None), h0, xs)
        return jnp.sum(h)

    grad = hbpjax.highway_grad(loss, (0, 1), iterations=0)
    monkeypatch.setattr(findings, "UNROLL_MATMUL_FLOPS", 0)  # whatever their size
    default = jax.make_jaxpr(grad)(W, U, xs, h0)
    monkeypatch.setattr(findings, "UNROLL_MATMULS", 0)
    switched_off = jax.make_jaxpr(grad)(W, U, xs, h0)
    assert count(default, "dot_general") == count(switched_off, "dot_general")


@pytest.mark.parametrize("unrolled", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_k0_on_a_loop_of_residual_layers_discounts_the_last_cotangent(gamma, unrolled, monkeypatch):
    """k = 0 on a Python loop ``h = h + f_j(h)`` against the definition written out by hand:
    layer ``j`` (of ``L``) gets ``a_j = (1 - gamma) ** (L - 1 - j) * g``, ``g`` the cotangent of
    the last ``h``; its weights get their VJP at ``a_j``, a weight shared by the layers the sum of
    theirs, and the input ``h0`` gets ``a_0 + J_0^T a_0``. Layers linearized vmapped (small
    matmuls, the default) and one by one (the CPU rule's bound set to 0)."""
    from hbpjax._analysis import findings

    if unrolled:
        monkeypatch.setattr(findings, "UNROLL_MATMUL_FLOPS", 0)
    L, d = 6, 4
    block = lambda h, w, s: jnp.tanh((h * s) @ w)

    def loss(W, s, h0):
        h = h0
        for j in range(L):
            h = h + block(h, W[j], s)
        return jnp.sum(jnp.sin(h) * h)

    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.key(21), 3)
        W = (0.6 / np.sqrt(d)) * jax.random.normal(ks[0], (L, d, d), jnp.float64)
        s = 1.0 + 0.1 * jax.random.normal(ks[1], (d,), jnp.float64)
        h0 = jax.random.normal(ks[2], (3, d), jnp.float64)
        got = jax.jit(hbpjax.highway_grad(loss, (0, 1, 2), iterations=0, gamma=gamma))(W, s, h0)

        hs = [h0]
        for j in range(L):
            hs.append(hs[-1] + block(hs[-1], W[j], s))
        g = jax.grad(lambda h: jnp.sum(jnp.sin(h) * h))(hs[-1])
        gW, gs = [], jnp.zeros_like(s)
        for j in range(L):
            a = (1.0 - gamma) ** (L - 1 - j) * g
            dh, dw, ds = jax.vjp(block, hs[j], W[j], s)[1](a)
            gW.append(dw)
            gs = gs + ds
            gh0 = a + dh if j == 0 else gh0
        assert_trees_close(got, (jnp.stack(gW), gs, gh0))
        # Not backprop: the layers' block paths do not reach each other at k = 0.
        assert tree_rel_error(got, jax.grad(loss, (0, 1, 2))(W, s, h0)) > 1e-3
