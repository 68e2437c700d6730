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

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from ._backward import DeviceChain, differentiate
from ._common import RESIDUAL_SCAN, sharding_spec
from ._stack import saved_carries, scan_steps

_NAME = RESIDUAL_SCAN


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


def layer_parallel_scan(block, init, xs, *, stack_for, settings, axis, mesh, size):
    """``(final carry leaves, per-step outputs)`` of the stack with its layers split over ``axis``.

    Args:
      block: the user's ``block(carry, x)``.
      init, xs: the initial carry (a pytree) and the per-step inputs.
      stack_for: ``stack_for(converted_block) -> Stack``, the stack's description for the block
        with its closed-over values made explicit.
      settings: the backward's :class:`hbpjax._context.HighwaySettings`, or ``None`` for exact
        backprop (JAX differentiates the chain: D sequential hops back).
      axis, mesh, size: the mesh axis, the mesh and the axis size ``D``.
    """
    # The values the block closes over enter the shard_map as explicit (replicated) arguments: a
    # closed-over array would keep the outer mesh in its type inside the manual region.
    example = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), xs)
    outer_consts = tuple(jax.closure_convert(block, init, example)[1])
    carry_tree = jax.tree.structure(init)

    def local(init, xs, const_args):
        # Traced again here, inside the shard_map, so the block's jaxpr has this device's types; the
        # closed-over values it finds are the same objects as outside: swap in the arguments.
        x0 = jax.tree.map(lambda a: a[0], xs)
        converted, inner = jax.closure_convert(block, jax.tree.unflatten(carry_tree, init), x0)
        by_id = {id(c): a for c, a in zip(outer_consts, const_args)}
        consts = tuple(by_id.get(id(c), c) for c in inner)
        stack = stack_for(converted)
        forward = functools.partial(_pipeline, stack, axis=axis, size=size)
        if settings is None:
            return forward(init, xs, consts)[:2]
        return differentiate(
            stack, init, xs, consts, settings=settings, forward=forward, chain=lambda: DeviceChain(axis, size)
        )

    if _is_explicit(mesh, axis):
        # Explicit axes do not reshard implicitly: put each leaf's layer axis on the mesh axis,
        # keeping how its other axes are sharded (a no-op for layer-sharded parameters).
        xs = jax.tree.map(lambda a: jax.sharding.reshard(a, P(axis, *sharding_spec(a)[1:])), xs)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(axis), P()),
        out_specs=(P(), P(axis)),
        axis_names={axis},
        # Without replication types the transpose of an unmapped input is one psum at the boundary,
        # never inside the device-dependent `cond` of the pipeline (where only some devices would
        # reach it). Per-device cotangents of replicated inputs are therefore returned unreduced.
        check_vma=False,
    )(jax.tree.leaves(init), xs, outer_consts)


def _pipeline(stack, init, xs, consts, *, axis, size):
    """The forward on this device's chunk: wait for the carry, run the chunk, pass it on.

    Returns ``(final, ys, saved)`` as :func:`hbpjax._stack.scan_forward` does, for this chunk.
    """
    local_length = stack.length // size
    run = lambda h: scan_steps(stack, h, xs, consts, length=local_length)
    index = lax.axis_index(axis)
    # Stage 0 runs on every device (only device 0's result is kept: it is the one with the right
    # input); it fixes the output types that later stages pass through unchanged.
    h, ys, extra = run(init)
    for stage in range(1, size):
        h = jax.tree.map(lambda a: lax.ppermute(a, axis, [(i, i + 1) for i in range(size - 1)]), h)
        h, ys, extra = lax.cond(index == stage, lambda c: run(c[0]), lambda c: c, (h, ys, extra))
    final = jax.tree.map(lambda a: lax.psum(jnp.where(index == size - 1, a, jnp.zeros_like(a)), axis), h)
    return final, ys, saved_carries(stack, ys, extra)


def _is_explicit(mesh, axis):
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ()))
    return types.get(axis) == jax.sharding.AxisType.Explicit
