"""Microbatched layer-parallel stacks (``microbatches=M`` beside ``layer_axis``) on 8 simulated devices.

The forward runs as a pipeline of ``M + D - 1`` ticks; the highway backward sweeps all microbatches
at once. Every result is compared with the same computation on one device (and with ``jax.grad`` in
float64 at ``k >= L``); the compiled programs are read for the schedule. (The nnx.scan Transformer
pipelined is in test_layers.py, beside its layer-parallel form.)
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import SHARD_B as B
from helpers import SHARD_H as H
from helpers import (
    assert_trees_close,
    layer_parallel_variant,
    tree_rel_error,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import hbpjax

pytestmark = pytest.mark.usefixtures("eight_devices")


def _stack_loss(W, x, **kw):
    """A residual_scan whose loss weighs every example and every layer's output differently, so a
    microbatch joined back in the wrong order changes it."""
    h, hs = hbpjax.residual_scan(lambda h, w: 0.5 * jnp.tanh(h @ w), x, W, **kw)
    rows = jnp.arange(1.0, x.shape[0] + 1)[:, None]
    return jnp.sum(jnp.sin(h) * rows) + jnp.mean(jnp.cos(hs) * rows * jnp.arange(1.0, W.shape[0] + 1)[:, None, None])


def _stack_problem(L=16, dtype=jnp.float64):
    W = (0.8 / np.sqrt(H)) * jax.random.normal(jax.random.key(60), (L, H, H), dtype)
    x = jax.random.normal(jax.random.key(61), (B, H), dtype)
    return W, x


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("microbatches", [2, 4, 8])
def test_pipelined_residual_scan_equals_one_device(devices, microbatches):
    """At k = 0, 2 equal to one device; at k >= L and with iterations=None (JAX's transpose of
    the pipeline) and under plain jax.grad equal to jax.grad in float64."""
    with jax.enable_x64(True):
        W, x = _stack_problem()
        L = W.shape[0]
        exact = jax.grad(_stack_loss, (0, 1))(W, x)
        mesh = jax.make_mesh((devices,), ("layers",), devices=jax.devices()[:devices])
        piped = lambda W, x: _stack_loss(W, x, layer_axis="layers", mesh=mesh, microbatches=microbatches)
        for k in (0, 2):
            got = jax.jit(hbpjax.highway_grad(piped, (0, 1), iterations=k))(W, x)
            assert_trees_close(got, hbpjax.highway_grad(_stack_loss, (0, 1), iterations=k)(W, x), rtol=1e-10, atol=1e-12)
        for fn in (hbpjax.highway_grad(piped, (0, 1), iterations=L), hbpjax.highway_grad(piped, (0, 1), iterations=None), jax.grad(piped, (0, 1))):
            assert_trees_close(jax.jit(fn)(W, x), exact, rtol=1e-10, atol=1e-12)
        assert tree_rel_error(hbpjax.highway_grad(_stack_loss, (0, 1), iterations=2)(W, x), exact) > 1e-6


@pytest.mark.parametrize("variant", ["relu", "gated", "lstm", "gamma", "tol", "unroll"])
def test_pipelined_variants_equal_jax_grad_in_float64(variant):
    """Every residual kind and carry structure, 4 devices, 4 microbatches: k >= L is jax.grad."""
    with jax.enable_x64(True):
        mesh = jax.make_mesh((4,), ("layers",), devices=jax.devices()[:4])
        loss, args = layer_parallel_variant(variant, mesh, microbatches=4)
        single, _ = layer_parallel_variant(variant, None)
        exact = jax.grad(single, (0, 1, 2))(*args)
        options = dict(iterations=8, tol=1e-13) if variant == "tol" else dict(iterations=8)
        got = jax.jit(hbpjax.highway_grad(loss, (0, 1, 2), **options))(*args)
        assert_trees_close(got, exact, rtol=1e-9, atol=1e-11)
        one = jax.jit(hbpjax.highway_grad(single, (0, 1, 2), iterations=1))(*args)
        assert_trees_close(jax.jit(hbpjax.highway_grad(loss, (0, 1, 2), iterations=1))(*args), one, rtol=1e-9, atol=1e-11)


def _scan_loss(W, x):
    """An unmodified `lax.scan` over stacked layers, every example weighted differently."""
    h, hs = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), h), x, W)
    return jnp.sum(jnp.sin(h) * jnp.arange(1.0, x.shape[0] + 1)[:, None]) + jnp.mean(hs**2)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_transform_microbatches_on_an_unmodified_scan_with_a_data_axis(axis_type):
    """`highway_grad(layer_axis="layers", microbatches=M)` on a 2 x 4 (data x layers) mesh, the
    weights sharded P("layers"), the batch P("data"): equal to one device, sharded like the weights."""
    with jax.enable_x64(True):
        W0, x0 = _stack_problem()
        L = W0.shape[0]
        exact = jax.grad(_scan_loss)(W0, x0)
        mesh = jax.make_mesh((2, 4), ("data", "layers"), axis_types=(axis_type,) * 2)
        with jax.set_mesh(mesh):
            W = jax.device_put(W0, NamedSharding(mesh, P("layers")))
            x = jax.device_put(x0, NamedSharding(mesh, P("data")))
            for M in (2, 4):
                for k in (2, L, None):
                    got = jax.jit(hbpjax.highway_grad(_scan_loss, iterations=k, layer_axis="layers", microbatches=M))(W, x)
                    assert got.sharding.spec[0] == "layers"
                    expected = exact if k in (L, None) else hbpjax.highway_grad(_scan_loss, iterations=k)(W0, x0)
                    assert_trees_close(np.asarray(got), expected, rtol=1e-10, atol=1e-11)


def test_microbatches_errors():
    W, x = _stack_problem(dtype=jnp.float32)
    mesh = jax.make_mesh((4,), ("layers",), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"hbpjax.highway_grad: microbatches=4 pipelines a layer-parallel forward; pass layer_axis="):
        hbpjax.highway_grad(_scan_loss, microbatches=4)
    with pytest.raises(ValueError, match=r"hbpjax.residual_scan: microbatches=2 pipelines a layer-parallel forward"):
        _stack_loss(W, x, microbatches=2)
    with pytest.raises(TypeError, match=r"hbpjax.highway_grad: `microbatches` must be an int >= 1 or None; got 2.0"):
        hbpjax.highway_grad(_scan_loss, layer_axis="layers", microbatches=2.0)
    with pytest.raises(ValueError, match=r"hbpjax.Options: `microbatches` must be >= 1; got 0"):
        hbpjax.Options(layer_axis="layers", microbatches=0)
    with pytest.raises(ValueError, match=r"microbatches=3 splits the leading \(batch\) axis of every carry leaf; carry leaf 0 has shape \(8, 8\)"):
        jax.grad(_stack_loss)(W, x, layer_axis="layers", mesh=mesh, microbatches=3)
    # Found stacks: the batch is the arguments not differentiated; the function is traced on 1/M of it.
    with jax.set_mesh(mesh):
        Ws = jax.device_put(W, NamedSharding(mesh, P("layers")))
        with pytest.raises(ValueError, match=r"microbatches=3 splits the leading \(batch\) axis of every array of argument 1 \(not differentiated\); it has shape \(8, 8\)"):
            hbpjax.highway_grad(_scan_loss, iterations=2, layer_axis="layers", microbatches=3)(Ws, x)
        # a loss written for one batch size (a constant of shape (8, 1)) cannot be traced on a microbatch
        fixed = lambda W, x: jnp.sum(jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)[0] * jnp.ones((B, 1)))
        with pytest.raises(ValueError, match=r"microbatches=2 traces the function again on 1/2 of the batch.*TypeError"):
            hbpjax.highway_grad(fixed, iterations=2, layer_axis="layers", microbatches=2)(Ws, x)
    # An RNN over time: its per-step inputs have a batch axis, which microbatches do not split.
    V = jnp.ones((3, H)) / 3
    inputs = jax.random.normal(jax.random.key(63), (16, B, 3))
    rnn = lambda W, xs: hbpjax.residual_scan(
        lambda h, x: jnp.tanh(h @ W[0] + x @ V), jnp.zeros((B, H)), xs, layer_axis="layers", mesh=mesh, microbatches=2
    )[0].sum()
    with pytest.raises(ValueError, match=r"microbatches=2 each layer runs on 4 rows of the carry.*\(TypeError: .*cannot be split"):
        hbpjax.highway_grad(rnn, iterations=2)(W, inputs)
    # A per-step output that depends on the batch without a batch axis (a mean over examples).
    batch_mean = lambda W, x: hbpjax.residual_scan(
        lambda h, w: (jnp.tanh(h @ w), jnp.mean(h)), x, W, layer_axis="layers", mesh=mesh, microbatches=2, has_aux=True
    )[0].sum()
    with pytest.raises(ValueError, match=r"microbatches=2, per-step output 1 \(shape \(\) per step\) depends on the batch but has no batch axis"):
        hbpjax.highway_grad(batch_mean, iterations=2)(W, x)


def _loops_and_collectives(text):
    """``([(trip count, collectives in its body)] of every while loop, total collectives)`` of
    compiled HLO text."""
    bodies, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = bodies.setdefault(head.group(1), [])
        elif line.strip() == "}":
            current = None
        elif current is not None:
            current.append(line)
    is_collective = lambda line: re.search(r" (collective-permute|all-reduce|all-gather|all-to-all)(-start)?\(", line)
    loops = []
    for line in text.splitlines():
        if " while(" in line:
            trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
            body = bodies[re.search(r"body=%?([\w.\-]+)", line).group(1)]
            loops.append((int(trips.group(1)) if trips else None, sum(bool(is_collective(x)) for x in body)))
    return loops, sum(bool(is_collective(x)) for lines in bodies.values() for x in lines)


def _compiled(D, M, k):
    W0, _ = _stack_problem(dtype=jnp.float32)
    x0 = jax.random.normal(jax.random.key(65), (32, H))  # 4 rows per microbatch or more
    mesh = jax.make_mesh((D,), ("layers",), devices=jax.devices()[:D], axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        W = jax.device_put(W0, NamedSharding(mesh, P("layers")))
        fn = jax.jit(hbpjax.highway_grad(_scan_loss, iterations=k, layer_axis="layers", microbatches=M))
        return fn.lower(W, x0).compile().as_text()


@pytest.mark.parametrize("D", [2, 4])
def test_schedule_read_from_the_compiled_program(D):
    """The forward is one loop of M + D - 1 ticks, one collective hop per tick, whatever M; the
    exact backward (iterations=None, JAX's transpose) is a second such loop; the highway backward
    adds 2 collectives per sweep, for every M, and holds one loop, of M trips without collectives
    (the parameters' cotangents accumulated); the program does not grow with M."""
    sizes = {}
    for M in (2, 4, 8):
        ticks = lambda loops: [n for n, c in loops if c]
        exact, _ = _loops_and_collectives(_compiled(D, M, None))
        assert ticks(exact) == [M + D - 1] * 2 and all(c == 1 for n, c in exact if c), exact
        totals = {}
        for k in (0, 1, 2):
            text = _compiled(D, M, k)
            loops, totals[k] = _loops_and_collectives(text)
            assert ticks(loops) == [M + D - 1] and all(c == 1 for n, c in loops if c), loops
            # the ticks, the chunk's layers inside them, and in the backward only the accumulation of
            # the parameters' cotangents over the M microbatches (no collective in it)
            assert sorted(loops) == sorted([(M + D - 1, 1), (16 // D, 0), (M, 0)]), loops
            sizes.setdefault(k, []).append(len(text.splitlines()))
        assert totals[1] - totals[0] == totals[2] - totals[1] == 2, totals
    for k, lines in sizes.items():  # M = 2, 4, 8: the same program, up to a few lines of shapes
        assert max(lines) - min(lines) <= 0.02 * min(lines), (k, lines)


def test_nnx_residual_stack_with_microbatches():
    """hbpjax.nnx.ResidualStack(layer_axis=, microbatches=) on a 2 x 4 mesh: equal to one device;
    a BatchNorm block (statistics over the batch, returned per layer) is a clear error."""

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(H, rngs=rngs)
            self.linear = nnx.Linear(H, H, rngs=rngs)

        def __call__(self, h):
            return 0.5 * jnp.tanh(self.linear(self.norm(h)))

    mesh = jax.make_mesh((2, 4), ("data", "layers"))
    x = jax.random.normal(jax.random.key(64), (B, H))
    loss_fn = lambda m, x: jnp.mean(m(x) ** 2 * jnp.arange(1.0, x.shape[0] + 1)[:, None])
    single = hbpjax.nnx.ResidualStack(Block, 8, rngs=nnx.Rngs(0))
    split = hbpjax.nnx.ResidualStack(Block, 8, rngs=nnx.Rngs(0), layer_axis="layers", mesh=mesh, microbatches=4)
    for k in (None, 1, 8):
        expected = nnx.jit(hbpjax.nnx.value_and_grad(loss_fn, iterations=k))(single, x)
        with jax.set_mesh(mesh):
            got = nnx.jit(hbpjax.nnx.value_and_grad(loss_fn, iterations=k))(split, jax.device_put(x, NamedSharding(mesh, P("data"))))
        assert_trees_close(got, expected, rtol=2e-5, atol=2e-6)

    class NormBlock(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.BatchNorm(H, rngs=rngs)

        def __call__(self, h):
            return jnp.tanh(self.norm(h))

    batch_norm = hbpjax.nnx.ResidualStack(NormBlock, 4, rngs=nnx.Rngs(0), layer_axis="layers", mesh=mesh, microbatches=2)
    with pytest.raises(ValueError, match=r"hbpjax.nnx.ResidualStack: hbpjax.residual_scan: with microbatches=2, per-step output \d+ \(shape \(8,\) per step\) depends on the batch"):
        with jax.set_mesh(mesh):
            hbpjax.nnx.grad(loss_fn, iterations=2)(batch_norm, x)


def test_linen_residual_stack_with_microbatches():
    """hbpjax.linen.ResidualStack(layer_axis=, microbatches=) on a 2 x 4 Auto mesh: equal to the
    same module on one device."""

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h):
            return 0.5 * jnp.tanh(nn.Dense(H)(nn.LayerNorm()(h)))

    mesh = jax.make_mesh((2, 4), ("data", "layers"), axis_types=(AxisType.Auto,) * 2)
    x = jax.random.normal(jax.random.key(66), (B, H))
    single = hbpjax.linen.ResidualStack(Block, num_layers=8)
    piped = hbpjax.linen.ResidualStack(Block, num_layers=8, layer_axis="layers", mesh=mesh, microbatches=4)
    variables = single.init(jax.random.key(67), x)
    loss = lambda module: lambda v, x: jnp.mean(module.apply(v, x) ** 2 * jnp.arange(1.0, x.shape[0] + 1)[:, None])
    for k in (None, 1, 8):
        expected = hbpjax.highway_value_and_grad(loss(single), iterations=k)(variables, x)
        with jax.set_mesh(mesh):
            got = jax.jit(hbpjax.highway_value_and_grad(loss(piped), iterations=k))(variables, x)
        assert_trees_close(got, expected, rtol=2e-5, atol=2e-6)
