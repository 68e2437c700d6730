"""Microbatched layer-parallel stacks: the forward as a pipeline, the backward over all microbatches.

With ``microbatches=M`` beside ``layer_axis``, the batch (the leading axis of every carry leaf) is
split into ``M`` microbatches; microbatch ``m`` takes rows ``m, m + M, m + 2M, ...`` (so a batch
sharded over a data axis keeps every microbatch sharded the same way). The forward is a loop of
``M + D - 1`` ticks: at tick ``t`` device ``d`` runs its chunk of layers on microbatch ``t - d`` (when
there is one) and passes the carry on with one ``ppermute``. Every device keeps each microbatch's
saved carries and linearization for its own layers.

The Highway-BP backward has no pipeline: its sweeps are one microbatch's, ``vmap``-ed over the ``M``
microbatches (every device sweeps its layers for all of them at once, with the same O(1) collective
rounds per sweep). The parameters' cotangents, read off one last VJP of every layer, are then
accumulated over the microbatches in a loop (one microbatch's VJP of all layers at a time, no
collective), so a device holds one copy of its layers' parameter cotangents, not ``M``. JAX's
transpose of the same forward (the exact backward, ``iterations=None``) is a pipeline again, in
reverse.

Per-layer inputs ``xs`` and values the layers close over are shared by all microbatches: a stack
whose per-step inputs carry a batch axis (an RNN's inputs over time) cannot be split this way, and
gets a clear error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from .._analysis.jaxprs import depends_on
from .sweeps import final_read, highway_sweeps

tmap = jax.tree.map


@dataclasses.dataclass(frozen=True)
class Microbatches:
    """How one stack's values split into ``count`` microbatches and join again.

    Attributes:
      count: ``M``.
      ys_axes: per leaf of the per-step outputs, the axis of one step's value that holds the batch,
        or ``None`` for an output that does not depend on the carry (the same for every microbatch).
    """

    count: int
    ys_axes: tuple

    @classmethod
    def of(cls, count: int, stack, micro, init: list, *, name: str) -> Microbatches:
        """The split of a :class:`~hbpjax._analysis.stacks.ScanStack` ``stack`` (traced on the whole
        batch) whose ``micro`` is the same stack traced on one microbatch, read off their steps' types.

        Raises ``ValueError`` (naming ``name``) for a carry leaf without a leading axis that ``count``
        divides, a ``micro`` whose carry is not one microbatch's, and a per-step output that depends
        on the batch without a batch axis.
        """
        check_carry(init, count, name=name)
        full, one = _ys(stack), _ys(micro)
        if count == 1:  # one microbatch: every output is its own
            return cls(1, (None,) * len(full))
        rows = init[0].shape[0] // count
        shapes = [v.aval.shape for v in _carry(micro)]
        if shapes != [(a.shape[0] // count, *a.shape[1:]) for a in init]:
            raise ValueError(
                f"{name}: with microbatches={count} each layer runs on {rows} rows of the carry; the stack "
                f"traced on one microbatch has a carry of shapes {shapes}. Microbatches split the batch (the "
                "arguments that are not differentiated; with hbpjax.nnx, the arguments that are not modules) "
                "along their leading axis: the carry's leading axis must come from it."
            )
        eqns = micro.body.jaxpr.eqns
        axes: list[int | None] = []
        for i, (f, o) in enumerate(zip(full, one)):
            f_shape, o_shape = f.aval.shape, o.aval.shape
            differ = [a for a in range(len(f_shape)) if f_shape[a] != o_shape[a]]
            if len(differ) == 1 and f_shape[differ[0]] == count * o_shape[differ[0]]:
                axes.append(differ[0])
            elif not differ and not depends_on(eqns, _carry(micro), [o]):
                axes.append(None)
            else:
                raise ValueError(
                    f"{name}: with microbatches={count}, per-step output {i} (shape {tuple(f_shape)} per "
                    "step) depends on the batch but has no batch axis to split and join it along; return "
                    "per-example values, or run this stack without microbatches."
                )
        return cls(count, tuple(axes))

    def split_carry(self, leaves):
        """``(M, B / M, ...)`` microbatches of every ``(B, ...)`` leaf."""
        return split(leaves, self.count)

    def join_carry(self, leaves):
        """The inverse of :meth:`split_carry`."""
        return [_join(a, 1) for a in leaves]

    def join_ys(self, ys):
        """Per-step outputs ``(M, L, ...)`` of every microbatch, as the whole batch's ``(L, ...)``."""
        leaves, tree = jax.tree.flatten(ys)
        out = [y[0] if axis is None else _join(y, axis + 2) for y, axis in zip(leaves, self.ys_axes)]
        return jax.tree.unflatten(tree, out)

    def split_ys(self, ys):
        """Cotangents of the per-step outputs, per microbatch (those of outputs shared by all
        microbatches go to the first one)."""
        leaves, tree = jax.tree.flatten(ys)
        out = []
        for y, axis in zip(leaves, self.ys_axes):
            if axis is None:
                first = jnp.arange(self.count).reshape((-1,) + (1,) * y.ndim) == 0
                out.append(jnp.where(first, y[None], jnp.zeros_like(y)[None]))
            else:
                out.append(_split(y, axis + 1, self.count))
        return jax.tree.unflatten(tree, out)


def check_carry(init: list, count: int, *, name: str) -> None:
    """Raises ``ValueError`` unless every carry leaf has a leading axis that ``count`` divides."""
    for i, a in enumerate(init):
        if jnp.ndim(a) == 0 or a.shape[0] % count:
            raise ValueError(
                f"{name}: microbatches={count} splits the leading (batch) axis of every carry leaf; "
                f"carry leaf {i} has shape {tuple(jnp.shape(a))}. Use a batch size divisible by {count}."
            )


def split(leaves, count: int):
    """``(count, B / count, ...)`` of every ``(B, ...)`` leaf: microbatch ``m`` is rows ``m::count``."""
    return [_split(a, 0, count) for a in leaves]


def _split(a, axis: int, count: int):
    shape = a.shape[:axis] + (a.shape[axis] // count, count) + a.shape[axis + 1 :]
    return jnp.moveaxis(a.reshape(shape), axis + 1, 0)


def _join(a, axis: int):
    """``a`` with its leading (microbatch) axis joined into axis ``axis`` (counted with it)."""
    moved = jnp.moveaxis(a, 0, axis)
    return moved.reshape(moved.shape[: axis - 1] + (-1,) + moved.shape[axis + 1 :])


def _carry(stack) -> list:
    """The carry inputs of a scan stack's step."""
    return stack.body.jaxpr.invars[stack.num_consts : stack.num_consts + stack.num_carry]


def _ys(stack) -> list:
    """The per-step outputs of a scan stack's step (atoms with their types)."""
    return stack.body.jaxpr.outvars[stack.num_carry :]


def pipeline(run, init, *, axis: str, size: int, batches: Microbatches):
    """The forward of a chunk over all microbatches, ``M + D - 1`` ticks of one ``ppermute`` each.

    Args:
      run: ``run(h) -> (final, ys, saved, values)``: this device's chunk of layers on one
        microbatch's carry ``h`` (``values``: ``None`` or ``(per-step values, hoisted values)``).
      init: the whole batch's initial carry leaves (only device 0's is read).
      axis, size: the manual mesh axis of the layers and its size ``D``.
      batches: the split.

    Returns:
      ``(final, ys, saved, values)``: the whole batch's final carry (on every device) and per-step
      outputs; ``saved`` and the per-step part of ``values`` with a leading microbatch axis.
    """
    M = batches.count
    index = lax.axis_index(axis)
    parts = batches.split_carry(init)
    shapes = jax.eval_shape(run, [p[0] for p in parts])
    final_s, ys_s, saved_s, values_s = shapes
    per_step_s, hoisted_s = values_s if values_s is not None else ((), ())
    state = (
        [_zeros(s) for s in final_s],  # the carry arriving from the previous device
        tmap(lambda s: _zeros(s, M), (final_s, ys_s, saved_s, per_step_s)),
        tmap(_zeros, hoisted_s),
    )
    write = lambda bufs, m, new: tmap(lambda b, v: lax.dynamic_update_index_in_dim(b, v, m, 0), bufs, new)

    def tick(t, state):
        arrived, bufs, hoisted = state
        m = t - index
        mb = jnp.clip(m, 0, M - 1)
        h = [jnp.where(index == 0, lax.dynamic_index_in_dim(p, mb, keepdims=False), a) for p, a in zip(parts, arrived)]

        def work(h, bufs, hoisted):
            final, ys, saved, values = run(h)
            per_step, hoisted = values if values is not None else ((), ())
            return final, write(bufs, mb, (final, ys, saved, per_step)), hoisted

        out, bufs, hoisted = lax.cond((m >= 0) & (m < M), work, lambda *a: a, h, bufs, hoisted)
        arrived = [lax.ppermute(a, axis, [(i, i + 1) for i in range(size - 1)]) for a in out]
        return arrived, bufs, hoisted

    _, (finals, ys, saved, per_step), hoisted = lax.fori_loop(0, M + size - 1, tick, state)
    last = index == size - 1
    final = [lax.psum(jnp.where(last, a, jnp.zeros_like(a)), axis) for a in batches.join_carry(finals)]
    values = None if values_s is None else (per_step, hoisted)
    return final, batches.join_ys(ys), saved, values


def _zeros(s: jax.ShapeDtypeStruct, count: int | None = None):
    """Zeros of ``s``'s type (its explicit sharding kept), with a leading axis of ``count``."""
    spec = tuple(getattr(getattr(s, "sharding", None), "spec", ()) or ())
    shape = s.shape if count is None else (count, *s.shape)
    if not any(p is not None for p in spec):
        return jnp.zeros(shape, s.dtype)
    return jnp.zeros(shape, s.dtype, out_sharding=P(*spec) if count is None else P(None, *spec))


def backward(stack, options, placement, batches: Microbatches, residuals, cotangents, *, report: bool, forward_linearization):
    """The Highway-BP backward of a pipelined chunk: ``((ct_init, ct_xs, ct_consts), report)``.

    The sweeps of every microbatch at once (a ``vmap``); then, microbatch by microbatch, one VJP
    of every layer adds its parameters' cotangents to one accumulator (a loop of ``M`` trips with no
    collective: ``M`` copies of a device's parameter cotangents would not fit where its parameters
    barely do).
    """
    init, saved, xs, consts = residuals
    ct_final, ct_ys = cotangents
    plan, (per_step, hoisted) = forward_linearization or (None, (None, None))
    lin_of = lambda per_step: None if plan is None else (plan, (per_step, hoisted))
    inits = batches.split_carry(init)

    def sweeps_one(h0, saved, per_step, ct_final, ct_ys):
        return highway_sweeps(
            stack, options, placement, (h0, saved, xs, consts), (ct_final, ct_ys), report=report,
            forward_linearization=lin_of(per_step),
        )

    after, k_first, ct_block, done = jax.vmap(sweeps_one)(
        inits, saved, per_step, batches.split_carry(ct_final), batches.split_ys(ct_ys)
    )

    def read_one(h0, saved, per_step, after, k_first, ct_block):
        return final_read(
            stack, options, placement, (h0, saved, xs, consts), after=after, k_first=k_first, ct_block=ct_block,
            forward_linearization=lin_of(per_step),
        )

    per_microbatch = (inits, saved, per_step, after, k_first, ct_block)
    first = tmap(lambda a: a[0], per_microbatch)
    _, ct_xs, ct_consts = jax.eval_shape(read_one, *first)
    zeros = tmap(lambda s: _zeros(s), (ct_xs, ct_consts))

    def accumulate(total, one):
        ct_init, ct_xs, ct_consts = read_one(*one)
        return tmap(jnp.add, total, (ct_xs, ct_consts)), ct_init

    (ct_xs, ct_consts), ct_init = lax.scan(accumulate, zeros, per_microbatch)
    ct_init = [None if c is None else batches.join_carry([c])[0] for c in ct_init]
    if done is not None:  # the most sweeps any microbatch ran, and its largest last change
        done = jnp.max(done, axis=0)
    return (ct_init, ct_xs, ct_consts), done
