"""Residual combines ``r(h, z)`` for :func:`hbpjax.residual_scan`.

A residual stack computes ``z = block(h, x)`` and then ``h_new = r(h, z)``. Highway-BP needs the
Jacobian of ``r`` with respect to the carry ``h`` to be *diagonal* (``r`` elementwise in ``h``): that
diagonal ``K`` is the cheap residual path the backward scans along. Any callable with that property
works; the diagonal is found automatically with one forward-mode product against a vector of ones.

The three built-ins cover the common models:

=====================  ============================  ==================
name                   ``r(h, z)``                   ``K = dr/dh``
=====================  ============================  ==================
:func:`additive`       ``h + z``                     ``1``
:func:`gated`          ``a * h + b`` with z=(a, b)   ``a``
:func:`relu`           ``relu(h + z)``               ``relu'(h + z)``
=====================  ============================  ==================

For a pytree carry every function applies leaf by leaf (for :func:`gated`, ``a`` and ``b`` are
pytrees shaped like the carry).
"""

from __future__ import annotations

from typing import Any

import jax

from ._common import describe, layout_mismatch

PyTree = Any

__all__ = ["additive", "gated", "relu"]


def _same_layout(h: PyTree, z: PyTree, what: str) -> None:
    """Raises ``ValueError`` unless ``z`` has the tree structure and leaf shapes of ``h``."""
    mismatch = layout_mismatch(h, z)
    if mismatch and mismatch[0] == "structure":
        raise ValueError(
            f"{what} must have the same pytree structure as the carry; carry is {mismatch[1]}, "
            f"got {mismatch[2]}."
        )
    if mismatch:
        raise ValueError(
            f"{what} must have the carry's shapes; carry leaf has shape {mismatch[1]}, got {mismatch[2]}."
        )


def additive(h: PyTree, z: PyTree) -> PyTree:
    """``h + z``: pre-activation ResNets, pre-LN Transformer sublayers. ``K = 1``.

    Example:
      >>> import jax.numpy as jnp
      >>> additive(jnp.ones(2), jnp.array([1.0, 2.0]))
      Array([2., 3.], dtype=float32)
    """
    return jax.tree.map(lambda a, b: a + b, h, z)


def _check_additive(h: PyTree, z: PyTree) -> None:
    _same_layout(h, z, "the block output z of an `additive` residual")


additive.check = _check_additive  # type: ignore[attr-defined]


def gated(h: PyTree, z: tuple[PyTree, PyTree]) -> PyTree:
    """``a * h + b`` with ``z = (a, b)``: GRU, highway gates, LSTM cells, post-LN. ``K = a``.

    Example:
      >>> import jax.numpy as jnp
      >>> gated(jnp.ones(2), (jnp.array([0.5, 0.25]), jnp.array([1.0, 2.0])))
      Array([1.5 , 2.25], dtype=float32)
    """
    a, b = z
    return jax.tree.map(lambda hh, aa, bb: aa * hh + bb, h, a, b)


def _check_gated(h: PyTree, z: Any) -> None:
    if not isinstance(z, (tuple, list)) or len(z) != 2:
        raise ValueError(
            "the block output z of a `gated` residual must be a pair (a, b) with "
            f"h_new = a * h + b; got {describe(z)}. Return `(gate, update)` from the block."
        )
    _same_layout(h, z[0], "the gate a of a `gated` residual")
    _same_layout(h, z[1], "the update b of a `gated` residual")


gated.check = _check_gated  # type: ignore[attr-defined]


def relu(h: PyTree, z: PyTree) -> PyTree:
    """``relu(h + z)``: ResNets with the ReLU after the addition. ``K`` is the ReLU mask.

    Example:
      >>> import jax.numpy as jnp
      >>> relu(jnp.array([1.0, -1.0]), jnp.array([1.0, -2.0]))
      Array([2., 0.], dtype=float32)
    """
    return jax.tree.map(lambda a, b: jax.nn.relu(a + b), h, z)


def _check_relu(h: PyTree, z: PyTree) -> None:
    _same_layout(h, z, "the block output z of a `relu` residual")


relu.check = _check_relu  # type: ignore[attr-defined]
