"""Data-parallel Highway-BP (and FSDP) on 8 simulated CPU devices (set in the root conftest).

Every sharded result is compared with the same computation on one device. Layer parallelism
(stacks split over a mesh axis) is in test_layers.py.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import hbpjax
from helpers import SHARD_B as B
from helpers import SHARD_D_IN as D_IN
from helpers import SHARD_H as H
from helpers import SHARD_L as L
from helpers import (
    assert_trees_close,
    highway_value_and_grads,
    sharded_gru_problem,
    sharded_mlp_problem,
)

RTOL, ATOL = 2e-5, 2e-6


pytestmark = pytest.mark.usefixtures("eight_devices")


# ------------------------------------------------------------------------------ data parallel


@pytest.mark.parametrize("problem", [sharded_mlp_problem, sharded_gru_problem])
@pytest.mark.parametrize(
    "fsdp, axis_type",
    # FSDP leaves the gathering of parameters to the compiler: an Auto axis. (With an Explicit axis
    # the carry's sharding would change inside the scan, for jax.grad as much as for hbpjax.)
    [(False, AxisType.Explicit), (False, AxisType.Auto), (True, AxisType.Auto)],
)
def test_data_parallel_equals_single_device(problem, fsdp, axis_type):
    loss, params, data = problem()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    batch_axis = 0 if problem is sharded_mlp_problem else 1
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
            e_value, e_grads = highway_value_and_grads(loss, k, params, data)
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
