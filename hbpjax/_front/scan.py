"""``residual_scan``: a ``lax.scan`` over a residual stack whose backward can run as Highway-BP.

Forward: ``z_i = block(h_{i-1}, x_i)``, ``h_i = residual(h_{i-1}, z_i)`` for ``i = 1..L``.

It *is* ``lax.scan``: under ``jax.grad`` (or anything else JAX does with a scan: forward mode,
higher order, an inner ``jax.grad`` of a loss) nothing changes. While a highway transform traces the
function, the scan carries its :class:`~hbpjax._front.options.StackOptions` and its block carries a mark
(:mod:`hbpjax._analysis.marks`), so the conversion (:mod:`hbpjax._analysis.conversion`) runs its backward as Highway-BP with
the stack's own ``gamma`` and ``linearize``, and the block as the cut of the residual split: every
layer linearized once in parallel, then ``k`` sweeps of "all layers' VJPs at once, then one prefix
scan". Nothing in this backward loops over the layers; its sequential depth is about
``(k+1)(1+log2 L)``.

With ``layer_axis`` the layers are split in contiguous chunks over a mesh axis
(:mod:`hbpjax._backward.layers`); that stack's custom VJP is built while it is traced, from the options of
the active transform.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .. import residual as _residual
from .._analysis import marks as _marks
from .._analysis.stacks import scan_stack
from .._backward import layers
from .._backward.differentiate import differentiate
from .._backward.microbatches import check_carry as microbatch_check
from .._backward.microbatches import split as microbatch_parts
from .._backward.placements import OnMeshAxis
from ..residual import additive
from . import context as _context
from .options import StackOptions, as_int, check_microbatches, describe

PyTree = Any

_NAME = "hbpjax.residual_scan"


def residual_scan(
    block: Callable[[PyTree, PyTree], PyTree],
    init: PyTree,
    xs: PyTree = None,
    *,
    residual: Callable[[PyTree, PyTree], PyTree] = additive,
    gamma: float = 0.0,
    length: int | None = None,
    unroll: int | bool = 1,
    has_aux: bool = False,
    layer_axis: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    linearize: str = "vmap",
    microbatches: int | None = None,
) -> tuple[PyTree, PyTree] | tuple[PyTree, PyTree, PyTree]:
    """Runs a residual stack ``h_i = residual(h_{i-1}, block(h_{i-1}, x_i))`` over ``L`` steps.

    This is ``lax.scan`` for residual networks and RNNs. Under ``jax.grad`` it is exactly
    ``lax.scan``; under :func:`hbpjax.highway_grad` its backward becomes Highway-BP: a few parallel
    sweeps instead of ``L`` dependent steps.

    Args:
      block: ``block(carry, x) -> z``, any JAX function. It may close over arrays (RNN weights,
        shared parameters): those are shared by all steps and receive their gradient too.
      init: the initial carry ``h_0``, a pytree of arrays. Floating-point leaves are differentiated;
        other leaves (step counters, RNG counts, keys) are state, as ``jax.grad`` treats them.
      xs: what changes per step, stacked on a leading axis of length ``L``: per-layer parameters,
        per-step inputs, per-layer random keys, or a pytree of them. ``None`` when nothing does
        (then pass ``length``).
      residual: ``r(h, z) -> h_new``: one of :func:`hbpjax.residual.additive` (default),
        :func:`~hbpjax.residual.gated`, :func:`~hbpjax.residual.relu`, or your own function. Its
        elementwise part in ``h`` is the residual path ``K``; anything else it computes from ``h``
        (the mean and variance of a ``LayerNorm(h + z)``, a reversal, a sum) is treated as part of
        the block, so the backward stays exact at ``iterations >= L`` whatever ``r`` is, and
        ``LayerNorm(h + z)`` gets the post-LN split ``K = gain / std``.
      gamma: backward-only split of the residual Jacobian, ``K' = (1 - gamma) K`` and
        ``J' = J + gamma K``. The forward is unchanged and ``iterations >= L`` stays exact.
        ``0`` is plain Highway-BP; about ``0.2`` helps pre-LN Transformers, ``0.8`` post-LN ones;
        ``1`` is fixed-point (Jacobi) iteration.
      length: number of steps ``L``; required when ``xs`` is ``None``, otherwise checked against it.
      unroll: forwarded to ``lax.scan`` (how many forward steps to unroll per loop iteration).
      has_aux: if True, ``block`` returns ``(z, aux)`` and the per-step ``aux`` values are returned
        stacked. ``aux`` is state, not a differentiable output: it is wrapped in
        ``lax.stop_gradient`` (use it for updated BatchNorm statistics, RNG counters, metrics).
      layer_axis: name of a mesh axis to split the ``L`` layers over, in contiguous chunks (layer
        parallelism). Each device keeps its chunk's ``xs`` and saved carries; the forward passes the
        carry from device to device; the highway backward sweeps locally with O(1) collective rounds
        per sweep. ``L`` must be a multiple of the axis size. ``carries`` come back sharded over the
        axis. Other mesh axes (a data axis) stay automatic. With ``Explicit`` mesh axes, arrays the
        block closes over must not carry an explicit sharding (JAX does not let a manual region
        trace with them): use ``Auto`` axes, or pass per-layer values through ``xs``.
      mesh: the mesh for ``layer_axis``; defaults to the one set with ``jax.set_mesh``.
      microbatches: with ``layer_axis``, split the batch (the leading axis of every leaf of
        ``init``; microbatch ``m`` is rows ``m, m + M, ...``) into ``M`` microbatches and run the
        forward as a pipeline of ``M + D - 1`` ticks, so that the ``D`` devices work at once. The
        highway backward sweeps all microbatches together (no pipeline bubble); exact backprop
        (``iterations=None``, or plain ``jax.grad``) transposes the pipeline. ``xs`` and the values
        ``block`` closes over are shared by all microbatches.
      linearize: how the highway backward linearizes the layers, all at once: ``"vmap"`` (one
        ``jax.vjp`` of ``vmap(block)``; the default) or ``"unroll"`` (one ``jax.vjp`` per layer,
        still independent of each other). ``"unroll"`` suits short stacks of ops that XLA batches
        poorly (convolutions with per-layer kernels on a CPU); compile time grows with ``L``.

    Returns:
      ``(final_carry, carries)``: ``h_L`` and ``h_1..h_L`` stacked on a leading axis of length ``L``;
      ``(final_carry, carries, aux)`` with ``has_aux=True``.

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> W = 0.1 * jnp.ones((8, 3, 3))               # 8 layers of 3x3 weights
      >>> def loss(W, h0):
      ...     block = lambda h, w: jnp.tanh(h @ w)
      ...     h, _ = hbpjax.residual_scan(block, h0, W)
      ...     return jnp.sum(h ** 2)
      >>> exact = jax.grad(loss)(W, jnp.ones(3))
      >>> approx = hbpjax.highway_grad(loss, iterations=8)(W, jnp.ones(3))
      >>> bool(jnp.allclose(exact, approx, rtol=1e-5))
      True
    """
    if not callable(block):
        raise TypeError(f"{_NAME}: `block` must be callable as block(carry, x) -> z; got {block!r}.")
    if not callable(residual):
        raise TypeError(
            f"{_NAME}: `residual` must be callable as residual(h, z) -> h_new (for instance "
            f"hbpjax.residual.additive); got {residual!r}."
        )
    options = StackOptions(gamma=gamma, linearize=linearize, name=_NAME)
    microbatches = check_microbatches(_NAME, microbatches, layer_axis)
    length = _scan_length(xs, length)
    highway = _context.current()  # the active transform's options; None: plain lax.scan
    # The block is a cut of the residual split, whatever it computes: under a transform, marked so.
    marked_block = block if highway is None else _marks.mark(block, _marks.BLOCK)

    def step(h, x):
        z, aux = _split_aux(has_aux, marked_block(h, x))
        h_new = _residual.apply(residual, h, z, name=_NAME)
        return h_new, (h_new, jax.tree.map(lax.stop_gradient, aux))

    if layer_axis is None:
        scan = lambda init, xs: lax.scan(step, init, xs, length=length, unroll=unroll)
        if highway is not None:  # the conversion finds the scan and its options by this mark
            scan = _marks.mark(scan, _marks.StackMark(options))
        final, (carries, aux) = scan(init, xs)
    else:
        mesh, size = layers.resolve(layer_axis, mesh, length, name=_NAME, xs=xs)
        converted = highway is not None and length > 0
        run = lambda init, xs: _layer_parallel_scan(
            step, init, xs, options=highway if converted else None, stack_options=options, axis=layer_axis,
            mesh=mesh, size=size, length=length, unroll=unroll, microbatches=microbatches,
        )
        if converted:  # already Highway-BP inside; marked so the conversion counts and lists it
            run = _marks.mark(run, _marks.StackMark(options, layer_axis=layer_axis, length=length))
        final, (carries, aux) = run(init, xs)
    if has_aux:
        return final, carries, aux
    return final, carries


# --------------------------------------------------------------------------- validation


def _split_aux(has_aux: bool, out):
    """``(z, aux)`` from a block's output (``aux`` is ``None`` without ``has_aux``)."""
    if not has_aux:
        return out, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(f"{_NAME}: with has_aux=True `block` must return a pair (z, aux); got {describe(out)}.")
    return out[0], out[1]


def _scan_length(xs, length) -> int:
    """The number of steps, checked against every leaf of ``xs``."""
    if length is not None:
        try:
            length = as_int(length)
        except TypeError:
            raise TypeError(
                f"{_NAME}: `length` must be an int or None; got {length!r} of type "
                f"{type(length).__name__}."
            ) from None
        if length < 0:
            raise ValueError(f"{_NAME}: `length` must be >= 0; got {length}.")
    leaves, _ = jax.tree_util.tree_flatten_with_path(xs)
    if not leaves:
        if length is None:
            raise ValueError(
                f"{_NAME}: got xs={xs!r} with no arrays, so the number of steps is unknown; "
                "pass `length=L`."
            )
        return length
    sizes = []
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape:
            raise ValueError(
                f"{_NAME}: every leaf of `xs` needs a leading step axis; xs{jax.tree_util.keystr(path)} "
                f"is a scalar. Stack per-step values on axis 0, or close over shared ones in `block`."
            )
        sizes.append((jax.tree_util.keystr(path), shape[0]))
    lengths = {n for _, n in sizes}
    if len(lengths) > 1:
        listing = ", ".join(f"xs{p or ''}: {n}" for p, n in sizes)
        raise ValueError(
            f"{_NAME}: all leaves of `xs` must share the leading (step) axis length; got {listing}."
        )
    (found,) = lengths
    if length is not None and length != found:
        raise ValueError(
            f"{_NAME}: `length={length}` disagrees with the leading axis of `xs` ({found})."
        )
    return found


# ----------------------------------------------------------------------- layer parallelism


def _layer_parallel_scan(step, init, xs, *, options, stack_options, axis, mesh, size, length, unroll, microbatches):
    """``(final carry, per-step outputs)`` of ``lax.scan(step, init, xs)`` split over ``axis``.

    Args:
      step: the step of a :func:`hbpjax.residual_scan`, ``step(h, x) -> (h_new, ys)``, its block
        marked (:mod:`hbpjax._analysis.marks`) when ``options`` is given.
      init, xs: the initial carry and the per-step inputs (pytrees).
      options: the active transform's :class:`~hbpjax.Options`, or ``None`` for exact
        backprop (JAX differentiates the chain: D sequential hops back).
      stack_options: the stack's own options (``gamma``, ``linearize``).
      axis, mesh, size: the mesh axis, the mesh and the axis size ``D``.
      length, unroll: the number of layers and the forward's unrolling.
      microbatches: ``M`` to pipeline the forward over (:mod:`hbpjax._backward.microbatches`), or
        ``None``.
    """
    # The values the step closes over enter the shard_map as explicit (replicated) arguments: a
    # closed-over array would keep the outer mesh in its type inside the manual region.
    example = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), xs)
    outer_consts = tuple(jax.closure_convert(step, init, example)[1])
    carry_tree, x_tree = jax.tree.structure(init), jax.tree.structure(xs)

    # A traced number of sweeps enters the manual region as a (replicated) argument.
    k = options.iterations if options is not None and options.traced else None

    def local(init, xs, const_args, k):
        run_options = options if k is None else dataclasses.replace(options, iterations=k)
        # Traced again here, inside the shard_map, so the step's jaxpr has this device's types; the
        # closed-over values it finds are the same objects as outside: swap in the arguments.
        x0 = jax.tree.unflatten(x_tree, [a[0] for a in xs])
        converted, inner = jax.closure_convert(step, jax.tree.unflatten(carry_tree, init), x0)
        consts = tuple(next((a for o, a in zip(outer_consts, const_args) if o is c), c) for c in inner)
        stack, ys_tree = _step_stack(
            converted, consts, init, x0, carry_tree, length=length, unroll=unroll, options=stack_options
        )
        micro = None
        if microbatches is not None:  # the step traced again on one microbatch
            microbatch_check(init, microbatches, name=_NAME)
            one = [a[0] for a in microbatch_parts(init, microbatches)]
            try:
                small, inner = jax.closure_convert(step, jax.tree.unflatten(carry_tree, one), x0)
                small_consts = tuple(next((a for o, a in zip(outer_consts, const_args) if o is c), c) for c in inner)
                micro, _ = _step_stack(small, small_consts, one, x0, carry_tree, length=length, unroll=unroll, options=stack_options)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"{_NAME}: with microbatches={microbatches} each layer runs on {one[0].shape[0]} rows of the "
                    "carry, with `xs` and the values `block` closes over unsplit; this block does not "
                    f"({type(err).__name__}: {str(err).splitlines()[0]}). Microbatches split the carry only: "
                    "per-step inputs or closed-over values with a batch axis cannot be split."
                ) from None
        forward, batches, piped = layers.chunk_forward(
            stack, init, xs, consts, axis=axis, size=size, microbatches=microbatches, micro=micro, name=_NAME
        )
        if options is None or not stack.split.has_residual_path:
            final, ys, _, _ = forward(init, xs, consts)
        else:
            placement = lambda: OnMeshAxis(axis, size)
            final, ys = differentiate(
                piped, init, xs, consts, options=run_options, forward=forward, placement=placement, microbatches=batches
            )
        return jax.tree.unflatten(carry_tree, final), jax.tree.unflatten(ys_tree, ys)

    return layers.over_devices(local, jax.tree.leaves(init), jax.tree.leaves(xs), outer_consts, k, mesh=mesh, axis=axis)


def _step_stack(converted, consts, init, x0, carry_tree, **options):
    """The :class:`hbpjax._analysis.stacks.ScanStack` of ``converted(h, x, *consts)`` and its outputs' tree."""
    x_leaves, x_tree = jax.tree.flatten(x0)
    nc, nh = len(consts), len(init)
    found = {}

    def flat_step(*args):
        h = jax.tree.unflatten(carry_tree, args[nc : nc + nh])
        new, ys = converted(h, jax.tree.unflatten(x_tree, args[nc + nh :]), *args[:nc])
        y_leaves, found["ys"] = jax.tree.flatten(ys)
        return [*jax.tree.leaves(new), *y_leaves]

    body = jax.make_jaxpr(flat_step)(*consts, *init, *x_leaves)
    _, stack = scan_stack(body, num_consts=nc, num_carry=nh, opaque=_marks.is_block, **options)
    return stack, found["ys"]
