"""The diagonal affine prefix scan along the residual path.

Highway-BP repeatedly solves the backward recurrence of the residual path alone,

    w[j] = u[j] + k[j] * w[j + 1],        w[L] = 0,

where ``k[j]`` is the diagonal of a layer's residual Jacobian (so ``*`` is elementwise) and ``u[j]``
collects everything else that reaches carry ``j``. Each step is the affine map ``w -> u + k * w``;
composing those maps is associative, so the recurrence is a parallel scan with ``O(log L)``
sequential depth instead of ``L`` dependent steps.

Within one backward the coefficients ``k`` stay fixed while ``u`` changes from sweep to sweep, so the
scan comes in two parts: :func:`prepare` does the ``k``-only work once (the products of neighbouring
coefficients at every level of the recursion), :func:`solve` does the ``u`` work per sweep. The
module is self-contained so the method can be swapped without touching the sweeps.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

PyTree = Any

__all__ = ["METHODS", "affine_scan", "prepare", "solve"]

METHODS = ("parallel", "sequential")


def sharding_spec(a) -> tuple:
    """The explicit sharding spec of ``a``'s type, one entry per dimension (``None`` if unsharded)."""
    spec = tuple(getattr(getattr(jax.typeof(a), "sharding", None), "spec", ()) or ())
    return spec + (None,) * (jnp.ndim(a) - len(spec))


def own_buffer(a: jax.Array) -> jax.Array:
    """``a``, computed into a buffer of its own: a no-op in-place update of its first row along
    its first axis without an explicit sharding (``a`` as it is if it has none: a scalar, or every
    axis sharded).

    An in-place ``dynamic_update_slice`` needs its operand in memory, so XLA computes ``a`` once
    instead of fusing ``a``'s producers into the ops that read it (which can keep their larger
    inputs alive for as long as those ops run, or recompute them many times).
    ``lax.optimization_barrier`` does not do this: XLA removes barriers before it fuses.
    """
    axis = next((i for i, s in enumerate(sharding_spec(a)) if s is None), None)
    if axis is None:
        return a
    return jax.lax.dynamic_update_index_in_dim(a, jax.lax.index_in_dim(a, 0, axis, keepdims=False), 0, axis)


def _reshape_leading(a, shape):
    """``a.reshape(shape)`` for a change of the leading axes only, keeping the trailing axes'
    sharding when it is explicit (a plain reshape may move it onto the new leading axes)."""
    trailing = sharding_spec(a)[1:]
    if any(s is not None for s in trailing):
        lead = len(shape) - (a.ndim - 1)
        return a.reshape(shape, out_sharding=PartitionSpec(*((None,) * lead + trailing)))
    return a.reshape(shape)


def _pairs(a):
    """``a`` viewed as neighbouring pairs ``(2i, 2i+1)``: shape ``(ceil(n/2), 2, ...)``."""
    if a.shape[0] % 2:  # w beyond the stack is zero, so an appended zero element changes nothing
        a = jnp.concatenate([a, jnp.zeros_like(a[:1])])
    return _reshape_leading(a, (-1, 2) + a.shape[1:])


def _prepare_leaf(k):
    """The coefficients at every level of the recursive doubling, for one leaf.

    Level ``l`` pairs elements ``(2i, 2i+1)``; a pair acts as one affine map with coefficient
    ``k[2i] * k[2i+1]``, which is the next level's ``k``. Each level is kept as its pairs (a free
    reshape of the level's ``k``); the levels past the first hold about one copy of ``k`` in all.

    Every level past the first is computed into a buffer of its own (as is every level's reduced
    right-hand side in :func:`_solve_leaf`). Left to itself, XLA fuses the chain of levels into a
    few ops that each read level 0 at up to ``2**l`` positions per element: it recomputes the
    lower levels inside them and, the code that would duplicate being too large, does not fuse
    ``k``'s own producer (``1 - u`` for a GRU's gate ``u``) into them but stores ``k`` as one more
    carry-sized array. One level per op, ``k`` is recomputed where it is read.
    """
    levels = []
    while k.shape[0] > 1:
        pairs = _pairs(k)
        levels.append(pairs)
        k = own_buffer(_finite(pairs[:, 0] * pairs[:, 1]))
    return levels


def _finite(k):
    """``k`` with overflowed products capped at the largest finite value of their type.

    A product over a long span of ``|k| > 1`` overflows to ``inf``; where the ``u`` it multiplies is
    zero (the loss reads only some of the carries) ``inf * 0`` would be NaN, while the sequential
    recurrence never forms that product. Capped, it gives ``0`` there, and an overflow (as the
    sequential recurrence does) where the true value overflows.
    """
    if not jnp.issubdtype(k.dtype, jnp.floating):
        return k
    big = jnp.finfo(k.dtype).max
    return jnp.clip(k, -big, big)


def _solve_leaf(levels, u):
    if not levels:
        return u
    k_pairs, rest = levels[0], levels[1:]
    n = u.shape[0]
    u_pairs = _pairs(u)
    u_even, u_odd = u_pairs[:, 0], u_pairs[:, 1]
    # The reduced problem: w at the even positions (its right-hand side in a buffer of its own:
    # see _prepare_leaf).
    w_even = _solve_leaf(rest, own_buffer(u_even + k_pairs[:, 0] * u_odd))
    # Odd positions follow from the next even one: w[2i+1] = u[2i+1] + k[2i+1] * w[2i+2].
    w_next = jnp.concatenate([w_even[1:], jnp.zeros_like(w_even[:1])])
    w_odd = u_odd + k_pairs[:, 1] * w_next
    return _reshape_leading(jnp.stack([w_even, w_odd], axis=1), (-1,) + u.shape[1:])[:n]


def prepare(k: PyTree, *, method: str = "parallel") -> PyTree:
    """Precomputes the ``k``-only part of the scan; pass the result to :func:`solve`."""
    if method == "parallel":
        return jax.tree.map(_prepare_leaf, k)
    if method == "sequential":
        return k
    raise ValueError(f"hbpjax: unknown prefix scan method {method!r}; use one of {METHODS}.")


def solve(prepared: PyTree, u: PyTree, *, method: str = "parallel") -> PyTree:
    """Solves ``w[j] = u[j] + k[j] * w[j + 1]`` along the leading axis, given ``prepare(k)``."""
    if method == "parallel":
        leaves = jax.tree.leaves(u)
        treedef: Any = jax.tree.structure(u)
        levels = treedef.flatten_up_to(prepared)
        return treedef.unflatten([_solve_leaf(lv, leaf) for lv, leaf in zip(levels, leaves)])
    if method == "sequential":

        def step(w_next, ku):
            kj, uj = ku
            w = jax.tree.map(lambda a, b, c: a + b * c, uj, kj, w_next)
            return w, w

        zero = jax.tree.map(lambda a: jnp.zeros_like(a[0]), u)
        return lax.scan(step, zero, (prepared, u), reverse=True)[1]
    raise ValueError(f"hbpjax: unknown prefix scan method {method!r}; use one of {METHODS}.")


@functools.partial(jax.jit, static_argnames="method")
def affine_scan(k: PyTree, u: PyTree, *, method: str = "parallel") -> PyTree:
    """Solves ``w[j] = u[j] + k[j] * w[j + 1]`` (with ``w[L] = 0``) along the leading axis.

    Args:
      k: pytree of arrays with a leading axis of length ``L``: the diagonal coefficients.
        ``k[L - 1]`` multiplies ``w[L] = 0`` and so never matters.
      u: pytree with the same structure and shapes as ``k``.
      method: ``"parallel"`` (recursive doubling, depth ``O(log L)``) or ``"sequential"`` (a reverse
        ``lax.scan``, depth ``L``, for comparison).

    Returns:
      ``w``, a pytree like ``u``.

    Examples:
      >>> import jax.numpy as jnp
      >>> affine_scan(jnp.array([2.0, 3.0, 5.0]), jnp.array([1.0, 1.0, 1.0])).tolist()
      [9.0, 4.0, 1.0]
    """
    return solve(prepare(k, method=method), u, method=method)


# Jitted so that eager (un-jitted) gradients compile the O(log L) levels once per shape instead of
# dispatching them op by op; under an outer jit they are simply inlined.
prepare_jitted = jax.jit(prepare)
solve_jitted = jax.jit(solve)
