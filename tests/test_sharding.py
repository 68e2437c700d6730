"""Data-parallel and layer-parallel Highway-BP on 8 simulated CPU devices (set in the root conftest).

Every sharded result is compared with the same computation on one device.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import hbpjax
from helpers import assert_trees_close, tree_rel_error

RTOL, ATOL = 2e-5, 2e-6
L, D_IN, H, B = 16, 3, 8, 8


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    assert jax.device_count() >= 8, "the root conftest.py must set --xla_force_host_platform_device_count=8"


def mlp_problem():
    ks = jax.random.split(jax.random.key(0), 3)
    params = {"W": jax.random.normal(ks[0], (L, H, H)) / np.sqrt(H), "b": 0.1 * jax.random.normal(ks[1], (L, H))}
    x = jax.random.normal(ks[2], (B, H))

    def loss(params, x, layer_axis=None, mesh=None):
        block = lambda h, p: 0.5 * jnp.tanh(h @ p["W"] + p["b"])
        h, hs = hbpjax.residual_scan(block, x, params, layer_axis=layer_axis, mesh=mesh)
        return jnp.mean(h**2) + 0.1 * jnp.mean(jnp.sin(hs))

    return loss, params, x


def gru_problem():
    """Shared weights closed over, per-step inputs in xs: the layer axis is a time axis."""
    ks = jax.random.split(jax.random.key(1), 5)
    params = {n: jax.random.normal(k, s) / np.sqrt(s[0]) for n, k, s in zip(["Wz", "Uz", "Wh", "Uh"], ks, [(D_IN, H), (H, H), (D_IN, H), (H, H)])}
    xs = jax.random.normal(ks[4], (L, B, D_IN))

    def loss(params, xs, layer_axis=None, mesh=None):
        def cell(h, x):
            u = jax.nn.sigmoid(x @ params["Wz"] + h @ params["Uz"])
            return 1.0 - u, u * jnp.tanh(x @ params["Wh"] + h @ params["Uh"])

        h0 = 0.0 * jnp.sum(xs, axis=(0, 2))[:, None] + jnp.zeros(H)  # zeros sharded like the batch
        _, hs = hbpjax.residual_scan(cell, h0, xs, residual=hbpjax.residual.gated, layer_axis=layer_axis, mesh=mesh)
        return jnp.mean(jnp.cos(hs) * jnp.arange(1.0, L + 1)[:, None, None])

    return loss, params, xs


def _grad(loss, k, *args, **kw):
    return jax.jit(hbpjax.highway_value_and_grad(lambda a, b: loss(a, b, **kw), (0, 1), iterations=k))(*args)


# ------------------------------------------------------------------------------ data parallel


@pytest.mark.parametrize("problem", [mlp_problem, gru_problem])
@pytest.mark.parametrize(
    "fsdp, axis_type",
    # FSDP leaves the gathering of parameters to the compiler: an Auto axis. (With an Explicit axis
    # the carry's sharding would change inside the scan, for jax.grad as much as for hbpjax.)
    [(False, AxisType.Explicit), (False, AxisType.Auto), (True, AxisType.Auto)],
)
def test_data_parallel_equals_single_device(problem, fsdp, axis_type):
    loss, params, data = problem()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    batch_axis = 0 if problem is mlp_problem else 1
    data_spec = P(*([None] * batch_axis + ["data"]))
    # FSDP: every parameter sharded over the data axis along its last dimension (H = 8).
    param_spec = (lambda a: P(*([None] * (a.ndim - 1) + ["data"]))) if fsdp else (lambda a: P())
    with jax.set_mesh(mesh):
        sharded_params = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, param_spec(a))), params)
        sharded_data = jax.device_put(data, NamedSharding(mesh, data_spec))
        # Explicit axes carry shardings in the types, so gradients follow the parameters by
        # themselves; with Auto axes, as for jax.grad, the layout is asked for with out_shardings.
        shardings = None
        if axis_type == AxisType.Auto:
            shardings = (NamedSharding(mesh, P()), (jax.tree.map(lambda a: a.sharding, sharded_params), sharded_data.sharding))
        for k in (0, 2):
            fn = hbpjax.highway_value_and_grad(loss, (0, 1), iterations=k)
            value, grads = jax.jit(fn, out_shardings=shardings)(sharded_params, sharded_data)
            e_value, e_grads = _grad(loss, k, params, data)
            assert_trees_close((value, grads), (e_value, e_grads), rtol=RTOL, atol=ATOL)
            for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves((sharded_params, sharded_data))):
                assert g.sharding.is_equivalent_to(p.sharding, g.ndim), (g.sharding, p.sharding)


def test_data_parallel_nnx_training_step():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))  # GSPMD, as Flax models use
    model = hbpjax.nnx.ResidualRNN(hbpjax.nnx.GRUCell(D_IN, H, rngs=nnx.Rngs(0)))
    xs = jax.random.normal(jax.random.key(2), (B, L, D_IN))
    loss_fn = lambda m, xs: jnp.mean(m(xs) ** 2)
    step = nnx.jit(hbpjax.nnx.value_and_grad(loss_fn, iterations=2))
    expected = step(model, xs)
    with jax.set_mesh(mesh):
        got = step(model, jax.device_put(xs, NamedSharding(mesh, P("data"))))
    assert_trees_close(got, expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- layer parallel


@pytest.mark.parametrize("problem", [mlp_problem, gru_problem])
@pytest.mark.parametrize("devices", [2, 4, 8])
def test_layer_parallel_equals_single_device(problem, devices):
    loss, params, data = problem()
    mesh = jax.make_mesh((devices,), ("layers",), devices=jax.devices()[:devices])
    for k in (None, 0, 2, L):
        expected = _grad(loss, k, params, data)
        with jax.set_mesh(mesh):
            got = _grad(loss, k, params, data, layer_axis="layers")
        assert_trees_close(got, expected, rtol=RTOL, atol=ATOL)
    exact = _grad(loss, None, params, data)
    assert tree_rel_error(_grad(loss, 0, params, data)[1], exact[1]) > 1e-4  # k=0 differs: not vacuous


@pytest.mark.parametrize(
    "problem, axis_type",
    # The GRU's block closes over its (replicated) weights; under a shard_map, JAX accepts closed-over
    # arrays with Auto axes, not arrays typed with Explicit ones. Per-layer parameters travel in xs.
    [(mlp_problem, AxisType.Explicit), (mlp_problem, AxisType.Auto), (gru_problem, AxisType.Auto)],
)
def test_layer_parallel_on_a_2d_mesh_keeps_shardings(problem, axis_type):
    loss, params, data = problem()
    mesh = jax.make_mesh((2, 4), ("data", "layers"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
        if problem is mlp_problem:  # per-layer parameters live with their layers
            params = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("layers"))), params)
            data = jax.device_put(data, NamedSharding(mesh, P("data")))
        else:  # per-step inputs: time chunks over "layers", batch over "data"; shared weights replicated
            params = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), params)
            data = jax.device_put(data, NamedSharding(mesh, P("layers", "data")))
        shardings = jax.tree.map(lambda a: a.sharding, (params, data))
        for k in (None, 2):
            fn = hbpjax.highway_value_and_grad(lambda p, x: loss(p, x, layer_axis="layers"), (0, 1), iterations=k)
            got = jax.jit(fn, out_shardings=(NamedSharding(mesh, P()), shardings))(params, data)
            assert_trees_close(got, _grad(loss, k, *jax.device_get((params, data))), rtol=RTOL, atol=ATOL)
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
    loss, params, data = gru_problem()
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


def test_layer_axis_errors():
    loss, params, data = mlp_problem()
    mesh = jax.make_mesh((8,), ("layers",))
    with pytest.raises(ValueError, match=r"hbpjax.residual_scan: 16 layers cannot be split evenly over the 3 devices"):
        loss(params, data, layer_axis="layers", mesh=jax.make_mesh((3,), ("layers",), devices=jax.devices()[:3]))
    with pytest.raises(ValueError, match=r"layer_axis='stages' is not an axis of the mesh; its axes are \('layers',\)"):
        loss(params, data, layer_axis="stages", mesh=mesh)
    with pytest.raises(ValueError, match=r"layer_axis='layers' needs a device mesh"):
        loss(params, data, layer_axis="layers")
