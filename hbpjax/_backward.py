"""The Highway-BP backward of a residual stack, for a stack on one device or split over devices.

Given the saved carries and the cotangents arriving from outside, :func:`highway_backward`

1. linearizes every layer once, in parallel: one ``jax.vjp`` over all layers of the block path
   (the block, then the residual with its own carry held fixed), per-step inputs mapped and
   shared values broadcast, so shared weights get one summed gradient instead of a ``(L, ...)``
   stack of per-step gradients. What it stores for the sweeps is what is costly to recompute
   (matmuls, transcendentals); each VJP redoes the elementwise arithmetic;
2. takes the diagonal ``K`` of the residual's carry Jacobian (one ``jvp`` with ones);
3. solves the residual-path-only recurrence with one prefix scan, then runs ``k`` sweeps of "all
   layers' VJPs at once, then one prefix scan";
4. reads parameter, input and initial-carry cotangents off one last VJP at the final estimate.

Everything that crosses the boundary of the stack's chunk goes through a :class:`Chain`:
:class:`Local` for a whole stack on one device, or :class:`DeviceChain` for a stack whose layers are
split in contiguous chunks over a mesh axis (inside ``shard_map``). The chain's neighbours exchange
one carry-sized value per sweep and join the prefix scan with one gather of per-device summaries, so
the backward holds no loop over layers or devices.

:func:`differentiate` is the one ``jax.custom_vjp`` built on it, used by single-device and
layer-parallel stacks alike.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _jaxpr, _prefix
from ._common import own_buffer
from ._stack import BLOCK, CARRY, Stack

PyTree = Any

# Jitted so that eager (un-jitted) gradients compile the O(log L) levels once per shape instead of
# dispatching them op by op; under an outer jit they are simply inlined.
_plan = jax.jit(_prefix.plan)
_solve = jax.jit(_prefix.solve)

tmap = jax.tree.map


class Chain(Protocol):
    """Where this stack (or this chunk of it) sits: what comes before and after it.

    The extension point of the backward: a new way of splitting a stack (over devices, over hosts,
    in pipeline stages) is a new chain. Per-layer quantities are pytrees of arrays with a leading
    axis over this chunk's layers.
    """

    def total_length(self, local_length: int) -> int:
        """The number of layers of the whole stack, given this chunk's."""

    def from_next(self, first: PyTree) -> PyTree:
        """The next chunk's value of a per-layer quantity at its first layer (zeros past the end)."""

    def from_previous(self, last: PyTree) -> PyTree:
        """The previous chunk's value of a per-layer quantity at its last layer (zeros before the
        first chunk)."""

    def on_last(self, x: PyTree) -> PyTree:
        """``x`` where this chunk ends the stack, zeros elsewhere, for ``x`` the cotangent of a
        replicated value (the final carry's)."""

    def only_last(self, x: PyTree) -> PyTree:
        """This chunk's own ``x`` where it ends the stack, zeros elsewhere."""

    def solver(self, planned: PyTree, k: PyTree) -> Callable[[PyTree], PyTree]:
        """``solve(u) -> y`` for ``y[j] = u[j] + k[j] * y[j + 1]`` over the whole stack (``y`` past
        this chunk's end is the next chunk's ``y[0]``), given this chunk's ``k`` and its plan
        ``_prefix.plan(k)``."""

    def reduce_first(self, x: PyTree) -> PyTree:
        """The cotangent of the initial carry from this chunk's (only the first chunk's counts)."""

    def reduce_shared(self, x: PyTree) -> PyTree:
        """This chunk's contribution to the cotangent of a value shared by all layers."""

    def total(self, x: jax.Array) -> jax.Array:
        """A scalar summed over all chunks (norms)."""


class Local:
    """The whole stack is here: nothing before it but ``init``, nothing after it."""

    def total_length(self, local_length: int) -> int:
        return local_length

    def from_next(self, first):
        """The next chunk's first value of a per-layer quantity (zero past the end)."""
        return tmap(jnp.zeros_like, first)

    def from_previous(self, last):
        """The previous chunk's last value of a per-layer quantity (zero before the start)."""
        return tmap(jnp.zeros_like, last)

    def on_last(self, x):
        """``x`` where this chunk ends the stack, zero elsewhere."""
        return x

    def only_last(self, x):
        """This chunk's ``x`` where it ends the stack, zero elsewhere."""
        return x

    def solver(self, planned, k):
        return lambda u: _solve(planned, u)

    def reduce_first(self, x):
        """The cotangent of ``init``: only the chunk holding layer 1 contributes."""
        return x

    def reduce_shared(self, x):
        """This chunk's contribution to the cotangent of a shared (replicated) value."""
        return x

    def total(self, x):
        """A sum over all chunks (norms)."""
        return x


class DeviceChain:
    """This chunk is one of ``size`` contiguous chunks along the manual mesh axis ``axis``."""

    def __init__(self, axis: str, size: int):
        self.axis, self.size = axis, size
        self.index = lax.axis_index(axis)

    def total_length(self, local_length):
        return local_length * self.size

    def _shift(self, x, step):
        pairs = [(i, i + step) for i in range(self.size) if 0 <= i + step < self.size]
        return tmap(lambda a: lax.ppermute(a, self.axis, perm=pairs), x)

    def from_next(self, first):
        return self._shift(first, -1)  # the last chunk receives zeros

    def from_previous(self, last):
        return self._shift(last, +1)  # the first chunk receives zeros

    def on_last(self, x):
        # The cotangent of a replicated output reaches the devices in parts (shard_map splits it);
        # their sum is the whole cotangent, which belongs to the chunk that computed the output.
        return self.only_last(tmap(lambda a: lax.psum(a, self.axis), x))

    def only_last(self, x):
        return tmap(lambda a: jnp.where(self.index == self.size - 1, a, jnp.zeros_like(a)), x)

    def solver(self, planned, k):
        # Within the chunk w = w_local + P * W_next, where W_next is w at the first layer of the next
        # chunk and P[j] = prod_{m >= j} k[m] (k only: computed once per backward).
        last_only = tmap(lambda a: jnp.zeros_like(a).at[-1].set(a[-1]), k)
        P = _solve(planned, last_only)
        A_all = self._gather(tmap(lambda p: p[0], P))  # each chunk's transfer coefficient
        A_plan = _plan(A_all)

        def solve(u):
            w_local = _solve(planned, u)
            b_all = self._gather(tmap(lambda w: w[0], w_local))
            # The scan over the chunks' summaries: w_first[c] = b[c] + A[c] * w_first[c + 1].
            w_first = _solve(A_plan, b_all)
            w_next = tmap(
                lambda wf: lax.dynamic_index_in_dim(
                    jnp.concatenate([wf[1:], jnp.zeros_like(wf[:1])]), self.index, keepdims=False
                ),
                w_first,
            )
            return tmap(lambda wl, p, wn: wl + p * wn[None], w_local, P, w_next)

        return solve

    def _gather(self, x):
        """Every chunk's ``x`` stacked on a new leading axis, on every device (one collective).

        A psum of one-hot rows rather than ``all_gather``, whose result can carry an explicit data
        sharding on the new axis under a partially manual shard_map.
        """

        def one(a):
            mine = (jnp.arange(self.size) == self.index).reshape((self.size,) + (1,) * a.ndim)
            return lax.psum(jnp.where(mine, a[None], jnp.zeros_like(a)[None]), self.axis)

        return tmap(one, x)

    # Inside shard_map(check_vma=False) the cotangent of a replicated input is summed over the
    # devices by shard_map itself: each chunk returns its own contribution.
    def reduce_first(self, x):
        return tmap(lambda a: jnp.where(self.index == 0, a, jnp.zeros_like(a)), x)

    def reduce_shared(self, x):
        return x

    def total(self, x):
        return lax.psum(x, self.axis)


def differentiate(
    stack: Stack,
    init: list,
    xs: PyTree,
    consts: tuple,
    *,
    settings,
    forward: Callable,
    chain: Callable[[], Chain],
    slot: jax.Array | None = None,
):
    """``(final carry, per-step outputs)`` of ``forward``, with Highway-BP as its backward.

    The one ``jax.custom_vjp`` of hbpjax: single-device stacks pass
    :func:`hbpjax._stack.scan_forward` and :class:`Local`, layer-parallel ones their pipelined
    forward and a :class:`DeviceChain`.

    Args:
      stack: the stack's description.
      init, xs, consts: the flat carry leaves, the per-step inputs and the shared values.
      settings: the :class:`hbpjax._context.HighwaySettings` of the backward.
      forward: ``forward(init, xs, consts) -> (final, ys, saved)``.
      chain: ``chain() -> Chain``, called inside the backward (a device chain reads its position on
        the mesh axis there).
      slot: optional ``float32[2]`` input that the stack ignores; its cotangent is the sweep report
        ``[sweeps run, final relative change]`` (how ``return_report=True`` gets it out).
    """

    # A traced number of sweeps is an input of the custom_vjp (its backward may not close over it).
    k = settings.iterations if settings.traced else None

    def primal(init, xs, consts, k, slot):
        final, ys, _ = forward(init, xs, consts)
        return final, ys

    def fwd(init, xs, consts, k, slot):
        final, ys, saved = forward(init, xs, consts)
        return (final, ys), (init, saved, xs, consts, k)

    def bwd(residuals, cotangents):
        *residuals, k = residuals
        run_settings = settings if k is None else dataclasses.replace(settings, iterations=k)
        cts, report = highway_backward(stack, run_settings, chain(), residuals, cotangents, report=slot is not None)
        return (*cts, None, None if slot is None else report.astype(slot_dtype))

    slot_dtype = None if slot is None else slot.dtype

    run = jax.custom_vjp(primal)
    run.defvjp(fwd, bwd)
    return run(init, xs, consts, k, slot)


def _reverse_sum(discount, u):
    """``w[j] = u[j] + discount * w[j + 1]``: a reverse cumulative sum (``discount = 1``) or, for
    ``gamma > 0``, its discounted form (then through the prefix scan with a constant ``k``)."""
    if discount == 1.0:
        return tmap(lambda a: lax.cumsum(a, axis=0, reverse=True), u)
    return _solve(_plan(tmap(lambda a: jnp.full_like(a, discount), u)), u)


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


def _shift_up(a, fill):
    """``out[j] = a[j + 1]``, ``out[-1] = fill``."""
    return jnp.concatenate([a[1:], fill[None]], axis=0)


def _last(a):
    """``a[-1]`` as a small buffer of its own: a reduction, which XLA does not fuse into the ops that
    read it (a slice would be, keeping all of ``a`` alive for as long as they run). It reads the
    last two rows only (a reduction over one row would be simplified back into a slice)."""
    two = a[-2:]
    return jnp.sum(jnp.where(_at_last(two), two, jnp.zeros_like(two)), axis=0)


def _shift_down(a, fill):
    """``out[j] = a[j - 1]``, ``out[0] = fill``."""
    return jnp.concatenate([fill[None], a[:-1]], axis=0)


def _flip(tree):
    return tmap(lambda a: jnp.flip(a, 0), tree)


def highway_backward(stack: Stack, settings, chain: Chain, residuals, cotangents, *, report: bool = False):
    """Cotangents of ``(init, xs, consts)`` by Highway-BP with ``settings.iterations`` sweeps.

    The sweeps solve for ``y[j]``, the cotangent of the carry *entering* layer ``j`` (``h_j``), so
    that ``y[j] = e[j - 1] + (K_j + J_j)^T y[j + 1]`` pairs each layer's own diagonal ``K_j`` with
    ``y[j]``: the prefix scan reads ``K`` where the linearization left it, with no shifted copy.

    Args:
      stack: the stack's description.
      settings: iterations and tol.
      chain: where this chunk of the stack sits.
      residuals: ``(init, saved, xs, consts)`` as saved by the forward of :func:`differentiate`.
      cotangents: ``(ct_final, ct_ys)``: of the final carry leaves and of the per-step outputs.
      report: also track the sweeps run and the final relative change of ``y``.

    Returns:
      ``((ct_init, ct_xs, ct_consts), report)``; ``report`` is ``float32[2]``, ``[sweeps run, last
      relative change]`` (NaN when no sweep ran), or ``None`` without ``report``.
    """
    init, saved, xs, consts = residuals
    ct_final, ct_ys = cotangents
    if stack.reverse:  # the same maths on the steps in the order the forward ran them
        saved, xs, ct_ys = _flip(saved), _flip(xs), _flip(ct_ys)

    # Inputs of each layer: the carries h_0..h_{L-1}, as the forward saved them.
    prev = saved
    h_prev = [prev[i] for i in stack.diff]
    xe = (xs, [prev[i] for i in stack.state])

    # Cotangent arriving from outside at each differentiated carry h_1..h_L (step j's output is
    # h_{j+1}), and at the block's own per-step outputs.
    e = [None] * len(stack.diff)
    ct_block = [None] * stack.block_outputs
    for route, ct in zip(stack.y_route, jax.tree.leaves(ct_ys)):
        if route is not None and route[0] == CARRY:
            e[route[1]] = ct if e[route[1]] is None else e[route[1]] + ct
        elif route is not None and route[0] == BLOCK:
            ct_block[route[1]] = ct
    outside_only_at_end = all(ej is None for ej in e)  # a deep net read at its output only
    # The cotangent from outside at h_L, the carry past this chunk's last layer that no chunk's y
    # holds: the final carry's, and the last step's output's (on the chunk that ends the stack).
    last = chain.on_last([ct_final[i] for i in stack.diff])
    tail = [lj if ej is None else lj + chain.only_last(_last(ej)) for ej, lj in zip(e, last)]

    exact_after = max(chain.total_length(saved[0].shape[0]) - 1, 0)  # L-1 sweeps are already exact
    if settings.traced:  # known at run time only: a loop with a run-time trip count
        sweeps = jnp.clip(settings.iterations, 0, exact_after)
    else:
        sweeps = min(settings.iterations, exact_after)

    # Linearize every layer once, all in parallel. Shared values are broadcast (in_axes=None):
    # their cotangent is summed inside the transposed ops, never stacked per step. Read by more
    # than one VJP, the linearization stores only what is costly to recompute (_lean); read once
    # (k = 0 and no per-step block outputs) it is kept whole: nothing to save, no work to redo. A
    # block computing complex values is kept whole too (_holds_complex).
    # What is linearized is the block path of each layer's output (_block_path), so that one VJP
    # takes the cotangents of the layers' outputs to those of their inputs.
    read_once = not settings.traced and sweeps == 0 and not ct_block
    path = _block_path(stack)
    if not settings.save_linearization:
        z, vjp_block = _linearize_in_chunks(path, h_prev, xe, consts)
    else:
        whole = read_once or _holds_complex(jax.vmap(path, in_axes=(0, 0, None)), h_prev, xe, consts)
        block, vjp = (path, jax.vjp) if whole else (_lean(path), _vjp_unrounded)
        if stack.linearize == "unroll":
            z, vjp_block = _linearize_unrolled(block, h_prev, xe, consts, vjp=vjp)
        else:
            _, vjp_block, z = vjp(jax.vmap(block, in_axes=(0, 0, None)), h_prev, xe, consts, has_aux=True)
    all_residuals = jax.vmap(stack.residual)

    def layer_vjp(after):
        """(d h, d xe, d consts) of every layer's block path for the cotangents ``after[j]`` of
        each layer's output."""
        return vjp_block((after, ct_block))

    def outputs(y):
        """The cotangent of every layer's output: ``y[j + 1]``, and past the chunk's end the next
        chunk's ``y[0]`` plus what comes from outside."""
        nxt = chain.from_next(tmap(lambda a: a[0], y))
        return tmap(lambda a, n, t: _shift_up(a, n + t), y, nxt, tail)

    # The residual path the prefix scan solves: K' = (1 - gamma) * clip(K, -1, 1). What is left of
    # K (gamma's share, and any |K| > 1) joins the block's term in the sweeps; K + J is unchanged,
    # so k >= L stays exact. With |K| > 1 the sweeps would otherwise add up terms of size |K|^L
    # that cancel (garbage, then NaN, where backprop is finite). The clip is skipped where the
    # split proves |K| <= 1 (gates, ReLU masks, h + z) and where the block ignores the carry (J = 0:
    # K is kept whole, so k = 0 stays exact, and the scan caps its products, see _prefix).
    gamma = stack.gamma
    clamp = stack.block_reads_carry and not stack.k_within_one
    if stack.k_is_one and isinstance(chain, Local):
        # h + z: K = 1, so K' = 1 - gamma is a constant and the scan a (discounted) reverse sum.
        k_diag = k_scan = None
        k_first = [jnp.ones((), h.dtype) for h in h_prev]
        solve = functools.partial(_reverse_sum, 1.0 - gamma)
    else:
        _, k_diag = jax.jvp(lambda h: all_residuals(h, z), (h_prev,), (tmap(jnp.ones_like, h_prev),))
        if clamp:
            scanned = lambda k: (1.0 - gamma) * _unit(k)
        else:
            scanned = lambda k: (1.0 - gamma) * k if gamma else k
        k_first = tmap(lambda k: k[0], k_diag)
        k_scan = tmap(scanned, k_diag)
        planned = _plan(k_scan)  # the k-only half of the prefix scan, shared by every sweep
        solve = chain.solver(planned, k_scan)

    def rest(after):
        """What the scan leaves out of K: (K - K')[j] y[j+1]."""
        if k_scan is None:  # K = 1: the rest is gamma
            return tmap(lambda a: gamma * a, after)
        if clamp or gamma == 1.0:
            return tmap(lambda k, ks, a: k * a - ks * a, k_diag, k_scan, after)
        ratio = gamma / (1.0 - gamma)  # K - K' = gamma K = ratio K' (gamma < 1 here)
        return tmap(lambda ks, a: ratio * (ks * a), k_scan, after)

    def block_terms(after):
        """``J^T y[j+1] + rest``: what the blocks (and the rest of K) add to the right-hand side."""
        u = layer_vjp(after)[0]
        if clamp or gamma:
            u = tmap(jnp.add, u, rest(after))
        return u

    # Every sweep solves y = solve(b + terms(y_previous)), with b what comes from outside: b[j] =
    # e[j - 1] (the previous chunk's last e at j = 0) plus, at the chunk's last layer, K' times the
    # cotangent from outside at h_L. Only b is kept across the sweeps (XLA reads the cotangents
    # from outside once, to build it).
    k_last = [jnp.ones((), h.dtype) - gamma for h in h_prev] if k_scan is None else [k[-1] for k in k_scan]
    b = []
    for h, ej, kl, t in zip(h_prev, e, k_last, tail):
        bj = jnp.zeros_like(h) if ej is None else _shift_down(ej, chain.from_previous(ej[-1]))
        b.append(_add_at_last(bj, kl * t))

    def sweep(after):
        # The sweeps carry y shifted to the layers' outputs (`after`, what the VJPs read): the
        # shift fuses into the scan's last step. The right-hand side gets a buffer of its own:
        # fused into the scan's levels, it would keep the larger operands it is summed from alive
        # through the whole scan (long GRU of benchmarks/memory.py: 4 MiB more at the peak).
        return outputs(solve(tmap(lambda bj, t: own_buffer(bj + t), b, block_terms(after))))

    # Per-step outputs of the block reach the carries through one VJP of every layer (the sweep
    # from y = 0); without them the first estimate is the residual path alone, solve(b).
    if ct_block:
        after = sweep(tmap(jnp.zeros_like, h_prev))
    elif k_scan is None and not gamma and outside_only_at_end:  # K = 1 and b = 0 but at h_L
        after = outputs(tmap(lambda h, t: jnp.broadcast_to(t, h.shape), h_prev, tail))
    else:
        after = outputs(solve(b))
    after, done = _run_sweeps(
        sweep, after, sweeps, tol=settings.tol, chain=chain, report=report,
        straight_line=not settings.traced and (
            stack.linearize == "unroll" or (settings.save_linearization and sweeps <= STRAIGHT_LINE_SWEEPS)
        ),
    )
    return _cotangents(stack, chain, init, after, k_first, layer_vjp), done


# Up to this many sweeps (a number known at trace time) run as straight-line code rather than a
# loop. XLA keeps everything a loop reads from outside alive, and in a layout of the loop's, for all
# of the loop; written out, each sweep's temporaries are freed as soon as it is done and the last
# sweep shares buffers with the final VJP. On the GPT of benchmarks/models_speed.py k=2 takes 171
# instead of 227 MiB of temporaries (208 against 282 when this was introduced) and compiles in
# about the same time. Past this many sweeps, compile time (which grows with the number of sweeps
# written out) matters more. Not with save_linearization=False: there the loop is what keeps one
# sweep's recomputation from being scheduled beside the next one's (long GRU: 30.5 MiB as a loop,
# 43.9 written out).
STRAIGHT_LINE_SWEEPS = 16


def _run_sweeps(sweep, w, sweeps, *, tol, chain, report, straight_line):
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
        return chain.total(sum(jnp.sum(jnp.square(jnp.abs(leaf))) for leaf in jax.tree.leaves(tree)))

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


def _cotangents(stack, chain, init, after, k_first, layer_vjp):
    """``(ct_init, ct_xs, ct_consts)`` from the final cotangents ``after`` of every layer's output."""
    ct_h, (ct_xs, _), ct_consts = layer_vjp(after)
    # The initial carry gets the full Jacobian of the first layer: (K_0 + J_0)^T after[0].
    ct_h0 = chain.reduce_first(tmap(lambda k, a, g: k * a[0] + g[0], k_first, after, ct_h))
    ct_init = [None] * len(init)
    for i, g in zip(stack.diff, ct_h0):
        ct_init[i] = g
    ct_xs = tmap(_none_if_float0, ct_xs)
    if stack.reverse:
        ct_xs = tmap(lambda a: None if a is None else jnp.flip(a, 0), ct_xs)
    ct_consts = tuple(None if _none_if_float0(c) is None else chain.reduce_shared(c) for c in ct_consts)
    return ct_init, ct_xs, ct_consts


# Elementwise arithmetic and layout changes: cheap to redo from the values they read, fused into
# the ops that read them. The layers' linearization does not store their outputs.
RECOMPUTED = frozenset({
    "abs", "add", "add_any", "broadcast_in_dim", "convert_element_type", "copy", "integer_pow",
    "max", "min", "mul", "neg", "one_minus_square", "reshape", "select_n", "sign", "square",
    "squeeze", "sub", "transpose",
})  # one_minus_square: the derivative of tanh, a primitive of its own in jax 0.12


def _saved(prim, *avals, **params) -> bool:
    """The ``jax.checkpoint`` policy of the layers' linearization: store what is costly to
    recompute (matmuls, transcendentals, reductions, comparisons, ...), not elementwise arithmetic."""
    return prim.name not in RECOMPUTED


def _block_path(stack: Stack) -> Callable:
    """``(h, xe, consts) -> ((residual(h, z), yb), z)`` for ``z, yb = block(h, xe, consts)``, with
    the residual's own ``h`` held fixed.

    Its VJP (the auxiliary ``z`` is not differentiated) takes the cotangent of a layer's output
    straight to ``J^T`` of it, the block path's share (the residual's own dependence on ``h`` is
    the diagonal ``K``, which the prefix scan handles). Linearizing the block alone would leave the
    residual's part outside, and its product (``after * h`` for a gated residual) would enter
    ``jax.checkpoint``'s VJP as the cotangent of ``z``; that VJP passes its cotangents through an
    optimization barrier, so the product would be a carry-sized buffer of its own in every sweep
    (long GRU of benchmarks/memory.py with jax 0.12: 40.0 instead of 32.0 MiB of temporaries at
    k = 2). Inside, XLA fuses it into the ops that read it.
    """

    def path(h, xe, consts):
        z, yb = stack.block(h, xe, consts)
        return (stack.residual(tmap(lax.stop_gradient, h), z), yb), z

    return path


def _lean(block):
    """``block`` whose linearization (``jax.vjp``) stores only the values :func:`_saved` keeps.

    A VJP recomputes the rest from them, fused into the ops that read it. Left to JAX's own rules,
    the linearization of a GRU cell stores ``u``, ``u (1 - u)``, ``c`` and ``1 - c**2`` (four
    carry-sized stacks, kept through all sweeps); this way only ``u`` and ``c``.
    """
    return jax.checkpoint(block, policy=_saved)


def _holds_complex(fun, *args) -> bool:
    """Whether ``fun`` computes any complex value, or is given one.

    ``jax.checkpoint`` rounds the values it stores with ``reduce_precision``, which JAX does not
    accept for complex dtypes (a ``TypeError`` while tracing): such blocks are linearized whole,
    without :func:`_lean`.
    """
    if any(jnp.iscomplexobj(a) for a in jax.tree.leaves(args)):
        return True
    return _jaxpr.computes_complex(jax.make_jaxpr(fun)(*args).jaxpr)


def _vjp_unrounded(fun, *args, has_aux=False):
    """``jax.vjp(fun, *args, has_aux=has_aux)`` for a ``fun`` under :func:`_lean`, without the
    no-op roundings ``jax.checkpoint`` puts on the values it stores.

    ``jax.checkpoint`` passes every stored value through ``reduce_precision`` to its own dtype's
    precision (against excess precision in fused bfloat16 code). XLA with jax 0.12 keeps such a
    rounding as a buffer of its own beside the value, which the forward's other readers (``K``, the
    plan) still read: a second copy of every stored stack through all sweeps (long GRU of
    benchmarks/memory.py with jax 0.12: 40.0 instead of 32.0 MiB at k = 2). For float32 and float64
    the rounding changes no value, so the linearization is traced once and evaluated without it,
    equation by equation; other dtypes keep it.
    """
    structure = []

    def flat(*args):
        # The VJP function is a pytree: its leaves are the stored values.
        leaves, tree = jax.tree.flatten(jax.vjp(fun, *args, has_aux=has_aux))
        structure.append(tree)
        return leaves

    closed = jax.make_jaxpr(flat)(*args)
    with jax.named_scope("linearization"):  # profiles and HLO dumps name its ops
        leaves = _jaxpr.run(closed.jaxpr, _jaxpr.closed_env(closed, jax.tree.leaves(args)), eval_eqn=_unrounded)
    return jax.tree.unflatten(structure[0], leaves)


def _unrounded(eqn, invals) -> list:
    """Evaluates ``eqn``, passing the value through where it is a ``reduce_precision`` of float32 /
    float64 to their own precision."""
    dtype = eqn.invars[0].aval.dtype
    if eqn.primitive.name == "reduce_precision" and dtype in (jnp.float32, jnp.float64):
        info = jnp.finfo(dtype)
        if (eqn.params.get("exponent_bits"), eqn.params.get("mantissa_bits")) == (info.nexp, info.nmant):
            return [invals[0]]
    return _jaxpr.bind(eqn, invals)


REMAT_CHUNKS = 8


def _linearize_in_chunks(path, h_prev, xe, consts, chunks: int = REMAT_CHUNKS):
    """``z`` of every layer and a VJP of ``path`` (see :func:`_block_path`) that recomputes each
    layer's linearization when called.

    For ``save_linearization=False``: nothing of the linearization is kept between sweeps. Each
    VJP runs the layers again in ``chunks`` consecutive groups (``lax.map``: ``L / chunks`` layers at
    once, one group after the other), so only one group's residuals and temporaries are alive at a
    time; the price is one more forward of every layer per sweep and a sequential depth of
    ``chunks`` per sweep. (Recomputing all layers at once would save nothing: XLA would hoist the
    recomputation out of the loop over sweeps.)
    """
    length = h_prev[0].shape[0]
    chunks = max(c for c in range(1, min(chunks, length) + 1) if length % c == 0)
    all_paths = jax.vmap(path, in_axes=(0, 0, None))
    z = all_paths(h_prev, xe, consts)[1]
    grouped = lambda tree: tmap(lambda a: a.reshape((chunks, length // chunks) + a.shape[1:]), tree)
    ungrouped = lambda tree: tmap(lambda a: a.reshape((length,) + a.shape[2:]), tree)

    def vjp_block(ct):
        def one(group):
            h, x, c = group
            return jax.vjp(all_paths, h, x, consts, has_aux=True)[1](c)

        ct_h, ct_xe, ct_consts = lax.map(one, grouped((h_prev, xe, ct)))
        total = lambda a: a[0] if getattr(a, "dtype", None) == jax.dtypes.float0 else jnp.sum(a, axis=0)
        return ungrouped(ct_h), ungrouped(ct_xe), tmap(total, ct_consts)

    return z, vjp_block


def _linearize_unrolled(path, h_prev, xe, consts, *, vjp=jax.vjp):
    """``z`` of every layer and a VJP of ``path`` (see :func:`_block_path`) from one ``vjp`` per
    layer instead of one of ``vmap(path)``: L independent linearizations.

    Nothing chains them, so the backward stays parallel; XLA just sees L separate ops instead of
    one batched op. That is faster where it executes the batched form poorly (convolutions with
    per-layer kernels on a CPU become grouped convolutions), for stacks short enough that compile
    time (linear in L) does not matter.
    """
    length = h_prev[0].shape[0]
    at = lambda tree, j: tmap(lambda a: a[j], tree)
    zs, vjps = [], []
    for j in range(length):
        _, vjp_j, z_j = vjp(path, at(h_prev, j), at(xe, j), consts, has_aux=True)
        zs.append(z_j)
        vjps.append(vjp_j)

    def stack(trees):
        def one(*a):
            if getattr(a[0], "dtype", None) == jax.dtypes.float0:  # integer inputs: no cotangent
                return np.zeros((len(a),) + a[0].shape, jax.dtypes.float0)
            return jnp.stack(a)

        return tmap(one, *trees)

    def total(*a):
        return a[0] if getattr(a[0], "dtype", None) == jax.dtypes.float0 else sum(a[1:], a[0])

    def vjp_block(ct_out):
        grads = [vjp(at(ct_out, j)) for j, vjp in enumerate(vjps)]
        ct_h = stack([g[0] for g in grads])
        ct_xe = stack([g[1] for g in grads]) if jax.tree.leaves(xe) else xe
        ct_consts = tmap(total, *[g[2] for g in grads])
        return ct_h, ct_xe, ct_consts

    return stack(zs), vjp_block


def _none_if_float0(ct):
    """Integer / key inputs get a ``None`` (zero) cotangent from the custom_vjp."""
    if ct is None or getattr(ct, "dtype", None) == jax.dtypes.float0:
        return None
    return ct
