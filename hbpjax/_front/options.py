"""The options of hbpjax's transforms and stacks, each checked once, where it is created.

:class:`Options` (public as ``hbpjax.Options``) is what a transform call asks for; it travels whole
from the transform to every stack's backward. :class:`StackOptions` is what one
:func:`hbpjax.residual_scan` asks for its own stack. Both are frozen dataclasses that check their
fields on creation (as lineax's solvers do), so code that holds one never checks again. The errors
name the public function the options were given to, the value received and the fix.

A leaf module: it imports nothing from hbpjax.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

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


def check_recompute_layers(name: str, value):
    """``recompute_layers`` as a Python int >= 1, or ``None``; a clear error otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: `recompute_layers` must be a positive int (layers recomputed at once) or None; got {describe(value)}.")
    if value < 1:
        raise ValueError(f"{name}: `recompute_layers` must be >= 1 (layers recomputed at once); got {value}. Use None for the default.")
    return int(value)


def check_microbatches(name: str, microbatches, layer_axis) -> int | None:
    """``microbatches`` as an int (or ``None``): it needs a ``layer_axis`` to pipeline over."""
    if microbatches is None:
        return None
    if isinstance(microbatches, bool) or not isinstance(microbatches, numbers.Integral):
        raise TypeError(f"{name}: `microbatches` must be an int >= 1 or None; got {microbatches!r}.")
    if microbatches < 1:
        raise ValueError(f"{name}: `microbatches` must be >= 1; got {microbatches}.")
    if layer_axis is None:
        raise ValueError(
            f"{name}: microbatches={microbatches} pipelines a layer-parallel forward; pass "
            "layer_axis='<mesh axis name>' with it (without layer_axis there is no pipeline)."
        )
    return int(microbatches)


class OptionKeywords(TypedDict, total=False):
    """The fields of :class:`Options`, as keywords of the transforms."""

    iterations: int | jax.Array | None
    tol: float | None
    gamma: float
    scans: str | Callable
    save_linearization: bool
    recompute_layers: int | None
    return_report: bool
    layer_axis: str | None
    microbatches: int | None
    mesh: Any


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Options:
    """What a highway transform does with the residual stacks it finds; checked when made.

    Every transform (:func:`hbpjax.highway_grad`, :func:`hbpjax.highway_value_and_grad`,
    :func:`hbpjax.filter_grad`, :func:`hbpjax.filter_value_and_grad`, :func:`hbpjax.nnx.grad`,
    :func:`hbpjax.nnx.value_and_grad`) takes these fields as keywords, or one ``options=Options(...)``
    value; keywords given beside it replace its fields. Make one to share a configuration between a
    training step, an evaluation and :func:`hbpjax.gradient_agreement`.

    Attributes:
      iterations: the number of sweeps ``k`` (an int >= 0). Paths through at most ``k`` blocks are
        counted exactly; ``k >= L`` equals backprop for a stack of ``L`` layers; ``k = 0`` is the
        residual path alone. An integer scalar traced under ``jax.jit`` works too (a schedule: one
        compilation for every ``k``). ``None`` runs exact backprop through the same code. Use
        :func:`hbpjax.gradient_agreement` to choose ``k`` for your model.
      tol: stop sweeping a stack once the relative change of its carry cotangents is ``<= tol``,
        after at most ``iterations`` sweeps; ``None`` always runs ``iterations`` sweeps.
      gamma: backward-only split ``K' = (1 - gamma) K`` of the stacks found automatically (about 0.2
        for pre-LN Transformers scanned over layers; 1.0 is fixed-point iteration); a
        :func:`hbpjax.residual_scan` or hbpjax module keeps the ``gamma`` it was given.
      scans: which stacks to convert: ``"auto"`` (every scan and chain with a residual path),
        ``"marked"`` (only :func:`hbpjax.residual_scan` and hbpjax's Flax modules) or a callable
        ``StackInfo -> bool`` choosing per stack.
      save_linearization: keep every layer's linearization between sweeps (default; what is costly
        to recompute, such as matmul and transcendental outputs, is stored). With ``False`` each
        sweep recomputes it, a group of layers at a time (8 groups): the backward's memory drops to
        about backprop's, for one more forward of every layer per sweep.
      recompute_layers: how many layers a backward that recomputes the layers (a step the user
        wrapped in a checkpoint, ``nnx.remat`` / ``jax.checkpoint``, or ``save_linearization=False``)
        recomputes and transposes at once, in every VJP of all layers. ``None`` (default): one layer
        at a time for a checkpointed step (backprop's memory, and at ``k = 0`` backprop's work, as
        the checkpoint asks), eight groups of layers for ``save_linearization=False``. A larger
        number holds that many layers' activations at once and cuts each sweep's sequential depth
        from ``L`` to ``L / recompute_layers``: the trade to make on an accelerator with memory to
        spare.
      return_report: also return a :class:`hbpjax.SweepReport`: per converted stack, the sweeps its
        backward ran and the relative change of the last one.
      layer_axis: a mesh axis name: every converted stack whose per-layer inputs are sharded along
        their layer axis over it runs layer-parallel (local sweeps, O(1) collectives per sweep).
      microbatches: with ``layer_axis``, split the batch (the leading axis of every carry leaf) into
        this many microbatches and run the layer-parallel forward as a pipeline of ``M + D - 1``
        ticks (``D`` the axis size), so that the devices work at once; the highway backward sweeps
        all microbatches together. ``None`` (default): the whole batch passes the devices in turn.
      mesh: the mesh for ``layer_axis`` (default: the one set with ``jax.set_mesh``).
      name: the public function the options were given to, named in error messages (the
        transforms set it; not compared).

    Raises:
      TypeError: a field has the wrong type (a float ``iterations``, a traced ``gamma``).
      ValueError: a field has a bad value (a negative ``iterations``, a ``gamma`` outside ``[0, 1]``,
        ``tol`` without ``iterations``).

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> options = hbpjax.Options(iterations=2, gamma=0.2)
      >>> def loss(W, x):
      ...     return jnp.sum(jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)[0])
      >>> W, x = 0.3 * jnp.ones((8, 3, 3)), jnp.ones(3)
      >>> g = hbpjax.highway_grad(loss, options=options)(W, x)
      >>> g_exact = hbpjax.highway_grad(loss, options=options, iterations=8)(W, x)   # a field replaced
      >>> bool(jnp.allclose(g_exact, jax.grad(loss)(W, x), rtol=1e-5))
      True
    """

    iterations: int | jax.Array | None = 4
    tol: float | None = None
    gamma: float = 0.0
    scans: str | Callable = "auto"
    save_linearization: bool = True
    recompute_layers: int | None = None
    return_report: bool = False
    layer_axis: str | None = None
    microbatches: int | None = None
    mesh: Any = None
    name: str = dataclasses.field(default="hbpjax.Options", repr=False)

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
        set_("recompute_layers", check_recompute_layers(self.name, self.recompute_layers))
        set_("return_report", bool(self.return_report))
        if self.layer_axis is not None and not isinstance(self.layer_axis, str):
            raise TypeError(f"{self.name}: `layer_axis` must be a mesh axis name (str) or None; got {self.layer_axis!r}.")
        if self.mesh is not None and not isinstance(self.mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
            raise TypeError(f"{self.name}: `mesh` must be a jax.sharding.Mesh (jax.make_mesh(...)) or None; got {describe(self.mesh)}.")
        if self.mesh is not None and self.layer_axis is None:
            raise ValueError(f"{self.name}: `mesh` is the mesh for `layer_axis`; pass layer_axis='<axis name>' with it.")
        set_("microbatches", check_microbatches(self.name, self.microbatches, self.layer_axis))

    @classmethod
    def given(cls, name: str, options: Options | None, keywords: Mapping[str, Any]) -> Options:
        """The options a transform named ``name`` was given: ``options`` (default ones if
        ``None``) with the ``keywords`` given beside it replacing its fields."""
        unknown = sorted(set(keywords) - set(OptionKeywords.__annotations__))
        if unknown:
            raise TypeError(
                f"{name}: unknown option{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; the options are "
                f"{', '.join(OptionKeywords.__annotations__)} (see hbpjax.Options)."
            )
        if options is None:
            return cls(name=name, **keywords)
        if not isinstance(options, Options):
            raise TypeError(f"{name}: `options` must be an hbpjax.Options(...) or None; got {describe(options)}.")
        return dataclasses.replace(options, name=name, **keywords)

    @property
    def highway(self) -> bool:
        """Whether the stacks' backward is Highway-BP (``iterations`` is not ``None``)."""
        return self.iterations is not None

    @property
    def traced(self) -> bool:
        """Whether ``iterations`` is only known at run time."""
        return is_traced(self.iterations)

    def _key(self):
        # A traced number of sweeps compares by identity: a trace made under it serves no other.
        k = id(self.iterations) if self.traced else self.iterations
        return (k, self.tol, self.gamma, self.scans, self.save_linearization, self.recompute_layers, self.return_report,
                self.layer_axis, self.microbatches, self.mesh)

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
