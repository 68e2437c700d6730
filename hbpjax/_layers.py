"""Layer-parallel residual stacks: the L layers split in contiguous chunks over one mesh axis.

Device ``d`` of the axis holds layers ``d*L/D .. (d+1)*L/D - 1``: their per-layer ``xs``
(parameters) and their saved carries never leave it.

* Forward (both methods): the carry walks the chain, one ``ppermute`` hop per device; each device
  runs its own chunk when the carry reaches it. This part is sequential by nature.
* Exact backward (``jax.grad``): JAX transposes that forward, D sequential hops back.
* Highway backward: every device linearizes and sweeps its own layers locally; per sweep, one
  ``ppermute`` passes the block term across each chunk boundary and one ``all_gather`` of per-device
  summaries joins the prefix scan (see :class:`hbpjax._backward.DeviceChain`). O(1) collective
  rounds per sweep, whatever D.

Other mesh axes stay automatic (``shard_map(axis_names={layer_axis})``), so a data axis of a 2-D
mesh composes as usual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from ._backward import DeviceChain, highway_backward

_NAME = "hbpjax.residual_scan"


def resolve(layer_axis, mesh, length):
    """The mesh and the number of chunks ``D`` for ``layer_axis``, with clear errors."""
    if not isinstance(layer_axis, str):
        raise TypeError(f"{_NAME}: `layer_axis` must be a mesh axis name (str); got {layer_axis!r}.")
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    names = tuple(getattr(mesh, "axis_names", ()) or ())
    if not names:
        raise ValueError(
            f"{_NAME}: layer_axis={layer_axis!r} needs a device mesh: pass mesh=jax.make_mesh(...) or "
            "call inside `with jax.set_mesh(mesh):`."
        )
    if layer_axis not in names:
        raise ValueError(f"{_NAME}: layer_axis={layer_axis!r} is not an axis of the mesh; its axes are {names}.")
    size = dict(zip(names, mesh.axis_sizes))[layer_axis]
    if length % size:
        raise ValueError(
            f"{_NAME}: {length} layers cannot be split evenly over the {size} devices of mesh axis "
            f"{layer_axis!r}; use a multiple of {size} layers."
        )
    return mesh, size


def layer_parallel_scan(
    block, split, residual, gamma, settings, length, unroll, init, xs, layer_axis, mesh, size, apply_residual, linearize
):
    """``(final, carries, aux)`` of the stack with its layers split over ``layer_axis``."""
    local_length = length // size
    highway = settings is not None and settings.iterations is not None

    def pipeline(block, init, xs):
        """The forward on this device's chunk: wait for the carry, run the chunk, pass it on."""

        def step(h, x):
            z, aux = split(block(h, x))
            h_new = apply_residual(residual, h, z)
            return h_new, (h_new, aux)

        index = lax.axis_index(layer_axis)
        h = init
        # Stage 0 runs on every device (only device 0's result is kept: it is the one with the right
        # input); it fixes the output types that later stages pass through unchanged.
        h, outs = lax.scan(step, h, xs, length=local_length, unroll=unroll)
        for stage in range(1, size):
            h = jax.tree.map(lambda a: lax.ppermute(a, layer_axis, [(i, i + 1) for i in range(size - 1)]), h)
            h, outs = lax.cond(
                index == stage,
                lambda c: lax.scan(step, c[0], xs, length=local_length, unroll=unroll),
                lambda c: c,
                (h, outs),
            )
        final = jax.tree.map(lambda a: lax.psum(jnp.where(index == size - 1, a, jnp.zeros_like(a)), layer_axis), h)
        carries, aux = outs
        return final, carries, aux

    # The values the block closes over enter the shard_map as explicit (replicated) arguments: a
    # closed-over array would keep the outer mesh in its type inside the manual region.
    example = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), xs)
    outer_consts = tuple(jax.closure_convert(block, init, example)[1])

    def local(init, xs, const_args):
        # Traced again here, inside the shard_map, so the block's jaxpr has this device's types; the
        # closed-over values it finds are the same objects as outside: swap in the arguments.
        x0 = jax.tree.map(lambda a: a[0], xs)
        converted, inner = jax.closure_convert(block, init, x0)
        by_id = {id(c): a for c, a in zip(outer_consts, const_args)}
        consts = tuple(by_id.get(id(c), c) for c in inner)

        def forward(init, xs, consts):
            return pipeline(lambda h, x: converted(h, x, *consts), init, xs)

        if not highway:
            return forward(init, xs, consts)  # JAX differentiates the chain: exact, D hops back
        block_z = lambda h, x, *c: split(converted(h, x, *c))[0]

        def fwd(init, xs, consts):
            final, carries, aux = forward(init, xs, consts)
            return (final, carries, aux), (init, carries, xs, consts)

        def bwd(res, cts):
            init, carries, xs, consts = res
            ct_final, ct_carries, _ = cts
            chain = DeviceChain(layer_axis, size)
            return highway_backward(
                block_z, residual, gamma, settings, init, carries, xs, consts, ct_final, ct_carries, chain, linearize
            )

        run = jax.custom_vjp(forward)
        run.defvjp(fwd, bwd)
        return run(init, xs, consts)

    if _is_explicit(mesh, layer_axis):
        # Explicit axes do not reshard implicitly: put each leaf's layer axis on the mesh axis,
        # keeping how its other axes are sharded (a no-op for layer-sharded parameters).
        xs = jax.tree.map(lambda a: jax.sharding.reshard(a, P(layer_axis, *_spec(a)[1:])), xs)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(layer_axis), P()),
        out_specs=(P(), P(layer_axis), P(layer_axis)),
        axis_names={layer_axis},
        # Without replication types the transpose of an unmapped input is one psum at the boundary,
        # never inside the device-dependent `cond` of the pipeline (where only some devices would
        # reach it). Per-device cotangents of replicated inputs are therefore returned unreduced.
        check_vma=False,
    )(init, xs, outer_consts)


def _is_explicit(mesh, axis):
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ()))
    return types.get(axis) == jax.sharding.AxisType.Explicit


def _spec(a):
    spec = tuple(getattr(getattr(jax.typeof(a), "sharding", None), "spec", ()) or ())
    return spec + (None,) * (a.ndim - len(spec))
