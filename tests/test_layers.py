"""Layer-parallel stacks (``layer_axis``, :mod:`hbpjax._backward.layers`) on 8 simulated CPU devices.

The L layers are split in contiguous chunks over a mesh axis; every result is compared with the same
computation on one device, and the compiled HLO is checked for what crosses devices.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import SHARD_B as B
from helpers import SHARD_H as H
from helpers import SHARD_L as L
from helpers import (
    ScannedTransformer,
    assert_trees_close,
    highway_value_and_grads,
    layer_parallel_variant,
    sharded_gru_problem,
    sharded_mlp_problem,
    tree_rel_error,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import hbpjax

RTOL, ATOL = 2e-5, 2e-6


pytestmark = pytest.mark.usefixtures("eight_devices")


@pytest.mark.parametrize("problem", [sharded_mlp_problem, sharded_gru_problem])
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_layer_parallel_equals_single_device(problem, devices):
    loss, params, data = problem()
    mesh = jax.make_mesh((devices,), ("layers",), devices=jax.devices()[:devices])
    for k in (None, 0, 2, L):
        expected = highway_value_and_grads(loss, k, params, data)
        with jax.set_mesh(mesh):
            got = highway_value_and_grads(loss, k, params, data, layer_axis="layers")
        assert_trees_close(got, expected, rtol=RTOL, atol=ATOL)
    exact = highway_value_and_grads(loss, None, params, data)
    assert tree_rel_error(highway_value_and_grads(loss, 0, params, data)[1], exact[1]) > 1e-4  # k=0 differs: not vacuous


@pytest.mark.parametrize(
    "problem, axis_type",
    # The GRU's block closes over its (replicated) weights; under a shard_map, JAX accepts closed-over
    # arrays with Auto axes, not arrays typed with Explicit ones. Per-layer parameters travel in xs.
    [(sharded_mlp_problem, AxisType.Explicit), (sharded_mlp_problem, AxisType.Auto), (sharded_gru_problem, AxisType.Auto)],
)
def test_layer_parallel_on_a_2d_mesh_keeps_shardings(problem, axis_type):
    loss, params, data = problem()
    mesh = jax.make_mesh((2, 4), ("data", "layers"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
        if problem is sharded_mlp_problem:  # per-layer parameters live with their layers
            params = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("layers"))), params)
            data = jax.device_put(data, NamedSharding(mesh, P("data")))
        else:  # per-step inputs: time chunks over "layers", batch over "data"; shared weights replicated
            params = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), params)
            data = jax.device_put(data, NamedSharding(mesh, P("layers", "data")))
        shardings = jax.tree.map(lambda a: a.sharding, (params, data))
        for k in (None, 2):
            fn = hbpjax.highway_value_and_grad(lambda p, x: loss(p, x, layer_axis="layers"), (0, 1), iterations=k)
            got = jax.jit(fn, out_shardings=(NamedSharding(mesh, P()), shardings))(params, data)
            assert_trees_close(got, highway_value_and_grads(loss, k, *jax.device_get((params, data))), rtol=RTOL, atol=ATOL)
            for g, p in zip(jax.tree.leaves(got[1]), jax.tree.leaves((params, data))):
                assert g.sharding.is_equivalent_to(p.sharding, g.ndim), (g.sharding, p.sharding)


def _collectives(compiled_text):
    """``(kind, result shape)`` of every cross-device collective in compiled HLO text."""
    found = []
    for line in compiled_text.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\][^ ]* (all-gather|all-reduce|collective-permute|all-to-all)(-start)?\(", line)
        if m:
            found.append((m.group(2), tuple(int(d) for d in m.group(1).split(",") if d)))
    return found


def test_highway_backward_gathers_no_stacked_activations():
    loss, params, data = sharded_gru_problem()
    devices = 4
    mesh = jax.make_mesh((devices,), ("layers",), devices=jax.devices()[:devices])
    with jax.set_mesh(mesh):
        grad = lambda k: jax.jit(hbpjax.highway_grad(lambda p, x: loss(p, x, layer_axis="layers"), (0, 1), iterations=k))
        highway = _collectives(grad(2).lower(params, data).compile().as_text())
        exact = _collectives(grad(None).lower(params, data).compile().as_text())
    carry_size = B * H
    # Nothing bigger than a per-device summary (devices x carry) or a parameter ever crosses devices.
    largest = max(int(np.prod(s)) for _, s in highway)
    assert largest <= max(devices * carry_size, max(p.size for p in jax.tree.leaves(params))), highway
    assert not any(kind == "all-gather" and int(np.prod(s)) >= L * carry_size for kind, s in highway)
    # The exact backward walks the chain back: as many hops as the forward.
    hops = lambda found: sum(kind == "collective-permute" for kind, _ in found)
    assert hops(exact) >= 2 * (devices - 1)
    assert hops(exact) > hops(highway) - 3  # highway: forward hops + a constant number per backward


def test_nnx_residual_stack_layer_parallel():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(H, rngs=rngs)
            self.linear = nnx.Linear(H, H, rngs=rngs)

        def __call__(self, h):
            return 0.5 * jnp.tanh(self.linear(self.norm(h)))

    mesh = jax.make_mesh((2, 4), ("data", "layers"))
    x = jax.random.normal(jax.random.key(3), (B, H))
    loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    single = hbpjax.nnx.ResidualStack(Block, 8, rngs=nnx.Rngs(0))
    split = hbpjax.nnx.ResidualStack(Block, 8, rngs=nnx.Rngs(0), layer_axis="layers", mesh=mesh)
    for k in (None, 1, 8):
        expected = nnx.jit(hbpjax.nnx.value_and_grad(loss_fn, iterations=k))(single, x)
        with jax.set_mesh(mesh):
            got = nnx.jit(hbpjax.nnx.value_and_grad(loss_fn, iterations=k))(split, jax.device_put(x, NamedSharding(mesh, P("data"))))
        assert_trees_close(got, expected, rtol=RTOL, atol=ATOL)


def test_errors_layer_axis():
    loss, params, data = sharded_mlp_problem()
    mesh = jax.make_mesh((8,), ("layers",))
    with pytest.raises(ValueError, match=r"hbpjax.residual_scan: 16 layers cannot be split evenly over the 3 devices"):
        loss(params, data, layer_axis="layers", mesh=jax.make_mesh((3,), ("layers",), devices=jax.devices()[:3]))
    with pytest.raises(ValueError, match=r"layer_axis='stages' is not an axis of the mesh; its axes are \('layers',\)"):
        loss(params, data, layer_axis="stages", mesh=mesh)
    with pytest.raises(ValueError, match=r"layer_axis='layers' needs a device mesh"):
        loss(params, data, layer_axis="layers")


@pytest.mark.parametrize("variant", ["relu", "gated", "lstm", "gamma", "tol", "unroll"])
def test_layer_parallel_equals_jax_grad_in_float64(variant):
    """k >= L on 4 devices against jax.grad of the same stack on one device; `mesh=` is passed
    without `jax.set_mesh` (as the docstring allows)."""
    with jax.enable_x64(True):
        mesh = jax.make_mesh((4,), ("layers",), devices=jax.devices()[:4])
        loss, args = layer_parallel_variant(variant, mesh)
        single, _ = layer_parallel_variant(variant, None)
        argnums = (0, 1, 2)
        exact = jax.grad(single, argnums)(*args)
        options = dict(iterations=8, tol=1e-13) if variant == "tol" else dict(iterations=8)
        got = jax.jit(hbpjax.highway_grad(loss, argnums, **options))(*args)
        assert_trees_close(got, exact, rtol=1e-9, atol=1e-11)
        assert tree_rel_error(jax.jit(hbpjax.highway_grad(loss, argnums, iterations=1))(*args), exact) > 1e-6


def test_mesh_argument_without_set_mesh_eager_and_jitted():
    mesh = jax.make_mesh((2,), ("layers",), devices=jax.devices()[:2])
    W = 0.3 * jax.random.normal(jax.random.key(41), (4, 3, 3))

    def loss(W):
        h, _ = hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), jnp.ones(3), W, layer_axis="layers", mesh=mesh)
        return jnp.sum(h)

    expected = jax.grad(lambda W: jnp.sum(hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), jnp.ones(3), W)[0]))(W)
    for fn in (jax.grad(loss), jax.jit(jax.grad(loss)), hbpjax.highway_grad(loss, iterations=4), jax.jit(hbpjax.highway_grad(loss, iterations=4))):
        assert_trees_close(fn(W), expected, rtol=RTOL, atol=ATOL)


def test_mesh_argument_on_a_default_explicit_mesh_with_sharded_weights():
    """`mesh=` only (no `jax.set_mesh`), on a default (Explicit) mesh, with the weights put on
    P("layers"): their types carry the mesh, so the cotangents must too (this raised `Expected
    cotangent type float32[32@layers,8,8] but got float32[32,8,8]`)."""
    mesh = jax.make_mesh((8,), ("layers",))
    assert mesh.axis_types == (AxisType.Explicit,)
    with jax.enable_x64(True):
        W = 0.3 * jax.random.normal(jax.random.key(43), (32, 8, 8), jnp.float64)
        x = jax.random.normal(jax.random.key(44), (4, 8), jnp.float64)
        block = lambda h, w: jnp.tanh(h @ w)
        loss = lambda W, x: jnp.sum(hbpjax.residual_scan(block, x, W, layer_axis="layers", mesh=mesh)[0] ** 2)
        plain = lambda W, x: jnp.sum(hbpjax.residual_scan(block, x, W)[0] ** 2)
        Ws = jax.device_put(W, NamedSharding(mesh, P("layers")))
        exact = jax.grad(plain)(W, x)
        for k in (None, 2, 32):
            got = jax.jit(hbpjax.highway_grad(loss, iterations=k))(Ws, x)
            assert got.sharding.spec[0] == "layers"  # sharded like the parameters
            assert_trees_close(np.asarray(got), hbpjax.highway_grad(plain, iterations=k)(W, x))
        assert_trees_close(np.asarray(jax.jit(hbpjax.highway_grad(loss, iterations=32))(Ws, x)), exact)


# ----------------------------------------------------- layer_axis on the transforms: found stacks


def _scan_loss(W, x):
    """An unmodified `lax.scan` over stacked layers: nothing of hbpjax in the model."""
    h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)
    return jnp.sum(jnp.sin(h))


def _scan_problem(L=16, width=6, batch=4, dtype=jnp.float64):
    W = 0.4 * jax.random.normal(jax.random.key(51), (L, width, width), dtype)
    x = jax.random.normal(jax.random.key(52), (batch, width), dtype)
    return W, x


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_transform_layer_axis_on_an_unmodified_scan_equals_one_device(axis_type):
    """A `lax.scan` over weights sharded P("layers") on a 2 x 4 (data x layers) mesh runs
    layer-parallel under `highway_grad(layer_axis="layers")`: equal to one device at k = 2 and
    k >= L (and to jax.grad there), the gradient sharded like the weights, 1/4 of it per device."""
    with jax.enable_x64(True):
        W0, x0 = _scan_problem()
        L = W0.shape[0]
        exact = jax.grad(_scan_loss)(W0, x0)
        mesh = jax.make_mesh((2, 4), ("data", "layers"), axis_types=(axis_type,) * 2)
        with jax.set_mesh(mesh):
            W = jax.device_put(W0, NamedSharding(mesh, P("layers")))
            x = jax.device_put(x0, NamedSharding(mesh, P("data")))
            assert W.addressable_shards[0].data.shape == (L // 4, *W0.shape[1:])  # 1/D of the weights per device
            for k in (2, L):
                got = jax.jit(hbpjax.highway_grad(_scan_loss, iterations=k, layer_axis="layers"))(W, x)
                assert got.sharding.spec[0] == "layers"
                assert got.addressable_shards[0].data.shape == (L // 4, *W0.shape[1:])
                assert_trees_close(np.asarray(got), hbpjax.highway_grad(_scan_loss, iterations=k)(W0, x0))
            got = jax.jit(hbpjax.highway_grad(_scan_loss, iterations=L, layer_axis="layers"))(W, x)
            eager = hbpjax.highway_grad(_scan_loss, iterations=2, layer_axis="layers")(W, x)  # no jax.jit
            assert_trees_close(np.asarray(eager), hbpjax.highway_grad(_scan_loss, iterations=2)(W0, x0))
            # iterations=None: the same pipeline, differentiated exactly by JAX
            pipelined_exact = jax.jit(hbpjax.highway_grad(_scan_loss, iterations=None, layer_axis="layers"))(W, x)
            assert pipelined_exact.sharding.spec[0] == "layers"
        assert_trees_close(np.asarray(got), exact)
        assert_trees_close(np.asarray(pipelined_exact), exact)
        assert tree_rel_error(hbpjax.highway_grad(_scan_loss, iterations=2)(W0, x0), exact) > 1e-6  # k=2 is not exact


def test_transform_layer_axis_collectives_do_not_grow_with_the_layer_devices():
    """Compiled step of the found stack on D = 2, 4, 8 layer devices: beyond the forward's D - 1
    hops of the carry, the collectives do not grow with D, and the stacked weights are never
    gathered (nothing shaped like a layer's weight crosses devices in an all-gather)."""
    W0, x0 = _scan_problem(dtype=jnp.float32)
    counts = {}
    for D in (2, 4, 8):
        mesh = jax.make_mesh((8 // D, D), ("data", "layers"))
        with jax.set_mesh(mesh):
            W = jax.device_put(W0, NamedSharding(mesh, P("layers")))
            x = jax.device_put(x0, NamedSharding(mesh, P("data")))
            fn = jax.jit(hbpjax.highway_grad(_scan_loss, iterations=2, layer_axis="layers"))
            found = _collectives(fn.lower(W, x).compile().as_text())
        assert not any(kind == "all-gather" and s[-2:] == W0.shape[1:] for kind, s in found), found
        counts[D] = len(found) - (D - 1)
    assert counts[8] <= counts[4] <= counts[2], counts


def test_transform_layer_axis_leaves_unsharded_stacks_alone():
    """On an Explicit mesh, a scan whose inputs are not sharded along "layers" stays as it was
    (the same program as without layer_axis); a non-dividing layer count of a sharded one is the
    error residual_scan gives."""
    W0, x0 = _scan_problem(L=6, dtype=jnp.float32)
    mesh = jax.make_mesh((2, 4), ("data", "layers"))
    with jax.set_mesh(mesh):
        x = jax.device_put(x0, NamedSharding(mesh, P("data")))
        W = jax.device_put(W0, NamedSharding(mesh, P()))
        with_axis = jax.jit(hbpjax.highway_grad(_scan_loss, iterations=2, layer_axis="layers"))
        without = jax.jit(hbpjax.highway_grad(_scan_loss, iterations=2))
        assert "shard_map" not in str(jax.make_jaxpr(with_axis)(W, x))
        assert_trees_close(with_axis(W, x), without(W, x))
    with pytest.raises(ValueError, match=r"layer_axis='stages' is not an axis of the mesh; its axes are \('data', 'layers'\)"):
        with jax.set_mesh(mesh):
            jax.jit(hbpjax.highway_grad(_scan_loss, iterations=2, layer_axis="stages"))(W, x)
    auto = jax.make_mesh((2, 4), ("data", "layers"), axis_types=(AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match=r"6 layers cannot be split evenly over the 4 devices of mesh axis 'layers'"):
        with jax.set_mesh(auto):
            jax.jit(hbpjax.highway_grad(_scan_loss, iterations=2, layer_axis="layers"))(W0, x0)
    with pytest.raises(TypeError, match=r"hbpjax.highway_grad: `layer_axis` must be a mesh axis name"):
        hbpjax.highway_grad(_scan_loss, layer_axis=3)
    with pytest.raises(ValueError, match=r"hbpjax.highway_grad: `mesh` is the mesh for `layer_axis`"):
        hbpjax.highway_grad(_scan_loss, mesh=mesh)


@pytest.mark.parametrize("microbatches", [None, 2])
def test_transform_layer_axis_on_an_nnx_scan_transformer(microbatches):
    """`hbpjax.nnx.grad(layer_axis="layers")` on an nnx.scan pre-LN Transformer whose stacked
    parameters are sharded P("layers") on a 2 x 4 mesh: equal to one device at k = 2 and k >= L,
    gradients sharded like the parameters; also pipelined over 2 microbatches (nnx.scan returns
    each layer's state as a per-step output, the same for every microbatch). The loss weighs every
    example differently, so a microbatch joined back in the wrong order changes it."""
    L, dim, heads = 8, 8, 2
    loss_fn = lambda model, h: jnp.mean(jnp.sin(model(h)) * jnp.arange(1.0, h.shape[0] + 1)[:, None, None])
    with jax.enable_x64(True):
        h0 = jax.random.normal(jax.random.key(53), (4, 5, dim), jnp.float64)
        single = ScannedTransformer(L, dim, heads, rngs=nnx.Rngs(0))
        exact = nnx.grad(loss_fn)(single, h0)
        mesh = jax.make_mesh((2, 4), ("data", "layers"))
        with jax.set_mesh(mesh):
            model = ScannedTransformer(L, dim, heads, rngs=nnx.Rngs(0))
            layers = nnx.state(model.layers)
            nnx.update(model.layers, jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("layers"))), layers))
            h = jax.device_put(h0, NamedSharding(mesh, P("data")))
            for k in (2, L):
                grad = hbpjax.nnx.grad(loss_fn, iterations=k, layer_axis="layers", microbatches=microbatches)
                got = nnx.jit(grad)(model, h)
                kernel = got["layers"]["fc1"]["kernel"][...]
                assert kernel.sharding.spec[0] == "layers" and kernel.addressable_shards[0].data.shape[0] == L // 4
                expected = hbpjax.nnx.grad(loss_fn, iterations=k)(single, h0)
                assert_trees_close(jax.tree.map(np.asarray, got), expected)
        assert_trees_close(jax.tree.map(np.asarray, got), exact)
        assert tree_rel_error(hbpjax.nnx.grad(loss_fn, iterations=2)(single, h0), exact) > 1e-8
