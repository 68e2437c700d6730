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
import jax.numpy as jnp

from ._front.options import describe

PyTree = Any

__all__ = ["additive", "gated", "relu"]


class Misfit(ValueError):
    """A block's output that does not fit the carry (raised while a stack is traced)."""


def check_layout(h: PyTree, other: PyTree, *, structure: str, shape: str) -> None:
    """Raises :class:`Misfit` (a ``ValueError``) unless ``other`` has the tree structure and leaf shapes of the carry ``h``.

    ``structure`` and ``shape`` are the messages, with ``{carry}`` and ``{got}`` filled in with the
    carry's and the other's tree structure (or first differing leaf shape).
    """
    h_tree: Any = jax.tree.structure(h)
    other_tree = jax.tree.structure(other)
    if h_tree != other_tree:
        raise Misfit(structure.format(carry=h_tree, got=other_tree))
    for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(other)):
        if jnp.shape(a) != jnp.shape(b):
            raise Misfit(shape.format(carry=jnp.shape(a), got=jnp.shape(b)))


def apply(residual, h: PyTree, z: PyTree, *, name: str) -> PyTree:
    """``residual(h, z)``, with the checks that make a misfit block a clear error (naming ``name``)
    at trace time."""
    check = getattr(residual, "check", None)
    if check is not None:
        try:
            check(h, z)
        except ValueError as err:
            raise Misfit(f"{name}: {err}") from None
    h_new = residual(h, z)
    what = f"{name}: residual {getattr(residual, '__name__', repr(residual))}(h, z)"
    check_layout(
        h, h_new,
        structure=what + " must return a carry with the structure of `init` ({carry}); got {got}. Check what `block` returns.",
        shape=what + " changed a carry shape from {carry} to {got}; the block output z must fit the carry.",
    )
    for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(h_new)):
        if jnp.result_type(a) != jnp.result_type(b):
            raise TypeError(
                f"{what} changed a carry dtype from {jnp.result_type(a)} to {jnp.result_type(b)}; make `block` "
                "return the carry's dtype (or cast `init`)."
            )
    return h_new


def _same_layout(h: PyTree, z: PyTree, what: str) -> None:
    """Raises ``ValueError`` unless ``z`` has the tree structure and leaf shapes of ``h``."""
    check_layout(
        h, z,
        structure=what + " must have the same pytree structure as the carry; carry is {carry}, got {got}.",
        shape=what + " must have the carry's shapes; carry leaf has shape {carry}, got {got}.",
    )


def additive(h: PyTree, z: PyTree) -> PyTree:
    """``h + z``: pre-activation ResNets, pre-LN Transformer sublayers. ``K = 1``.

    Args:
      h: the carry (a pytree of arrays).
      z: the block's output, with the structure and shapes of ``h``.

    Returns:
      ``h + z``, leaf by leaf.

    Raises:
      ValueError: (inside :func:`hbpjax.residual_scan`) ``z`` does not have the carry's structure or
        shapes.

    Examples:
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

    Args:
      h: the carry (a pytree of arrays).
      z: a pair ``(a, b)``, each with the structure and shapes of ``h``: the gate and the update.

    Returns:
      ``a * h + b``, leaf by leaf.

    Raises:
      ValueError: (inside :func:`hbpjax.residual_scan`) ``z`` is not a pair, or ``a`` or ``b`` does
        not have the carry's structure or shapes.

    Examples:
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

    Args:
      h: the carry (a pytree of arrays).
      z: the block's output, with the structure and shapes of ``h``.

    Returns:
      ``relu(h + z)``, leaf by leaf.

    Raises:
      ValueError: (inside :func:`hbpjax.residual_scan`) ``z`` does not have the carry's structure or
        shapes.

    Examples:
      >>> import jax.numpy as jnp
      >>> relu(jnp.array([1.0, -1.0]), jnp.array([1.0, -2.0]))
      Array([2., 0.], dtype=float32)
    """
    return jax.tree.map(lambda a, b: jax.nn.relu(a + b), h, z)


def _check_relu(h: PyTree, z: PyTree) -> None:
    _same_layout(h, z, "the block output z of a `relu` residual")


relu.check = _check_relu  # type: ignore[attr-defined]
