"""The diagonal affine prefix scan along the residual path.

Highway-BP repeatedly solves the backward recurrence of the residual path alone,

    w[j] = u[j] + k[j] * w[j + 1],        w[L] = 0,

where ``k[j]`` is the diagonal of a layer's residual Jacobian (so ``*`` is elementwise) and ``u[j]``
collects everything else that reaches carry ``j``. Each step is the affine map ``w -> u + k * w``;
composing those maps is associative, so the whole recurrence is one ``lax.associative_scan`` with
``O(log L)`` sequential depth instead of ``L`` dependent steps.

This module is deliberately small and self-contained so the scan can be swapped (for instance for a
sequential ``lax.scan``, which is cheaper on a CPU for short stacks) without touching the sweeps.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax import lax

PyTree = Any

__all__ = ["affine_scan", "PREFIX_METHODS"]

PREFIX_METHODS = ("associative", "sequential")


def _compose(higher, lower):
    """Composes two affine maps ``T_lower o T_higher`` given as ``(k, u)`` pairs of pytrees.

    With ``reverse=True``, ``lax.associative_scan`` passes the accumulated element of the *higher*
    indices as the left operand. ``T_lo(T_hi(w)) = u_lo + k_lo * (u_hi + k_hi * w)``.
    """
    k_hi, u_hi = higher
    k_lo, u_lo = lower
    k = jax.tree.map(lambda a, b: a * b, k_lo, k_hi)
    u = jax.tree.map(lambda ul, kl, uh: ul + kl * uh, u_lo, k_lo, u_hi)
    return k, u


# Jitted so that eager (un-jitted) gradients compile the O(log L) slicing levels once per shape
# instead of dispatching them op by op; under an outer jit this is simply inlined.
@functools.partial(jax.jit, static_argnames="method")
def affine_scan(k: PyTree, u: PyTree, *, method: str = "associative") -> PyTree:
    """Solves ``w[j] = u[j] + k[j] * w[j + 1]`` (with ``w[L] = 0``) along the leading axis.

    Args:
      k: pytree of arrays with a leading axis of length ``L``; the diagonal coefficients.
        ``k[L - 1]`` is multiplied by ``w[L] = 0`` and so never matters.
      u: pytree with the same structure and shapes as ``k``.
      method: ``"associative"`` (parallel, depth ``O(log L)``) or ``"sequential"`` (a reverse
        ``lax.scan``; depth ``L``, provided for comparison).

    Returns:
      ``w``, a pytree like ``u``.

    Example:
      >>> import jax.numpy as jnp
      >>> affine_scan(jnp.array([2.0, 3.0, 5.0]), jnp.array([1.0, 1.0, 1.0]))
      Array([9., 4., 1.], dtype=float32)
    """
    if method == "associative":
        _, w = lax.associative_scan(_compose, (k, u), reverse=True)
        return w
    if method == "sequential":

        def step(w_next, ku):
            kj, uj = ku
            w = jax.tree.map(lambda a, b, c: a + b * c, uj, kj, w_next)
            return w, w

        zero = jax.tree.map(lambda a: jax.numpy.zeros_like(a[0]), u)
        _, w = lax.scan(step, zero, (k, u), reverse=True)
        return w
    raise ValueError(f"hbpjax: unknown prefix scan method {method!r}; use one of {PREFIX_METHODS}.")
