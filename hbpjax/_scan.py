"""``residual_scan``: a ``lax.scan`` over a residual stack whose backward can run as Highway-BP.

Forward: ``z_i = block(h_{i-1}, x_i)``, ``h_i = residual(h_{i-1}, z_i)`` for ``i = 1..L``.

Under plain ``jax.grad`` (no :func:`hbpjax.highway_grad` active, or ``iterations=None``) this *is*
``lax.scan``: forward mode, higher order and everything else JAX does with a scan apply unchanged.

Under ``highway_grad(..., iterations=k)`` it is a ``jax.custom_vjp`` whose backward

1. linearizes every layer once, in parallel: one ``jax.vjp`` of ``vmap(block)`` over all layers,
   with per-step ``xs`` mapped and closed-over (shared) values broadcast, so shared weights get one
   summed gradient instead of a ``(L, ...)`` stack of per-step gradients;
2. takes the diagonal ``K`` of the residual's carry Jacobian (one ``jvp`` with ones);
3. solves the residual-path-only recurrence with one associative prefix scan, then runs ``k`` sweeps
   of "all layers' VJPs at once, then one prefix scan";
4. reads parameter, input and initial-carry cotangents off one last VJP at the final estimate.

Nothing in this backward loops over the layers; its sequential depth is about ``(k+1)(1+log2 L)``.
"""

from __future__ import annotations

import functools
import numbers
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from . import _context
from . import _prefix
from ._util import describe
from .residual import additive

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
) -> tuple[PyTree, PyTree] | tuple[PyTree, PyTree, PyTree]:
    """Runs a residual stack ``h_i = residual(h_{i-1}, block(h_{i-1}, x_i))`` over ``L`` steps.

    This is ``lax.scan`` for residual networks and RNNs. Under ``jax.grad`` it is exactly
    ``lax.scan``; under :func:`hbpjax.highway_grad` its backward becomes Highway-BP: a few parallel
    sweeps instead of ``L`` dependent steps.

    Args:
      block: ``block(carry, x) -> z``, any JAX function. It may close over arrays (RNN weights,
        shared parameters): those are shared by all steps and receive their gradient too.
      init: the initial carry ``h_0``, a pytree of floating-point arrays.
      xs: what changes per step, stacked on a leading axis of length ``L``: per-layer parameters,
        per-step inputs, per-layer random keys, or a pytree of them. ``None`` when nothing does
        (then pass ``length``).
      residual: ``r(h, z) -> h_new``, elementwise in ``h`` (its carry Jacobian must be diagonal).
        One of :func:`hbpjax.residual.additive` (default), :func:`~hbpjax.residual.gated`,
        :func:`~hbpjax.residual.relu`, or your own function.
      gamma: backward-only split of the residual Jacobian, ``K' = (1 - gamma) K`` and
        ``J' = J + gamma K``. The forward is unchanged and ``iterations >= L`` stays exact.
        ``0`` is plain Highway-BP; about ``0.2`` helps pre-LN Transformers, ``0.8`` post-LN ones;
        ``1`` is fixed-point (Jacobi) iteration.
      length: number of steps ``L``; required when ``xs`` is ``None``, otherwise checked against it.
      unroll: forwarded to ``lax.scan`` (how many forward steps to unroll per loop iteration).
      has_aux: if True, ``block`` returns ``(z, aux)`` and the per-step ``aux`` values are returned
        stacked. ``aux`` is state, not a differentiable output: it is wrapped in
        ``lax.stop_gradient`` (use it for updated BatchNorm statistics, RNG counters, metrics).

    Returns:
      ``(final_carry, carries)``: ``h_L`` and ``h_1..h_L`` stacked on a leading axis of length ``L``;
      ``(final_carry, carries, aux)`` with ``has_aux=True``.

    Example:
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
    gamma = _check_gamma(gamma)
    length = _scan_length(xs, length)

    split = functools.partial(_split_aux, has_aux)

    def step(h, x):
        z, aux = split(block(h, x))
        h_new = _apply_residual(residual, h, z)
        return h_new, (h_new, aux)

    settings = _context.current()
    if settings is None or settings.iterations is None or length == 0:
        final, (carries, aux) = lax.scan(step, init, xs, length=length, unroll=unroll)
    else:
        _check_float_carry(init)
        final, carries, aux = _highway_scan(block, split, residual, gamma, settings, length, unroll, init, xs)
    if has_aux:
        return final, carries, lax.stop_gradient(aux)
    return final, carries


def _split_aux(has_aux, out):
    """``(z, aux)`` from a block's output (``aux`` is ``None`` without ``has_aux``)."""
    if not has_aux:
        return out, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(
            f"{_NAME}: with has_aux=True `block` must return a pair (z, aux); got {describe(out)}."
        )
    return out[0], out[1]


def _highway_scan(block, split, residual, gamma, settings, length, unroll, init, xs):
    """The ``custom_vjp`` form of the scan, with the Highway-BP backward."""
    x0 = jax.tree.map(lambda a: a[0], xs)
    # Values `block` closes over may be tracers of an outer jax.grad / jit: hoist them into
    # explicit inputs so the custom_vjp returns their cotangents instead of dropping them.
    converted, consts = jax.closure_convert(block, init, x0)
    consts = tuple(consts)

    def forward(init, xs, consts):
        def step(h, x):
            z, aux = split(converted(h, x, *consts))
            h_new = _apply_residual(residual, h, z)
            return h_new, (h_new, aux)

        final, (carries, aux) = lax.scan(step, init, xs, length=length, unroll=unroll)
        return final, carries, aux

    run = jax.custom_vjp(forward)

    def fwd(init, xs, consts):
        final, carries, aux = forward(init, xs, consts)
        return (final, carries, aux), (init, carries, xs, consts)

    def bwd(res, cts):
        init, carries, xs, consts = res
        ct_final, ct_carries, _ = cts  # aux is stop_gradient-ed by the caller: no cotangent
        block_z = lambda h, x, *c: split(converted(h, x, *c))[0]
        return _highway_backward(
            block_z, residual, gamma, settings, init, carries, xs, consts, ct_final, ct_carries
        )

    run.defvjp(fwd, bwd)
    return run(init, xs, consts)


def _highway_backward(block, residual, gamma, settings, init, carries, xs, consts, ct_final, ct_carries):
    """Cotangents of ``(init, xs, consts)`` by Highway-BP with ``settings.iterations`` sweeps."""
    tmap = jax.tree.map
    length = jax.tree.leaves(carries)[0].shape[0]

    def shift_up(a, fill):
        """``out[j] = a[j + 1]``, ``out[L - 1] = fill``."""
        return jnp.concatenate([a[1:], fill[None]], axis=0)

    # Cotangent arriving from outside at each carry h_1..h_L (the final carry is h_L).
    e = tmap(lambda c, f: c.at[-1].add(f), ct_carries, ct_final)
    # Inputs of each layer: h_0..h_{L-1}.
    h_prev = tmap(lambda h0, c: jnp.concatenate([h0[None], c[:-1]], axis=0), init, carries)

    # Linearize every layer once, all in parallel. Shared values are broadcast (in_axes=None):
    # their cotangent is summed inside the transposed ops, never stacked per step.
    n_consts = len(consts)
    all_blocks = jax.vmap(block, in_axes=(0, 0) + (None,) * n_consts)
    z, vjp_block = jax.vjp(lambda h, x, c: all_blocks(h, x, *c), h_prev, xs, consts)
    all_residuals = jax.vmap(residual)
    _, vjp_res_z = jax.vjp(lambda zz: all_residuals(h_prev, zz), z)
    ones = tmap(jnp.ones_like, h_prev)
    _, k_diag = jax.jvp(lambda h: all_residuals(h, z), (h_prev,), (ones,))

    def layer_vjp(w):
        """(d carry, d x, d consts) of every layer's block path for carry cotangents ``w``."""
        (ct_z,) = vjp_res_z(w)
        return vjp_block(ct_z)

    # w[j] = e[j] + v[j+1] + K'[j+1] * w[j+1]: the diagonal of the *next* layer multiplies w[j+1].
    k_next = tmap(lambda k: (1.0 - gamma) * shift_up(k, jnp.zeros_like(k[0])), k_diag)

    planned = _plan(k_next)  # the k-only half of the prefix scan, shared by every sweep

    def solve(v):
        """One prefix scan along the residual path given the block-path terms ``v``."""
        u = e if v is None else tmap(lambda ej, vj: ej + shift_up(vj, jnp.zeros_like(vj[0])), e, v)
        return _solve(planned, u)

    def sweep(w):
        v = layer_vjp(w)[0]
        if gamma:
            v = tmap(lambda vj, kj, wj: vj + gamma * kj * wj, v, k_diag, w)
        return solve(v)

    w = solve(None)
    sweeps = min(settings.iterations, max(length - 1, 0))  # L-1 sweeps are already exact
    if settings.tol is None:
        # A loop over the k sweeps (never over the L layers): compile time does not grow with k.
        w = lax.fori_loop(0, sweeps, lambda _, w: sweep(w), w)
    elif sweeps > 0:
        w = _sweep_until(sweep, w, sweeps, settings.tol)

    ct_h, ct_xs, ct_consts = layer_vjp(w)
    # The initial carry gets the full Jacobian of layer 1: (K_1 + J_1)^T w_1.
    ct_init = tmap(lambda k, wj, g: k[0] * wj[0] + g[0], k_diag, w, ct_h)
    ct_xs = tmap(_none_if_float0, ct_xs)
    ct_consts = tuple(_none_if_float0(c) for c in ct_consts)
    return ct_init, ct_xs, ct_consts


# Jitted so that eager (un-jitted) gradients compile the O(log L) levels once per shape instead of
# dispatching them op by op; under an outer jit they are simply inlined.
_plan = jax.jit(_prefix.plan)
_solve = jax.jit(_prefix.solve)


def _sweep_until(sweep, w, max_sweeps, tol):
    """Sweeps until the relative change of ``w`` is ``<= tol``, at most ``max_sweeps`` times."""

    def sq_norm(tree):
        return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree))

    def cond(state):
        i, _, change = state
        return (i < max_sweeps) & (change > tol)

    def body(state):
        i, w_old, _ = state
        w_new = sweep(w_old)
        diff = sq_norm(jax.tree.map(jnp.subtract, w_new, w_old))
        size = sq_norm(w_new)
        change = jnp.where(size > 0, jnp.sqrt(diff / jnp.where(size > 0, size, 1.0)), 0.0)
        return i + 1, w_new, change.astype(jnp.float32)

    state = (jnp.int32(0), w, jnp.float32(jnp.inf))
    _, w, _ = lax.while_loop(cond, body, state)
    return w


def _none_if_float0(ct):
    """Integer / key inputs get a ``None`` (zero) cotangent from the custom_vjp."""
    if ct is None:
        return None
    if getattr(ct, "dtype", None) == jax.dtypes.float0:
        return None
    return ct


# --------------------------------------------------------------------------- validation


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(
            f"{_NAME}: `gamma` must be a Python float in [0, 1] (a static setting of the "
            f"backward); got {gamma!r} of type {type(gamma).__name__}."
        )
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(
            f"{_NAME}: `gamma` must be in [0, 1] (0: Highway-BP, 0.2: pre-LN Transformers, "
            f"0.8: post-LN, 1: fixed-point iteration); got {gamma}."
        )
    return gamma


def _scan_length(xs, length) -> int:
    """The number of steps, checked against every leaf of ``xs``."""
    if length is not None:
        try:
            if isinstance(length, bool):
                raise TypeError
            length = operator.index(length)
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


def _apply_residual(residual, h, z):
    """``residual(h, z)`` with the checks that make a misfit block a clear error at trace time."""
    check = getattr(residual, "check", None)
    if check is not None:
        try:
            check(h, z)
        except ValueError as err:
            raise ValueError(f"{_NAME}: {err}") from None
    h_new = residual(h, z)
    name = getattr(residual, "__name__", repr(residual))
    h_tree, new_tree = jax.tree.structure(h), jax.tree.structure(h_new)
    if h_tree != new_tree:
        raise ValueError(
            f"{_NAME}: residual {name}(h, z) must return a carry with the structure of `init` "
            f"({h_tree}); got {new_tree}. Check what `block` returns."
        )
    for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(h_new)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"{_NAME}: residual {name}(h, z) changed a carry shape from {jnp.shape(a)} to "
                f"{jnp.shape(b)}; the block output z must fit the carry."
            )
        if jnp.result_type(a) != jnp.result_type(b):
            raise TypeError(
                f"{_NAME}: residual {name}(h, z) changed a carry dtype from "
                f"{jnp.result_type(a)} to {jnp.result_type(b)}; make `block` return the carry's "
                "dtype (or cast `init`)."
            )
    return h_new


def _check_float_carry(init) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{_NAME}: under hbpjax.highway_grad every carry leaf must be floating point; "
                f"init{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}. Pass "
                "non-differentiable per-step values through `xs` instead."
            )
