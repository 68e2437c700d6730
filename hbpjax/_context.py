"""The settings of a ``highway_grad`` call, and the context that carries them to layer-parallel stacks.

Single-device stacks get their settings from the rewrite of the traced program (:mod:`hbpjax._auto`).
A layer-parallel ``residual_scan`` builds its backward inside a ``shard_map`` while the function is
traced, so it reads them from a ``jax.make_user_context``: the value is part of JAX's tracing and
compilation cache key, so a function jitted under one number of sweeps is re-traced under another
(or under plain ``jax.grad``) instead of silently reusing a stale trace.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp

from ._common import as_int, as_real, check_gamma, describe, is_traced

#: The scope name of :func:`exact` regions (the automatic stacks leave them alone).
EXACT = "hbpjax.exact"


@dataclasses.dataclass(frozen=True, eq=False)
class HighwaySettings:
    """How the backward of each residual stack is computed.

    Attributes:
      iterations: number of sweeps ``k``: a Python int, or an integer scalar traced under
        ``jax.jit`` (a schedule: one compilation for every ``k``); ``None`` is exact backprop.
      tol: if set, stop sweeping once the relative change of the carry cotangents is ``<= tol``
        (at most ``iterations`` sweeps).
      gamma: the backward-only split of automatically found stacks (a ``residual_scan`` keeps its
        own).
      save_linearization: keep every layer's linearization between sweeps (the default), or
        recompute it in each sweep, in groups of layers, to save memory.
    """

    iterations: int | jax.Array | None
    tol: float | None = None
    gamma: float = 0.0
    save_linearization: bool = True

    @property
    def traced(self) -> bool:
        """Whether ``iterations`` is only known at run time."""
        return is_traced(self.iterations)

    def _key(self):
        # A traced `iterations` is compared by identity: it belongs to one trace, and a jit cache
        # entry made under it must never serve another.
        return (id(self.iterations) if self.traced else self.iterations, self.tol, self.gamma, self.save_linearization)

    def __eq__(self, other):
        return isinstance(other, HighwaySettings) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


# ``None``: no highway_grad is active, residual_scan is plain lax.scan.
_SETTINGS = jax.make_user_context(default_value=None)


def current() -> HighwaySettings | None:
    """The settings of the innermost active ``highway_grad`` call, if any."""
    return _SETTINGS.value


def active(settings: HighwaySettings | None):
    """Context manager activating ``settings`` (``None`` restores plain ``lax.scan``)."""
    return _SETTINGS(settings)


@contextlib.contextmanager
def exact():
    """Keeps a region of a ``highway_grad`` loss exact: its stacks are differentiated by plain backprop.

    Everything traced inside the ``with`` block is left as it is: no scan in it is converted, and
    ``residual_scan``s (layer-parallel ones included) run their exact backward. Use it for a part
    of the model where the approximation is not wanted, or around an inner ``jax.grad`` whose
    derivative the outer ``highway_grad`` should take exactly (a gradient penalty).

    Example:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> def loss(W, x):
      ...     with hbpjax.exact():
      ...         h, _ = hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), x, W)
      ...     return jnp.sum(h ** 2)
      >>> W, x = 0.5 * jnp.ones((6, 3, 3)), jnp.ones(3)
      >>> g = hbpjax.highway_grad(loss, iterations=0, scans="marked")(W, x)
      >>> bool(jnp.allclose(g, jax.grad(loss)(W, x)))
      True
    """
    with jax.named_scope(EXACT), _SETTINGS(None):
        yield


def check_iterations(fn_name: str, iterations) -> int | jax.Array | None:
    """Validates ``iterations``: ``None``, an int >= 0 (returned as a Python int), or a traced
    integer scalar (returned as is; a negative value counts as 0)."""
    if iterations is None:
        return None
    if is_traced(iterations):
        dtype = getattr(iterations, "dtype", None)
        if jnp.ndim(iterations) != 0 or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"{fn_name}: a traced `iterations` must be an integer scalar (the number of sweeps "
                f"k, e.g. jnp.int32(schedule(step))); got {describe(iterations)}."
            )
        return iterations
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
    if is_traced(tol):
        raise TypeError(
            f"{fn_name}: `tol` must be known when the function is traced; got a traced value. Pass "
            "a Python float, or mark it static (static_argnums / static_argnames in jax.jit, or "
            "functools.partial)."
        )
    try:
        tol = as_real(tol)
    except TypeError:
        raise TypeError(
            f"{fn_name}: `tol` must be a positive float or None; got {tol!r} of type "
            f"{type(tol).__name__}."
        ) from None
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


def settings(fn_name: str, iterations, tol, gamma=0.0, save_linearization=True) -> HighwaySettings:
    """Validated :class:`HighwaySettings` for a public function named ``fn_name``."""
    iterations = check_iterations(fn_name, iterations)
    if not isinstance(save_linearization, bool):
        raise TypeError(
            f"{fn_name}: `save_linearization` must be True (keep each layer's linearization between "
            f"sweeps) or False (recompute it, to save memory); got {save_linearization!r}."
        )
    return HighwaySettings(
        iterations, check_tol(fn_name, tol, iterations), check_gamma(fn_name, gamma), save_linearization
    )
