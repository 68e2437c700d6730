"""The setting that ``highway_grad`` hands to every ``residual_scan`` it traces.

It lives in a ``jax.make_user_context``: the value is part of JAX's tracing and compilation cache
key, so a function jitted under one number of sweeps is re-traced under another (or under plain
``jax.grad``) instead of silently reusing a stale trace.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax

from ._common import as_int


@dataclasses.dataclass(frozen=True)
class HighwaySettings:
    """How the backward of each residual stack is computed.

    Attributes:
      iterations: number of sweeps ``k``; ``None`` is exact backprop (plain ``lax.scan``).
      tol: if set, stop sweeping once the relative change of the carry cotangents is ``<= tol``
        (at most ``iterations`` sweeps).
    """

    iterations: int | None
    tol: float | None = None


# ``None``: no highway_grad is active, residual_scan is plain lax.scan.
_SETTINGS = jax.make_user_context(default_value=None)


def current() -> HighwaySettings | None:
    """The settings of the innermost active ``highway_grad`` call, if any."""
    return _SETTINGS.value


def active(settings: HighwaySettings | None):
    """Context manager activating ``settings`` (``None`` restores plain ``lax.scan``)."""
    return _SETTINGS(settings)


def check_iterations(fn_name: str, iterations) -> int | None:
    """Validates ``iterations`` (``None`` or an int >= 0) and returns it as a Python int."""
    if iterations is None:
        return None
    try:  # Python, NumPy and 0-d integer arrays; bool is a flag, not a count
        iterations = as_int(iterations)
    except TypeError:
        raise TypeError(
            f"{fn_name}: `iterations` must be a non-negative int (the number of sweeps k) "
            f"or None for exact backprop; got {iterations!r} of type {type(iterations).__name__}."
        ) from None
    if iterations < 0:
        raise ValueError(
            f"{fn_name}: `iterations` must be >= 0 (k=0 is the residual path alone, "
            f"k >= depth is exact); got {iterations}."
        )
    return iterations


def check_tol(fn_name: str, tol, iterations: int | None) -> float | None:
    """Validates ``tol`` (``None`` or a positive real) against ``iterations``."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(
            f"{fn_name}: `tol` must be a positive float or None; got {tol!r} of type "
            f"{type(tol).__name__}."
        )
    tol = float(tol)
    if not tol > 0.0:
        raise ValueError(
            f"{fn_name}: `tol` must be > 0 (the relative change at which sweeping stops); "
            f"got {tol}. Use tol=None to always run `iterations` sweeps."
        )
    if iterations is None:
        raise ValueError(
            f"{fn_name}: `tol={tol}` needs a cap on the number of sweeps; pass an int "
            "`iterations` as well (iterations >= depth is exact), or drop `tol` for exact backprop."
        )
    return tol


def settings(fn_name: str, iterations, tol) -> HighwaySettings:
    """Validated :class:`HighwaySettings` for a public function named ``fn_name``."""
    iterations = check_iterations(fn_name, iterations)
    return HighwaySettings(iterations, check_tol(fn_name, tol, iterations))
