"""Helpers that several modules need: names in errors, option checks, residual application,
buffer placement.

A leaf module: it imports nothing from hbpjax, so ``_scan``, ``_stack``, ``_layers``, ``_prefix`` and
the Flax adapters can all import it without cycles.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

RESIDUAL_SCAN = "hbpjax.residual_scan"


def describe(x: Any) -> str:
    """A short description of a value for error messages ("an array of shape (3,)", ...)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}"
    return f"a {type(x).__name__}"


def as_int(value) -> int:
    """``value`` as a Python int if it is an integer (Python, NumPy, 0-d array) but not a bool.

    Raises:
      TypeError: for anything else; callers turn it into their own message.
    """
    if isinstance(value, bool):
        raise TypeError
    return int(operator.index(value))


def as_real(value) -> float:
    """``value`` as a Python float if it is a real number or a concrete real 0-d array (not a bool).

    Raises:
      TypeError: for anything else (callers word the message); ``jax.errors.ConcretizationTypeError``
        passes through for traced values, so callers can say how to make them static.
    """
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "dtype") and jnp.ndim(value) == 0 and not isinstance(value, jax.core.Tracer):
        if jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer):
            return float(value)
    raise TypeError


def is_traced(value) -> bool:
    """Whether ``value`` is a tracer of some JAX transform (a value only known at run time)."""
    return isinstance(value, jax.core.Tracer)


def check_gamma(name: str, gamma) -> float:
    """``gamma`` as a float in ``[0, 1]``, with an error naming ``name`` otherwise."""
    if is_traced(gamma):
        raise TypeError(
            f"{name}: `gamma` must be known when the function is traced (it shapes the backward); "
            "got a traced value. Pass it as a Python float, or mark it static (static_argnums / "
            "static_argnames in jax.jit, or functools.partial)."
        )
    try:
        gamma = as_real(gamma)
    except TypeError:
        raise TypeError(
            f"{name}: `gamma` must be a Python float in [0, 1] (a static setting of the backward); got "
            f"{gamma!r} of type {type(gamma).__name__}."
        ) from None
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(
            f"{name}: `gamma` must be in [0, 1] (0: Highway-BP, 0.2: pre-LN Transformers, "
            f"0.8: post-LN, 1: fixed-point iteration); got {gamma}."
        )
    return gamma


def check_linearize(name: str, linearize) -> str:
    if linearize not in ("vmap", "unroll"):
        raise ValueError(f"{name}: `linearize` must be 'vmap' or 'unroll'; got {linearize!r}.")
    return linearize


def is_float(x) -> bool:
    """Whether a value (or aval) holds real or complex floating-point numbers (differentiable)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        dtype = jnp.result_type(x)
    return dtype != jax.dtypes.float0 and jnp.issubdtype(dtype, jnp.inexact)


def split_aux(has_aux: bool, out):
    """``(z, aux)`` from a block's output (``aux`` is ``None`` without ``has_aux``)."""
    if not has_aux:
        return out, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(
            f"{RESIDUAL_SCAN}: with has_aux=True `block` must return a pair (z, aux); got {describe(out)}."
        )
    return out[0], out[1]


def layout_mismatch(h: PyTree, other: PyTree):
    """How ``other`` differs from the carry ``h``: ``("structure", h_tree, other_tree)``,
    ``("shape", h_shape, other_shape)`` for the first leaf that differs, or ``None``."""
    h_tree, other_tree = jax.tree.structure(h), jax.tree.structure(other)
    if h_tree != other_tree:
        return "structure", h_tree, other_tree
    for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(other)):
        if jnp.shape(a) != jnp.shape(b):
            return "shape", jnp.shape(a), jnp.shape(b)
    return None


def apply_residual(residual, h: PyTree, z: PyTree) -> PyTree:
    """``residual(h, z)`` with the checks that make a misfit block a clear error at trace time."""
    check = getattr(residual, "check", None)
    if check is not None:
        try:
            check(h, z)
        except ValueError as err:
            raise ValueError(f"{RESIDUAL_SCAN}: {err}") from None
    h_new = residual(h, z)
    name = getattr(residual, "__name__", repr(residual))
    mismatch = layout_mismatch(h, h_new)
    if mismatch and mismatch[0] == "structure":
        raise ValueError(
            f"{RESIDUAL_SCAN}: residual {name}(h, z) must return a carry with the structure of `init` "
            f"({mismatch[1]}); got {mismatch[2]}. Check what `block` returns."
        )
    if mismatch:
        raise ValueError(
            f"{RESIDUAL_SCAN}: residual {name}(h, z) changed a carry shape from {mismatch[1]} to "
            f"{mismatch[2]}; the block output z must fit the carry."
        )
    for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(h_new)):
        if jnp.result_type(a) != jnp.result_type(b):
            raise TypeError(
                f"{RESIDUAL_SCAN}: residual {name}(h, z) changed a carry dtype from "
                f"{jnp.result_type(a)} to {jnp.result_type(b)}; make `block` return the carry's "
                "dtype (or cast `init`)."
            )
    return h_new


def sharding_spec(a) -> tuple:
    """The explicit sharding spec of ``a``'s type, one entry per dimension (``None`` if unsharded)."""
    spec = tuple(getattr(getattr(jax.typeof(a), "sharding", None), "spec", ()) or ())
    return spec + (None,) * (jnp.ndim(a) - len(spec))


def own_buffer(a: jax.Array) -> jax.Array:
    """``a``, computed into a buffer of its own: a no-op in-place update of its first row.

    An in-place ``dynamic_update_slice`` needs its operand in memory, so XLA computes ``a`` once
    instead of fusing ``a``'s producers into the ops that read it (which can keep their larger
    inputs alive for as long as those ops run, or recompute them many times).
    ``lax.optimization_barrier`` does not do this: XLA removes barriers before it fuses.
    """
    return jax.lax.dynamic_update_index_in_dim(a, a[0], 0, 0)

