"""The Highway-BP backward of a residual stack, on one device or split over devices.

Given the saved carries and the cotangents arriving from outside, :func:`highway_backward` runs
four steps, each a function here (or in :mod:`hbpjax._backward.linearize`):

1. :func:`hbpjax._backward.linearize.linearize`: every layer's block path linearized once, all at once;
2. :func:`residual_path`: the diagonal ``K`` of the residual's carry Jacobian, and the prefix
   scan along it prepared once (:mod:`hbpjax._backward.prefix`);
3. :func:`sweep`: the residual-path-only recurrence solved with one prefix scan, then ``k`` sweeps
   of "all layers' VJPs at once, then one prefix scan";
4. :func:`read_cotangents`: parameter, input and initial-carry cotangents off one last VJP at the
   final estimate.

Everything that crosses the boundary of the layers this device holds goes through a
:class:`~hbpjax._backward.placements.Placement`; :func:`hbpjax._backward.differentiate.differentiate`
is the one ``jax.custom_vjp`` built on it, used by single-device and layer-parallel stacks alike.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._front.options import Options
from .linearize import Linearization, linearize, recomputes
from .placements import Placement
from .prefix import own_buffer
from .prefix import prepare_jitted as _prepare
from .stack import BLOCK, CARRY, Stack

PyTree = Any

tmap = jax.tree.map


def highway_backward(
    stack: Stack, options: Options, placement: Placement, residuals, cotangents, *, report: bool = False, forward_linearization=None
):
    """Cotangents of ``(init, xs, consts)`` by Highway-BP with ``options.iterations`` sweeps.

    The sweeps solve for ``y[j]``, the cotangent of the carry *entering* layer ``j`` (``h_j``), so
    that ``y[j] = e[j - 1] + (K_j + J_j)^T y[j + 1]`` pairs each layer's own diagonal ``K_j`` with
    ``y[j]``: the prefix scan reads ``K`` where the linearization left it, with no shifted copy.

    Args:
      stack: the stack's description.
      options: iterations, tol, save_linearization.
      placement: where this chunk of the stack sits.
      residuals: ``(init, saved, xs, consts)`` as saved by the forward of :func:`differentiate`.
      cotangents: ``(ct_final, ct_ys)``: of the final carry leaves and of the per-step outputs.
      report: also track the sweeps run and the final relative change of ``y``.
      forward_linearization: ``(plan, values)`` where the forward linearized every layer (step 1
        is then reading its values), or ``None`` (step 1 linearizes here).

    Returns:
      ``((ct_init, ct_xs, ct_consts), report)``; ``report`` is ``float32[2]``, ``[sweeps run, last
      relative change]`` (NaN when no sweep ran), or ``None`` without ``report``.
    """
    at, lin, path, sweeps = _start(stack, options, placement, residuals, cotangents, forward_linearization)
    after, done = sweep(stack, options, placement, at=at, lin=lin, path=path, sweeps=sweeps, report=report)
    return read_cotangents(stack, placement, residuals[0], after, ct_block=at.ct_block, k_first=path.k_first, lin=lin), done


def highway_sweeps(stack: Stack, options: Options, placement: Placement, residuals, cotangents, *, report: bool = False,
                   forward_linearization=None):
    """Steps 1-3 of :func:`highway_backward`: ``(after, k_first, ct_block, report)``, what
    :func:`final_read` needs besides the residuals (all arrays: this part may run under ``vmap``)."""
    at, lin, path, sweeps = _start(stack, options, placement, residuals, cotangents, forward_linearization)
    after, done = sweep(stack, options, placement, at=at, lin=lin, path=path, sweeps=sweeps, report=report)
    return after, path.k_first, at.ct_block, done


def final_read(stack: Stack, options: Options, placement: Placement, residuals, *, after, k_first, ct_block,
               forward_linearization=None):
    """Step 4 of :func:`highway_backward` after :func:`highway_sweeps`: the layers linearized
    again from what the forward saved (no collective), then :func:`read_cotangents`."""
    init, saved, xs, consts = residuals
    plan, values = forward_linearization or (None, None)
    h_prev, xe, values = _layer_inputs(stack, saved, xs, values)
    if plan is not None:
        lin = plan.linearization(h_prev, xe, consts, values)
    else:
        lin = linearize(stack, options, h_prev, xe, consts, read_once=False)
    return read_cotangents(stack, placement, init, after, ct_block=ct_block, k_first=k_first, lin=lin)


def _start(stack, options, placement, residuals, cotangents, forward_linearization):
    """``(at, lin, path, sweeps)``: steps 1 and 2, and the number of sweeps to run."""
    _, saved, xs, consts = residuals
    plan, values = forward_linearization or (None, None)
    at = incoming(stack, placement, saved, xs, cotangents, values)
    exact_after = max(placement.total_length(saved[0].shape[0]) - 1, 0)  # L-1 sweeps are already exact
    sweeps: Any
    if options.traced:  # known at run time only: a loop with a run-time trip count
        sweeps = jnp.clip(options.iterations, 0, exact_after)
    else:
        sweeps = min(cast(int, options.iterations), exact_after)
    if plan is not None:
        lin = plan.linearization(at.h_prev, at.xe, consts, at.linearization)
    else:
        read_once = not options.traced and sweeps == 0 and not stack.ys_reach_carry
        lin = linearize(stack, options, at.h_prev, at.xe, consts, read_once=read_once)
    return at, lin, residual_path(stack, placement, at.h_prev, lin), sweeps


@dataclasses.dataclass(frozen=True)
class Incoming:
    """What the backward of a chunk starts from (per differentiated carry leaf, lists).

    Attributes:
      h_prev: the carry entering every layer (``h_0 .. h_{L-1}``, as the forward saved it).
      xe: every layer's per-step inputs and its non-differentiated carry leaves (state).
      e: the cotangent arriving from outside at every layer's output ``h_1 .. h_L`` (``None``
        where none does).
      ct_block: the cotangents of the block's own per-step outputs.
      tail: the cotangent from outside at the carry past this chunk's last layer.
      linearization: what the forward computed of every layer's linearization (or ``None``).
    """

    h_prev: list
    xe: tuple
    e: list
    ct_block: list
    tail: list
    linearization: Any = None


def incoming(stack: Stack, placement: Placement, saved, xs, cotangents, linearization=None) -> Incoming:
    """The layers' inputs and the cotangents from outside, in the order the forward ran."""
    ct_final, ct_ys = cotangents
    if stack.reverse:  # the same maths on the steps in the order the forward ran them
        ct_ys = _flip(ct_ys)
    h_prev, xe, linearization = _layer_inputs(stack, saved, xs, linearization)
    e = [None] * len(stack.diff)
    ct_block = [None] * stack.block_outputs
    for route, ct in zip(stack.y_route, jax.tree.leaves(ct_ys)):
        if route is not None and route[0] == CARRY:
            e[route[1]] = ct if e[route[1]] is None else e[route[1]] + ct
        elif route is not None and route[0] == BLOCK:
            ct_block[route[1]] = ct
    # The carry past this chunk's last layer is in no chunk's y: its cotangent is the final carry's
    # and, on the chunk that ends the stack, the last step's output's.
    last = placement.on_last([ct_final[i] for i in stack.diff])
    tail = [lj if ej is None else lj + placement.only_last(_last(ej)) for ej, lj in zip(e, last)]
    return Incoming(h_prev, xe, e, ct_block, tail, linearization)


def _layer_inputs(stack: Stack, saved, xs, linearization):
    """``(h_prev, xe, linearization)`` of every layer, in the order the forward ran them."""
    xs = stack.layer_inputs(xs)
    if stack.reverse:
        saved, xs = _flip(saved), _flip(xs)
        if linearization is not None:
            linearization = (_flip(linearization[0]), linearization[1])
    return [saved[i] for i in stack.diff], (xs, [saved[i] for i in stack.state]), linearization


@dataclasses.dataclass(frozen=True)
class ResidualPath:
    """The residual path the prefix scan follows, ``K' = (1 - gamma) * clip(K, -1, 1)``.

    What the scan leaves out of ``K`` (``gamma``'s share, and any ``|K| > 1``) joins the block's
    term in the sweeps (:meth:`rest`); ``K + J`` is unchanged, so ``k >= L`` stays exact.

    Attributes:
      k_first: ``K`` of the first layer (the initial carry's cotangent needs the whole of it).
      k_last: ``K'`` of this chunk's last layer.
      solve: ``solve(u) -> y`` with ``y[j] = u[j] + K'[j] y[j + 1]`` over the whole stack.
      k_diag, k_scan: ``K`` and ``K'`` of every layer; ``None`` when ``K = 1`` (``K' = 1 - gamma``).
      gamma: the stack's ``gamma``.
      clamp: whether ``K'`` is clipped (``|K| <= 1`` is not known and the block reads the carry).
    """

    k_first: list
    k_last: list
    solve: Callable
    k_diag: list | None
    k_scan: list | None
    gamma: float
    clamp: bool

    def rest(self, after):
        """What the scan leaves out of ``K``: ``(K - K')[j] y[j + 1]``, or ``None`` if nothing."""
        gamma = self.gamma
        if not (self.clamp or gamma):
            return None
        if self.k_scan is None:  # K = 1: the rest is gamma
            return tmap(lambda a: gamma * a, after)
        if self.clamp or gamma == 1.0:
            return tmap(lambda k, ks, a: k * a - ks * a, self.k_diag, self.k_scan, after)
        ratio = gamma / (1.0 - gamma)  # K - K' = gamma K = ratio K' (gamma < 1 here)
        return tmap(lambda ks, a: ratio * (ks * a), self.k_scan, after)


def residual_path(stack: Stack, placement: Placement, h_prev: list, lin: Linearization) -> ResidualPath:
    """Step 2: ``K`` of every layer (as the forward computed it, or one ``jvp`` with ones) and the
    prefix scan along ``K'``, prepared once for all sweeps.

    ``K'`` is clipped to ``[-1, 1]``: with ``|K| > 1`` the sweeps would add up terms of size
    ``|K|^L`` that cancel (garbage, then NaN, where backprop is finite). The clip is skipped where
    the split proves ``|K| <= 1`` (gates, ReLU masks, ``h + z``) and where the block ignores the
    carry (``J = 0``: ``K`` is kept whole, so ``k = 0`` stays exact, and the scan caps its products).
    """
    gamma = stack.options.gamma
    clamp = stack.block_reads_carry and not stack.k_within_one
    solve = placement.constant_k_solver(1.0 - gamma) if stack.k_is_one else None
    if solve is not None:  # h + z: K = 1, so K' = 1 - gamma is a constant
        ones = [jnp.ones((), h.dtype) for h in h_prev]
        return ResidualPath(ones, [1 - gamma for _ in ones], solve, None, None, gamma, clamp=False)
    if lin.k_diag is not None:
        k_diag = lin.k_diag
    elif lin.z_of is None:  # K = 1 (the forward had nothing to compute)
        k_diag = [jnp.ones_like(h) for h in h_prev]
    else:
        residuals, z = jax.vmap(stack.residual), lin.z_of()
        _, k_diag = jax.jvp(lambda h: residuals(h, z), (h_prev,), (tmap(jnp.ones_like, h_prev),))
    if clamp:
        scanned = lambda k: (1.0 - gamma) * _unit(k)
    else:
        scanned = lambda k: (1.0 - gamma) * k if gamma else k
    k_scan = tmap(scanned, k_diag)
    prepared = _prepare(k_scan)  # the k-only half of the prefix scan, shared by every sweep
    return ResidualPath(
        tmap(_first, k_diag), [_last(k) for k in k_scan], placement.solver(prepared, k_scan), k_diag, k_scan,
        gamma, clamp,
    )


def sweep(stack: Stack, options: Options, placement: Placement, *, at: Incoming, lin: Linearization, path: ResidualPath,
          sweeps, report: bool):
    """Step 3: the first estimate (the residual path alone), then ``sweeps`` sweeps.

    Every sweep solves ``y = solve(b + J^T y_previous + rest)``, with ``b`` what comes from
    outside: ``b[j] = e[j - 1]`` (the previous chunk's last ``e`` at ``j = 0``) plus, at the chunk's
    last layer, ``K'`` times the cotangent from outside at ``h_L``. Only ``b`` is kept across the
    sweeps (XLA reads the cotangents from outside once, to build it). The sweeps carry ``y``
    shifted to the layers' outputs (``after``, what the VJPs read): the shift fuses into the scan.

    Returns:
      ``(after, report)``: the final cotangents of every layer's output, and the report (or ``None``).
    """
    b = []
    for h, ej, kl, t in zip(at.h_prev, at.e, path.k_last, at.tail):
        bj = jnp.zeros_like(h) if ej is None else _shift_down(ej, placement.from_previous(ej[-1]))
        b.append(_add_at_last(bj, kl * t))

    def outputs(y):
        """The cotangent of every layer's output: ``y[j + 1]``, and past the chunk's end the next
        chunk's ``y[0]`` plus what comes from outside."""
        nxt = placement.from_next(tmap(lambda a: a[0], y))
        return tmap(lambda a, n, t: _shift_up(a, n + t), y, nxt, at.tail)

    def one_sweep(after):
        terms = lin.vjp(after, at.ct_block)[0]
        rest = path.rest(after)
        if rest is not None:
            terms = tmap(jnp.add, terms, rest)
        # The right-hand side in a buffer of its own: fused into the scan's levels, it would keep
        # the larger operands it is summed from alive through the whole scan.
        return outputs(path.solve(tmap(lambda bj, t: own_buffer(bj + t), b, terms)))

    # Per-step outputs of the block that read the carry reach it through one VJP of every layer (the
    # sweep from y = 0); without them the first estimate is the residual path alone, solve(b).
    if at.ct_block and stack.ys_reach_carry:
        after = one_sweep(tmap(jnp.zeros_like, at.h_prev))
    elif path.k_scan is None and all(ej is None for ej in at.e):
        after = tmap(functools.partial(_discounted, 1.0 - path.gamma), at.h_prev, at.tail)  # K = 1, b = 0 but at h_L
    else:
        after = outputs(path.solve(b))
    straight_line = not options.traced and (
        stack.options.linearize == "unroll" or ((not recomputes(stack, options) or stack.remat is not None) and sweeps <= STRAIGHT_LINE_SWEEPS)
    )
    return _run_sweeps(one_sweep, after, sweeps, tol=options.tol, placement=placement, report=report, straight_line=straight_line)


# Up to this many sweeps (a number known at trace time) run as straight-line code rather than a
# loop. XLA keeps everything a loop reads from outside alive, and in a layout of the loop's, for all
# of the loop; written out, each sweep's temporaries are freed as soon as it is done and the last
# sweep shares buffers with the final VJP. Past this many sweeps, compile time (which grows with the
# number of sweeps written out) matters more. Not where each sweep recomputes the linearization: there
# the loop is what keeps one sweep's recomputation from being scheduled beside the next one's.
STRAIGHT_LINE_SWEEPS = 16


def _run_sweeps(sweep, w, sweeps, *, tol, placement, report, straight_line):
    """``sweeps`` sweeps from ``w`` (stopping once the relative change is ``<= tol``, if given).

    Returns ``(w, report)``, ``report = float32[2] [sweeps run, last relative change]`` when asked
    for. Without ``tol`` and ``report`` this is a plain loop over the sweeps (or, with
    ``straight_line``, the sweeps written out one after the other); otherwise every sweep
    also measures how much ``w`` changed, and ``tol`` skips the remaining ones (``lax.cond``: they
    cost nothing at run time) rather than ending a ``while_loop``, so the result can itself be
    differentiated (a gradient penalty, meta-learning). A traced ``sweeps`` makes it a while loop.
    """
    if tol is None and not report:
        if straight_line:
            for _ in range(sweeps):
                w = sweep(w)
        else:  # a loop over the k sweeps (never over the L layers): compile time does not grow with k
            w = lax.fori_loop(0, sweeps, lambda _, w: sweep(w), w)
        return w, None

    def sq_norm(tree):
        return placement.total(sum(jnp.sum(jnp.square(jnp.abs(leaf))) for leaf in jax.tree.leaves(tree)))

    def measured(w_old, change, count):
        w_new = sweep(w_old)
        diff, size = sq_norm(tmap(jnp.subtract, w_new, w_old)), sq_norm(w_new)
        change = jnp.where(size > 0, jnp.sqrt(diff / jnp.where(size > 0, size, 1.0)), 0.0)
        return w_new, lax.stop_gradient(change).astype(jnp.float32), count + 1

    def body(_, state):
        if tol is None:
            return measured(*state)
        return lax.cond(state[1] > tol, measured, lambda *s: s, *state)

    state = (w, jnp.float32(jnp.inf), jnp.int32(0))
    if straight_line:
        for i in range(sweeps):
            state = body(i, state)
    else:
        state = lax.fori_loop(0, sweeps, body, state)
    w, change, count = state
    return w, jnp.stack([count.astype(jnp.float32), jnp.where(count > 0, change, jnp.nan)])


def read_cotangents(stack: Stack, placement: Placement, init, after, *, ct_block, k_first, lin: Linearization):
    """Step 4: ``(ct_init, ct_xs, ct_consts)`` from the final cotangents ``after`` of every layer's
    output, through one last VJP of every layer (``ct_block``: the cotangents of the block's own
    per-step outputs; ``k_first``: ``K`` of the first layer)."""
    first = [_first(a) for a in after]  # read before the VJP, which may write over `after` in place
    ct_h, (ct_xs, _), ct_consts = lin.vjp(after, ct_block)
    # The initial carry gets the full Jacobian of the first layer: (K_0 + J_0)^T after[0].
    ct_h0 = placement.reduce_first(tmap(lambda k, a, g: k * a + g[0], k_first, first, ct_h))
    ct_init = [None] * len(init)
    for i, g in zip(stack.diff, ct_h0):
        ct_init[i] = g
    ct_xs = tmap(_none_if_float0, ct_xs)
    if stack.reverse:
        ct_xs = tmap(lambda a: None if a is None else jnp.flip(a, 0), ct_xs)
    ct_consts = tuple(None if _none_if_float0(c) is None else placement.reduce_shared(c) for c in ct_consts)
    return ct_init, stack.layer_cotangents(ct_xs), ct_consts


def _none_if_float0(ct):
    """Integer / key inputs get a ``None`` (zero) cotangent from the custom_vjp."""
    if ct is None or getattr(ct, "dtype", None) == jax.dtypes.float0:
        return None
    return ct


def _discounted(discount: float, h, tail):
    """The first estimate where ``K' = discount`` is constant and only the stack's end receives a
    cotangent (``tail``): every layer's output gets ``discount ** (layers after it) * tail``.

    This is ``outputs(solve(b))`` in closed form: no prefix scan, and no stacked array of
    cotangents that the layers' VJPs would each copy a slice out of (a broadcast, which XLA fuses
    into each layer's transpose). The powers are constants, computed in float64 when tracing.
    """
    n = h.shape[0]
    tail = own_buffer(tail)  # once: XLA would compute it again inside every layer's read
    if discount == 1.0:
        return jnp.broadcast_to(tail, h.shape)
    powers = np.float64(discount) ** np.arange(n - 1, -1, -1, dtype=np.float64)
    return jnp.asarray(powers, tail.dtype).reshape((n,) + (1,) * tail.ndim) * tail[None]


def _unit(k):
    """``k`` with its magnitude capped at 1 (``clip`` for reals; complex ``k`` keep their phase)."""
    if jnp.iscomplexobj(k):
        return k / jnp.maximum(jnp.abs(k), 1.0)
    return jnp.clip(k, -1.0, 1.0)


def _at_last(a):
    """A boolean mask over ``a``'s leading axis, true at its last row (broadcasts against ``a``)."""
    return (jnp.arange(a.shape[0]) == a.shape[0] - 1).reshape((-1,) + (1,) * (a.ndim - 1))


def _add_at_last(a, x):
    """``a`` with ``x`` added to ``a[-1]``: elementwise (fused, in place), not a scatter that would
    copy ``a`` where it is read elsewhere."""
    return a + jnp.where(_at_last(a), x[None], jnp.zeros_like(x)[None])


def _last(a):
    """``a[-1]`` as a small buffer of its own: a reduction, which XLA does not fuse into the ops that
    read it (a slice would be, keeping all of ``a`` alive for as long as they run). It reads the
    last two rows only (a reduction over one row would be simplified back into a slice)."""
    two = a[-2:]
    return jnp.sum(jnp.where(_at_last(two), two, jnp.zeros_like(two)), axis=0)


def _first(a):
    """``a[0]`` as a small buffer of its own (see :func:`_last`)."""
    two = a[:2]
    return jnp.sum(jnp.where(_at_last(two), jnp.zeros_like(two), two), axis=0) if two.shape[0] == 2 else two[0]


def _shift_up(a, fill):
    """``out[j] = a[j + 1]``, ``out[-1] = fill``."""
    return jnp.concatenate([a[1:], fill[None]], axis=0)


def _shift_down(a, fill):
    """``out[j] = a[j - 1]``, ``out[0] = fill``."""
    return jnp.concatenate([fill[None], a[:-1]], axis=0)


def _flip(tree):
    return tmap(lambda a: jnp.flip(a, 0), tree)
