"""Shared test utilities: reference models, tolerances and jaxpr inspection."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

import hbpjax

# Per-dtype tolerances (as in lineax's tests/helpers.py).
TOL = {jnp.dtype("float64"): dict(rtol=1e-10, atol=1e-12), jnp.dtype("float32"): dict(rtol=2e-5, atol=2e-6)}


def assert_trees_close(actual, expected, rtol=None, atol=None):
    """``chex.assert_trees_all_close`` with per-dtype default tolerances (PRNG keys compared by data)."""
    chex.assert_trees_all_equal_structs(actual, expected)
    chex.assert_trees_all_equal_shapes(actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if jnp.issubdtype(jnp.result_type(e), jax.dtypes.prng_key):
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        tol = TOL.get(jnp.result_type(e), dict(rtol=1e-6, atol=1e-7))
        chex.assert_trees_all_close(
            np.asarray(a), np.asarray(e),
            rtol=tol["rtol"] if rtol is None else rtol, atol=tol["atol"] if atol is None else atol,
        )


def model_grad(loss, args, k=None, *, module=False, argnums=None, has_aux=False, **options):
    """The jitted gradient of ``loss`` at ``args``: exact (``k=None``: ``jax.grad`` / ``nnx.grad``)
    or with ``k`` highway sweeps. A module case (``module=True``) differentiates the ``nnx.Param``s
    of ``args[0]`` (a fresh clone per call: the same state every time); otherwise ``argnums``
    (default: every argument), without ``aux``."""
    if module:
        fn = nnx.grad(loss) if k is None else hbpjax.nnx.grad(loss, iterations=k, **options)
        return nnx.jit(fn)(nnx.clone(args[0]), *args[1:])
    argnums = tuple(range(len(args))) if argnums is None else argnums
    if k is None:
        fn = jax.grad(loss, argnums, has_aux=has_aux)
    else:
        fn = hbpjax.highway_grad(loss, argnums, has_aux=has_aux, iterations=k, **options)
    out = jax.jit(fn)(*args)
    return out[0] if has_aux else out


def fixture_over_cases(namespace: dict):
    """A ``case`` fixture over the module's ``case_<name>()`` builders, each built in float64."""
    cases = {name[len("case_") :]: fn for name, fn in sorted(namespace.items()) if name.startswith("case_")}

    @pytest.fixture(params=sorted(cases))
    def case(request):
        with jax.enable_x64(True):
            yield cases[request.param]()

    return case


def tree_rel_error(a, b) -> float:
    """``|a - b| / |b|`` over all leaves, in float64 on the host."""
    fa = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)])
    fb = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(fa - fb) / np.linalg.norm(fb))


def loops(closed_jaxpr):
    """All ``(primitive name, length)`` of scans and while loops, searched recursively."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                found.append(("scan", eqn.params["length"]))
            elif eqn.primitive.name == "while":
                found.append(("while", None))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


def equations(jaxpr):
    """Every equation of a (closed) jaxpr, those of the jaxprs it holds included."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from equations(sub)


def count(jaxpr, primitive: str) -> int:
    """How many ``primitive`` equations a (closed) jaxpr holds, at any depth."""
    return sum(eqn.primitive.name == primitive for eqn in equations(jaxpr))


def matmul_flops(jaxpr) -> int:
    """The multiply-adds (x 2) of every ``dot_general`` a (closed) jaxpr runs, a scan's body counted
    once per step: what a program costs in matmuls, read from the program, not from XLA."""

    def walk(jaxpr, times):
        total = 0
        for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
            if eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2 * times * int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in contract]))
            inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
            total += sum(walk(sub, inner) for sub in jaxprs_in_params(eqn.params))
        return total

    return walk(jaxpr, 1)


def scan_bodies(jaxpr) -> list:
    """The body of every scan a (closed) jaxpr holds, at any depth."""
    return [body for eqn in equations(jaxpr) if eqn.primitive.name == "scan" for body in jaxprs_in_params(eqn.params)]


def scan_both_ways(block, init, xs=None, **kw):
    """Trace residual_scan both plainly and under highway_grad: both must raise the same error."""
    errors = []
    for mode in ("plain", "highway"):
        def loss(s):
            final = hbpjax.residual_scan(block, init, xs, **kw)[0]
            return s * sum(jnp.sum(leaf) for leaf in jax.tree.leaves(final))

        try:
            loss(1.0) if mode == "plain" else hbpjax.highway_grad(loss, iterations=1)(1.0)
        except Exception as err:  # noqa: BLE001 - compared below, then re-raised
            errors.append(err)
        else:
            errors.append(None)
    plain, highway = errors
    assert type(plain) is type(highway) and str(plain) == str(highway), (plain, highway)
    if plain is not None:
        raise plain


# ----------------------------------------------------------------------------- reference models
# Each builder returns ``(loss, args)``; every positional argument is differentiable, so tests take
# ``argnums=tuple(range(len(args)))`` and compare highway against jax.grad on all of them.


def _readout(h_final, carries, loss_on):
    """Loss on the final carry only, or on every carry (an RNN's per-step loss)."""
    if loss_on == "final":
        return sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree.leaves(h_final))
    total = 0.0
    for x in jax.tree.leaves(carries):  # a different weight per step, so every e_i differs
        steps = jnp.arange(1, x.shape[0] + 1, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        total = total + jnp.sum(jnp.cos(x) * steps)
    return total


def mlp_stack(key, *, residual="additive", gamma=0.0, loss_on="final", L=7, d=4, batch=3, dtype=jnp.float64, linearize="vmap"):
    """Per-layer weights in ``xs`` plus a shared (closed-over) scale; residual additive/relu/custom."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    W = (0.6 / np.sqrt(d)) * jax.random.normal(k1, (L, d, d), dtype)
    b = 0.1 * jax.random.normal(k2, (L, d), dtype)
    scale = 1.0 + 0.1 * jax.random.normal(k3, (d,), dtype)
    h0 = jax.random.normal(k4, (batch, d), dtype)
    residuals = {
        "additive": hbpjax.residual.additive,
        "relu": hbpjax.residual.relu,
        "custom": custom_residual,
    }

    def loss(W, b, scale, h0):
        def block(h, wb):
            w, bias = wb
            return jnp.tanh((h * scale) @ w + bias)

        hL, hs = hbpjax.residual_scan(block, h0, (W, b), residual=residuals[residual], gamma=gamma, linearize=linearize)
        return _readout(hL, hs, loss_on)

    return loss, (W, b, scale, h0)


def custom_residual(h, z):
    """A user residual, elementwise in h with a non-constant diagonal: 0.5 sin(h) + h z + z."""
    return 0.5 * jnp.sin(h) + h * z + z


def gru_stack(key, *, gamma=0.0, loss_on="all", T=9, d=4, d_in=3, batch=2, dtype=jnp.float64, linearize="vmap"):
    """A GRU: shared weights closed over, per-step inputs in ``xs``, ``gated`` residual."""
    ks = jax.random.split(key, 6)
    s = 1.0 / np.sqrt(d)
    params = {
        "Wz": s * jax.random.normal(ks[0], (d_in, d), dtype),
        "Uz": s * jax.random.normal(ks[1], (d, d), dtype),
        "Wh": s * jax.random.normal(ks[2], (d_in, d), dtype),
        "Uh": s * jax.random.normal(ks[3], (d, d), dtype),
    }
    xs = jax.random.normal(ks[4], (T, batch, d_in), dtype)
    h0 = 0.5 * jax.random.normal(ks[5], (batch, d), dtype)

    def loss(params, xs, h0):
        def cell(h, x):
            u = jax.nn.sigmoid(x @ params["Wz"] + h @ params["Uz"])
            c = jnp.tanh(x @ params["Wh"] + h @ params["Uh"])
            return 1.0 - u, u * c

        hT, hs = hbpjax.residual_scan(cell, h0, xs, residual=hbpjax.residual.gated, gamma=gamma, linearize=linearize)
        return _readout(hT, hs, loss_on)

    return loss, (params, xs, h0)


def lstm_residual(carry, z):
    """LSTM combine on the carry (c, h) with z = (f, i*g, h_new): K = (f, 0)."""
    c, _ = carry
    f, ig, h_new = z
    return f * c + ig, h_new


def lstm_stack(key, *, residual="custom", gamma=0.0, loss_on="all", T=8, d=3, d_in=2, batch=2, dtype=jnp.float64):
    """An LSTM with a pytree carry ``(c, h)``; residual written by hand or as ``gated``."""
    ks = jax.random.split(key, 4)
    W = jax.random.normal(ks[0], (d_in, 4 * d), dtype) / np.sqrt(d_in)
    U = jax.random.normal(ks[1], (d, 4 * d), dtype) / np.sqrt(d)
    xs = jax.random.normal(ks[2], (T, batch, d_in), dtype)
    c0 = 0.3 * jax.random.normal(ks[3], (batch, d), dtype)
    h0 = jnp.tanh(c0)

    def loss(W, U, xs, c0, h0):
        def cell(carry, x):
            c, h = carry
            gates = x @ W + h @ U
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            i, f, o, g = jax.nn.sigmoid(i), jax.nn.sigmoid(f + 1.0), jax.nn.sigmoid(o), jnp.tanh(g)
            c_new = f * c + i * g
            h_new = o * jnp.tanh(c_new)
            if residual == "custom":
                return f, i * g, h_new
            return (f, jnp.zeros_like(h)), (i * g, h_new)  # gated: a = (f, 0), b = (i g, h_new)

        r = lstm_residual if residual == "custom" else hbpjax.residual.gated
        (cT, hT), (cs, hs) = hbpjax.residual_scan(cell, (c0, h0), xs, residual=r, gamma=gamma)
        return _readout((cT, hT), (cs, hs), loss_on)

    return loss, (W, U, xs, c0, h0)


def two_stacks(key, *, gamma=0.0, dtype=jnp.float64):
    """Two stacks in one function, the second fed by the first and sharing a weight with it."""
    k1, k2, k3 = jax.random.split(key, 3)
    W1 = 0.5 * jax.random.normal(k1, (5, 3, 3), dtype)
    shared = 0.5 * jax.random.normal(k2, (3, 3), dtype)
    h0 = jax.random.normal(k3, (2, 3), dtype)

    def loss(W1, shared, h0):
        h, _ = hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w + h @ shared), h0, W1, gamma=gamma)
        h2, hs2 = hbpjax.residual_scan(
            lambda h, _: jnp.sin(h @ shared), h, length=6, residual=hbpjax.residual.relu, gamma=gamma
        )
        return jnp.sum(h2**2) + jnp.mean(hs2)

    return loss, (W1, shared, h0)


# ----------------------------------------------------------------------------- sharded problems
# Used by test_sharding.py (data parallel) and test_layers.py (layer parallel).

SHARD_L, SHARD_D_IN, SHARD_H, SHARD_B = 16, 3, 8, 8


def sharded_mlp_problem():
    ks = jax.random.split(jax.random.key(0), 3)
    params = {
        "W": jax.random.normal(ks[0], (SHARD_L, SHARD_H, SHARD_H)) / np.sqrt(SHARD_H),
        "b": 0.1 * jax.random.normal(ks[1], (SHARD_L, SHARD_H)),
    }
    x = jax.random.normal(ks[2], (SHARD_B, SHARD_H))

    def loss(params, x, layer_axis=None, mesh=None, microbatches=None):
        block = lambda h, p: 0.5 * jnp.tanh(h @ p["W"] + p["b"])
        h, hs = hbpjax.residual_scan(block, x, params, layer_axis=layer_axis, mesh=mesh, microbatches=microbatches)
        return jnp.mean(h**2) + 0.1 * jnp.mean(jnp.sin(hs))

    return loss, params, x


def sharded_gru_problem():
    """Shared weights closed over, per-step inputs in xs: the layer axis is a time axis."""
    ks = jax.random.split(jax.random.key(1), 5)
    shapes = {"Wz": (SHARD_D_IN, SHARD_H), "Uz": (SHARD_H, SHARD_H), "Wh": (SHARD_D_IN, SHARD_H), "Uh": (SHARD_H, SHARD_H)}
    params = {n: jax.random.normal(k, s) / np.sqrt(s[0]) for (n, s), k in zip(shapes.items(), ks)}
    xs = jax.random.normal(ks[4], (SHARD_L, SHARD_B, SHARD_D_IN))

    def loss(params, xs, layer_axis=None, mesh=None):
        def cell(h, x):
            u = jax.nn.sigmoid(x @ params["Wz"] + h @ params["Uz"])
            return 1.0 - u, u * jnp.tanh(x @ params["Wh"] + h @ params["Uh"])

        h0 = 0.0 * jnp.sum(xs, axis=(0, 2))[:, None] + jnp.zeros(SHARD_H)  # zeros sharded like the batch
        _, hs = hbpjax.residual_scan(cell, h0, xs, residual=hbpjax.residual.gated, layer_axis=layer_axis, mesh=mesh)
        return jnp.mean(jnp.cos(hs) * jnp.arange(1.0, SHARD_L + 1)[:, None, None])

    return loss, params, xs


def layer_parallel_variant(variant, mesh, L=8, microbatches=None):
    """A stack of each residual kind, with `layer_axis` (and `microbatches`) when `mesh` is given, in float64."""
    ks = jax.random.split(jax.random.key(40), 4)
    W = (0.6 / np.sqrt(SHARD_H)) * jax.random.normal(ks[0], (L, SHARD_H, SHARD_H), jnp.float64)
    U = (0.6 / np.sqrt(SHARD_H)) * jax.random.normal(ks[1], (SHARD_H, 4 * SHARD_H), jnp.float64)
    x = jax.random.normal(ks[2], (SHARD_B, SHARD_H), jnp.float64)
    options = dict(layer_axis="layers", mesh=mesh, microbatches=microbatches) if mesh is not None else {}
    if variant == "unroll":
        options["linearize"] = "unroll"
    if variant == "gamma":
        options["gamma"] = 0.3

    def loss(W, U, x):
        if variant == "lstm":  # a pytree carry (c, h), shared U closed over, per-layer W in xs
            def cell(carry, w):
                c, h = carry
                i, f, g, o = jnp.split(h @ U + jnp.tile(h @ w, 4), 4, axis=-1)
                f, i, o, g = jax.nn.sigmoid(f), jax.nn.sigmoid(i), jax.nn.sigmoid(o), jnp.tanh(g)
                return (f, jnp.zeros_like(h)), (i * g, o * jnp.tanh(f * c + i * g))

            (c, h), (cs, hs) = hbpjax.residual_scan(cell, (x, jnp.tanh(x)), W, residual=hbpjax.residual.gated, **options)
            return jnp.sum(jnp.sin(hs)) + jnp.sum(c**2)
        if variant == "gated":
            block = lambda h, w: (jax.nn.sigmoid(h @ w), jnp.tanh(h @ U[:, :SHARD_H]))
            residual = hbpjax.residual.gated
        else:
            block, residual = (lambda h, w: 0.7 * jnp.tanh(h @ w)), hbpjax.residual.relu if variant == "relu" else hbpjax.residual.additive
        h, hs = hbpjax.residual_scan(block, x, W, residual=residual, **options)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(h**2)

    return loss, (W, U, x)


class PreLNBlock(nnx.Module):
    """A pre-LN Transformer layer from Flax's own modules."""

    def __init__(self, dim, heads, *, rngs):
        f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)
        self.norm1, self.norm2 = nnx.LayerNorm(dim, rngs=rngs, **f64), nnx.LayerNorm(dim, rngs=rngs, **f64)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs, **f64)
        self.fc1, self.fc2 = nnx.Linear(dim, 2 * dim, rngs=rngs, **f64), nnx.Linear(2 * dim, dim, rngs=rngs, **f64)

    def __call__(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.fc2(jax.nn.gelu(self.fc1(self.norm2(h))))


class ScannedTransformer(nnx.Module):
    """Layers stacked with nnx.vmap and run by nnx.scan, as large Flax models are written."""

    def __init__(self, layers, dim, heads, *, rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return PreLNBlock(dim, heads, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, h):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(h, layer):
            return layer(h)

        return run(h, self.layers)


def highway_value_and_grads(loss, k, *args, **kw):
    """Jitted ``(value, grads)`` of ``loss(a, b, **kw)`` in both arguments with ``k`` sweeps."""
    return jax.jit(hbpjax.highway_value_and_grad(lambda a, b: loss(a, b, **kw), (0, 1), iterations=k))(*args)


# ----------------------------------------------------------------------- Highway-BP by definition


def highway_by_definition(step, k_of, params, h0, xs, c, k):
    """Highway-BP from its definition with dense Jacobians, in float64: an independent reference.

    For ``h_j = step(params, h_{j-1}, x_j)`` and the loss ``sum_j <c_j, h_j>``, with ``K_j`` the
    diagonal the split gives (``k_of(params, h_{j-1}, x_j)``, written by hand) and ``J_j`` the rest
    of the dense Jacobian ``A_j``::

        w^0_j     = c_j + K_{j+1} w^0_{j+1}
        w^{m+1}_j = c_j + J_{j+1}^T w^m_{j+1} + K_{j+1} w^{m+1}_{j+1}

    (paths through at most ``k`` blocks). Returns the cotangents ``(params, xs, h0)`` read off
    ``w^k``: each step's VJP at ``w_j``, and ``A_1^T w_1`` for ``h0``.
    """
    L = jax.tree.leaves(xs)[0].shape[0]
    at = lambda j: jax.tree.map(lambda a: a[j], xs)
    hs = [h0]
    for j in range(L):
        hs.append(step(params, hs[-1], at(j)))
    n = h0.size
    A = [np.asarray(jax.jacfwd(lambda h: step(params, h, at(j)))(hs[j])).reshape(n, n) for j in range(L)]
    K = [np.asarray(k_of(params, hs[j], at(j))).ravel() for j in range(L)]
    J = [a - np.diag(kj) for a, kj in zip(A, K)]
    e = [np.asarray(c[j]).ravel() for j in range(L)]

    def solve(extra):  # w_j = e_j + extra_j + K_{j+1} w_{j+1}, w_{L-1} = e_{L-1}
        w = [None] * L
        w[L - 1] = e[L - 1]
        for j in range(L - 2, -1, -1):
            w[j] = e[j] + extra[j] + K[j + 1] * w[j + 1]
        return w

    w = solve([np.zeros(n)] * L)
    for _ in range(k):
        w = solve([J[j + 1].T @ w[j + 1] if j + 1 < L else np.zeros(n) for j in range(L)])
    g_params = jax.tree.map(np.zeros_like, params)
    g_xs = []
    for j in range(L):
        _, vjp = jax.vjp(lambda p, x: step(p, hs[j], x), params, at(j))
        gp, gx = vjp(jnp.asarray(w[j]).reshape(h0.shape))
        g_params = jax.tree.map(lambda a, b: a + np.asarray(b), g_params, gp)
        g_xs.append(gx)
    g_xs = jax.tree.map(lambda *a: np.stack(a), *g_xs)
    g_h0 = (A[0].T @ w[0]).reshape(h0.shape)
    return g_params, g_xs, g_h0


def source_file(source: str) -> str:
    """The absolute path of the file in a ``find_stacks`` / ``SweepReport`` source ``file:line``."""
    return os.path.abspath(source.rsplit(":", 1)[0])
