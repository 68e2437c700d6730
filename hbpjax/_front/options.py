"""The options of hbpjax's transforms and stacks, each checked once, where it is created.

:class:`Options` is what a ``highway_grad`` call (any of the four transforms) asks for; it travels
whole from the transform to every stack's backward. :class:`StackOptions` is what one
:func:`hbpjax.residual_scan` asks for its own stack. Both are frozen dataclasses that check their
fields on creation (as lineax's solvers do), so code that holds one never checks again. The errors
name the public function the options were given to, the value received and the fix.

A leaf module: it imports nothing from hbpjax.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

#: The ``scans=`` choices spelled as strings (a callable ``StackInfo -> bool`` is the third kind).
SCANS = ("auto", "marked")
LINEARIZE = ("vmap", "unroll")


def describe(x: Any) -> str:
    """A short description of a value for error messages ("an array of shape (3,)", ...)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}"
    return f"a {type(x).__name__}"


def is_traced(value) -> bool:
    """Whether ``value`` is a tracer of some JAX transform (a value only known at run time)."""
    return isinstance(value, jax.core.Tracer)


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
      TypeError: for anything else (callers word the message).
    """
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, numbers.Real):
        return float(value)
    if (
        hasattr(value, "dtype") and jnp.ndim(value) == 0 and not is_traced(value)
        and (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))
    ):
        return float(value)
    raise TypeError


def _static(name: str, option: str, value) -> None:
    if is_traced(value):
        raise TypeError(
            f"{name}: `{option}` must be known when the function is traced (it shapes the backward); got a "
            "traced value. Pass it as a Python float, or mark it static (static_argnums / static_argnames in "
            "jax.jit, or functools.partial)."
        )


def check_iterations(name: str, iterations) -> int | jax.Array | None:
    """``iterations`` as ``None``, a Python int >= 0, or a traced integer scalar (kept as is; a
    negative value counts as 0)."""
    if iterations is None:
        return None
    if is_traced(iterations):
        dtype = getattr(iterations, "dtype", None)
        if jnp.ndim(iterations) != 0 or dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"{name}: a traced `iterations` must be an integer scalar (the number of sweeps k, e.g. "
                f"jnp.int32(schedule(step))); got {describe(iterations)}."
            )
        return iterations
    try:  # Python, NumPy and 0-d integer arrays; bool is a flag, not a count
        iterations = as_int(iterations)
    except TypeError:
        raise TypeError(
            f"{name}: `iterations` must be a non-negative int (the number of sweeps k) or None for exact "
            f"backprop; got {iterations!r} of type {type(iterations).__name__}."
        ) from None
    if iterations < 0:
        raise ValueError(
            f"{name}: `iterations` must be >= 0 (k=0 is the residual path alone, k >= depth is exact); "
            f"got {iterations}."
        )
    return iterations


def check_tol(name: str, tol, iterations) -> float | None:
    """``tol`` as ``None`` or a positive Python float (it needs a cap on the sweeps)."""
    if tol is None:
        return None
    _static(name, "tol", tol)
    try:
        tol = as_real(tol)
    except TypeError:
        raise TypeError(f"{name}: `tol` must be a positive float or None; got {tol!r} of type {type(tol).__name__}.") from None
    if not tol > 0.0:
        raise ValueError(
            f"{name}: `tol` must be > 0 (the relative change at which sweeping stops); got {tol}. Use tol=None "
            "to always run `iterations` sweeps."
        )
    if iterations is None:
        raise ValueError(
            f"{name}: `tol={tol}` needs a cap on the number of sweeps; pass an int `iterations` as well "
            "(iterations >= depth is exact), or drop `tol` for exact backprop."
        )
    return tol


def check_gamma(name: str, gamma) -> float:
    """``gamma`` as a Python float in ``[0, 1]``."""
    _static(name, "gamma", gamma)
    try:
        gamma = as_real(gamma)
    except TypeError:
        raise TypeError(
            f"{name}: `gamma` must be a Python float in [0, 1] (a static setting of the backward); got "
            f"{gamma!r} of type {type(gamma).__name__}."
        ) from None
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(
            f"{name}: `gamma` must be in [0, 1] (0: Highway-BP, 0.2: pre-LN Transformers, 0.8: post-LN, "
            f"1: fixed-point iteration); got {gamma}."
        )
    return gamma


def check_scans(name: str, scans):
    """``scans`` as ``"auto"``, ``"marked"`` or a callable ``StackInfo -> bool``."""
    if callable(scans) or (isinstance(scans, str) and scans in SCANS):
        return scans
    if isinstance(scans, str):
        raise ValueError(
            f"{name}: `scans` must be 'auto' (every residual scan), 'marked' (only residual_scan and hbpjax "
            f"modules) or a callable StackInfo -> bool; got {scans!r}."
        )
    raise TypeError(
        f"{name}: `scans` must be 'auto', 'marked' or a callable StackInfo -> bool; got {scans!r} of type "
        f"{type(scans).__name__}."
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Options:
    """The options of one highway transform, checked on creation.

    Attributes:
      iterations: the number of sweeps ``k``: a Python int, or an integer scalar traced under
        ``jax.jit`` (a schedule: one compilation for every ``k``); ``None`` is exact backprop.
      tol: stop sweeping once the relative change of the carry cotangents is ``<= tol`` (at most
        ``iterations`` sweeps); ``None`` always runs ``iterations`` sweeps.
      gamma: the backward-only split of the stacks found automatically (a ``residual_scan`` keeps
        its own).
      scans: which scans to convert: ``"auto"``, ``"marked"`` or a callable ``StackInfo -> bool``.
      save_linearization: keep every layer's linearization between sweeps, or recompute it in each
        sweep, in groups of layers, to save memory.
      report: also return a :class:`hbpjax.SweepReport`.
      layer_axis: a mesh axis name: converted stacks whose per-layer inputs are sharded along their
        layer axis over it run layer-parallel (see :func:`hbpjax.highway_grad`); ``None``: none.
      mesh: the mesh for ``layer_axis`` (default: the one set with ``jax.set_mesh``).
      name: the public function the options were given to (for error messages; not compared).

    Options are part of JAX's tracing cache key while a transform is active (see
    :mod:`hbpjax._context`): a traced ``iterations`` compares by identity, so a trace made under
    it never serves another.
    """

    iterations: int | jax.Array | None = 4
    tol: float | None = None
    gamma: float = 0.0
    scans: str | Callable = "auto"
    save_linearization: bool = True
    report: bool = False
    layer_axis: str | None = None
    mesh: Any = None
    name: str = "hbpjax"

    def __post_init__(self):
        set_ = lambda field, value: object.__setattr__(self, field, value)
        set_("iterations", check_iterations(self.name, self.iterations))
        set_("tol", check_tol(self.name, self.tol, self.iterations))
        set_("gamma", check_gamma(self.name, self.gamma))
        set_("scans", check_scans(self.name, self.scans))
        if not isinstance(self.save_linearization, bool):
            raise TypeError(
                f"{self.name}: `save_linearization` must be True (keep each layer's linearization between sweeps) "
                f"or False (recompute it, to save memory); got {self.save_linearization!r}."
            )
        set_("report", bool(self.report))
        if self.layer_axis is not None and not isinstance(self.layer_axis, str):
            raise TypeError(f"{self.name}: `layer_axis` must be a mesh axis name (str) or None; got {self.layer_axis!r}.")
        if self.mesh is not None and not isinstance(self.mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
            raise TypeError(f"{self.name}: `mesh` must be a jax.sharding.Mesh (jax.make_mesh(...)) or None; got {describe(self.mesh)}.")
        if self.mesh is not None and self.layer_axis is None:
            raise ValueError(f"{self.name}: `mesh` is the mesh for `layer_axis`; pass layer_axis='<axis name>' with it.")

    @property
    def highway(self) -> bool:
        """Whether the stacks' backward is Highway-BP (``iterations`` is not ``None``)."""
        return self.iterations is not None

    @property
    def traced(self) -> bool:
        """Whether ``iterations`` is only known at run time."""
        return is_traced(self.iterations)

    def _key(self):
        k = id(self.iterations) if self.traced else self.iterations
        return (k, self.tol, self.gamma, self.scans, self.save_linearization, self.report, self.layer_axis, id(self.mesh))

    def __eq__(self, other):
        return isinstance(other, Options) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())


@dataclasses.dataclass(frozen=True)
class StackOptions:
    """What one :func:`hbpjax.residual_scan` asks of its own stack's backward, checked on creation.

    Attributes:
      gamma: backward-only split ``K' = (1 - gamma) K``, ``J' = J + gamma K``.
      linearize: ``"vmap"`` (one VJP of the vmapped block) or ``"unroll"`` (one VJP per layer).
      name: the public function the options were given to (for error messages; not compared).
    """

    gamma: float = 0.0
    linearize: str = "vmap"
    name: str = dataclasses.field(default="hbpjax", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "gamma", check_gamma(self.name, self.gamma))
        if self.linearize not in LINEARIZE:
            raise ValueError(f"{self.name}: `linearize` must be 'vmap' or 'unroll'; got {self.linearize!r}.")
