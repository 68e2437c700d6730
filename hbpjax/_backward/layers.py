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

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from .._analysis.forward import prepare_steps, scan_steps
from .differentiate import differentiate
from .microbatches import Microbatches
from .microbatches import pipeline as microbatched
from .placements import OnMeshAxis
from .prefix import sharding_spec


def resolve(layer_axis, mesh, length: int | None, *, name: str, xs=()):
    """The mesh and the number of chunks ``D`` for ``layer_axis``, with clear errors naming ``name``.

    ``xs`` are the per-layer inputs: with a ``mesh`` passed without ``jax.set_mesh``, whether their
    types carry that mesh decides how its axes are used. ``length`` (the number of layers) is
    checked to divide evenly (``None``: checked later, with :func:`check_length`).
    """
    if not isinstance(layer_axis, str):
        raise TypeError(f"{name}: `layer_axis` must be a mesh axis name (str); got {layer_axis!r}.")
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    elif (
        jax.sharding.get_abstract_mesh().empty and isinstance(mesh, jax.sharding.Mesh)
        and not any(_typed_mesh(a) for a in jax.tree.leaves(xs))
    ):
        # A mesh passed without `jax.set_mesh`, and arrays whose types carry no mesh: neither may
        # the stack's outputs (eager ops on them would need the mesh as context). Its axes are used
        # as Auto axes. (Arrays put on an Explicit mesh carry it in their types even without
        # `jax.set_mesh`; then the mesh is used as it is, so cotangents get the same types.)
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    names = tuple(getattr(mesh, "axis_names", ()) or ())
    if not names:
        raise ValueError(
            f"{name}: layer_axis={layer_axis!r} needs a device mesh: pass mesh=jax.make_mesh(...) or "
            "call inside `with jax.set_mesh(mesh):`."
        )
    if layer_axis not in names:
        raise ValueError(f"{name}: layer_axis={layer_axis!r} is not an axis of the mesh; its axes are {names}.")
    size = dict(zip(names, mesh.axis_sizes))[layer_axis]
    if length is not None:
        check_length(layer_axis, size, length, name=name)
    return mesh, size


def check_length(layer_axis, size: int, length: int, *, name: str) -> None:
    """Raises ``ValueError`` unless ``length`` layers split evenly over ``size`` devices."""
    if length % size:
        raise ValueError(
            f"{name}: {length} layers cannot be split evenly over the {size} devices of mesh axis "
            f"{layer_axis!r}; use a multiple of {size} layers."
        )


def over_devices(local, init, xs, consts, k, *, mesh, axis):
    """``local(init, xs, consts, k)`` with ``xs`` (and the per-step outputs) split over ``axis``."""
    if _is_explicit(mesh, axis):
        # Explicit axes do not reshard implicitly: put each leaf's layer axis on the mesh axis,
        # keeping how its other axes are sharded (a no-op for layer-sharded parameters).
        # A NamedSharding, not a bare spec: `mesh` may be given without `jax.set_mesh`.
        spec = lambda a: jax.sharding.NamedSharding(mesh, P(axis, *sharding_spec(a)[1:]))
        xs = jax.tree.map(lambda a: jax.sharding.reshard(a, spec(a)), xs)
    # Under jax.jit always: an eager shard_map checks its out_specs against the values' Explicit
    # shardings, which name the other mesh axes (a data axis) that stay automatic here.
    return jax.jit(jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(axis), P(), P()),
        out_specs=(P(), P(axis)),
        axis_names={axis},
        # Without replication types the transpose of an unmapped input is one psum at the boundary,
        # never inside the device-dependent `cond` of the pipeline (where only some devices would
        # reach it). Per-device cotangents of replicated inputs are therefore returned unreduced.
        check_vma=False,
    ))(init, xs, consts, k)


def sharded_over(xs, axis, mesh) -> bool:
    """Whether a stack found in a function, with per-layer inputs ``xs``, runs layer-parallel.

    With an Explicit ``axis`` the types say it: some floating-point input is sharded along its
    layer (leading) axis over ``axis``. With an Auto one they do not (JAX decides placement
    later): every stack with floating-point per-layer inputs does.
    """
    floats = [a for a in xs if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
    if not floats:
        return False
    if not _is_explicit(mesh, axis):
        return True
    return any(_typed_mesh(a) and sharding_spec(a)[:1] == (axis,) for a in floats)


def found_stack(stack, init, xs, consts, *, options, axis, mesh, size, micro=None):
    """``(final carry, per-step outputs)`` of a stack found in a function (a ``lax.scan``,
    ``nnx.scan``, ...), its layers split over ``axis``: the pipelined forward and the
    :class:`~hbpjax._backward.DeviceChain` backward of :func:`layer_parallel_scan`. With
    ``options.microbatches``, ``micro`` is the same stack traced on one microbatch."""
    k = options.iterations if options.traced else None
    if options.microbatches is not None and micro is None:
        raise ValueError(
            f"{options.name}: microbatches={options.microbatches} found no microbatch trace of a stack of "
            f"{stack.length} layers to pipeline."
        )

    def local(init, xs, consts, k):
        run_options = options if k is None else dataclasses.replace(options, iterations=k)
        forward, batches, piped = chunk_forward(
            stack, init, xs, consts, axis=axis, size=size, microbatches=options.microbatches, micro=micro,
            name=options.name,
        )
        if not options.highway or not stack.split.has_residual_path:  # JAX differentiates the pipeline
            final, ys, _, _ = forward(init, xs, consts)
            return final, ys
        placement = lambda: OnMeshAxis(axis, size)
        return differentiate(
            piped, init, xs, consts, options=run_options, forward=forward, placement=placement, microbatches=batches
        )

    return over_devices(local, list(init), list(xs), tuple(consts), k, mesh=mesh, axis=axis)


def chunk_forward(stack, init, xs, consts, *, axis, size, microbatches, micro, name):
    """``(forward, batches, piped)``: this device's forward ``forward(init, xs, consts, lin=None) ->
    (final, ys, saved, linearization)``; with ``microbatches``, how the batch splits
    (:class:`~hbpjax._backward.microbatches.Microbatches`, else ``None``); and the stack whose steps
    the forward runs (``micro``, the stack traced on one microbatch, or ``stack``)."""
    if microbatches is None:
        return functools.partial(pipeline, stack, axis=axis, size=size), None, stack
    local_length = stack.length // size
    batches = Microbatches.of(microbatches, stack, micro, list(init), name=name)

    def forward(init, xs, consts, lin=None):
        # What the layers compute from their parameters alone: once, not once per microbatch.
        prepared = prepare_steps(micro, [a[0] for a in batches.split_carry(init)], xs, consts, lin=lin)
        run = lambda h: scan_steps(micro, h, xs, consts, length=local_length, lin=lin, prepared=prepared)
        return microbatched(run, init, axis=axis, size=size, batches=batches)

    return forward, batches, micro


def pipeline(stack, init, xs, consts, *, axis, size, lin=None):
    """The forward on this device's chunk: wait for the carry, run the chunk, pass it on.

    Returns ``(final, ys, saved, linearization)`` as :func:`hbpjax._analysis.forward.scan_forward` does, for
    this chunk.
    """
    local_length = stack.length // size
    run = lambda h: scan_steps(stack, h, xs, consts, length=local_length, lin=lin)
    index = lax.axis_index(axis)
    # Stage 0 runs on every device (only device 0's result is kept: it is the one with the right
    # input); it fixes the output types that later stages pass through unchanged.
    h, ys, saved, values = run(init)
    for stage in range(1, size):
        h = jax.tree.map(lambda a: lax.ppermute(a, axis, [(i, i + 1) for i in range(size - 1)]), h)
        h, ys, saved, values = lax.cond(index == stage, lambda c: run(c[0]), lambda c: c, (h, ys, saved, values))
    final = jax.tree.map(lambda a: lax.psum(jnp.where(index == size - 1, a, jnp.zeros_like(a)), axis), h)
    return final, ys, saved, values


def _typed_mesh(a) -> bool:
    """Whether ``a``'s type carries a (non-empty) mesh: it was put on Explicit mesh axes."""
    sharding = getattr(jax.typeof(a), "sharding", None)
    return sharding is not None and not getattr(sharding, "mesh", jax.sharding.get_abstract_mesh()).empty


def _is_explicit(mesh, axis):
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()) or ()))
    return types.get(axis) == jax.sharding.AxisType.Explicit
