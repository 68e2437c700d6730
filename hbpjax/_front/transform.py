"""``highway_grad`` and ``highway_value_and_grad``: ``jax.grad`` with Highway-BP inside residual stacks.

The function is traced once; its residual stacks (``lax.scan``s with a residual path, and every
:func:`hbpjax.residual_scan`) are found in the jaxpr and run with a Highway-BP backward
(:mod:`hbpjax._analysis.conversion`); everything else is differentiated by ``jax.value_and_grad`` as usual.
``highway_grad`` is built on ``highway_value_and_grad``, as ``jax.grad`` is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._analysis import conversion as _conversion
from . import context as _context
from . import report as _report
from .options import Options, as_int, describe

DEFAULT_ITERATIONS = 4


def highway_value_and_grad(
    fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False, holomorphic: bool = False,
    allow_int: bool = False, *, iterations: int | jax.Array | None = DEFAULT_ITERATIONS, tol: float | None = None,
    gamma: float = 0.0, scans: str | Callable = "auto", return_report: bool = False, save_linearization: bool = True,
    layer_axis: str | None = None, mesh: Any = None,
) -> Callable[..., tuple[Any, Any]]:
    """Like ``jax.value_and_grad``, with Highway-BP in every residual stack of ``fun``.

    Every residual stack that ``fun`` runs computes its backward with ``iterations`` parallel sweeps
    instead of one sequential pass over its layers: the ``lax.scan``s whose step has a residual path
    (``h + f(h)``, a gate ``a * h + b``, ``relu(h + f(h))``; made by ``lax.scan``,
    ``lax.fori_loop``, ``nnx.scan``, ``nnx.RNN``, ``nn.scan``, ``nn.RNN``, under ``jax.jit`` too),
    found in ``fun``'s jaxpr without any change to the model, and every :func:`hbpjax.residual_scan`.
    Values are those of ``fun``; everything outside the stacks is differentiated by JAX as usual.
    :func:`hbpjax.find_stacks` shows what is converted and why; a :class:`hbpjax.NoStackWarning`
    says when nothing is.

    Args:
      fun: function to differentiate, returning a real scalar (or ``(scalar, aux)`` with
        ``has_aux``).
      argnums: int or sequence of ints: which positional arguments to differentiate.
      has_aux: whether ``fun`` returns ``(value, aux)``; ``aux`` is returned, not differentiated.
      holomorphic: as in ``jax.value_and_grad``.
      allow_int: as in ``jax.value_and_grad``: integer inputs get ``float0`` zero gradients.
      iterations: the number of sweeps ``k`` (an int >= 0). Paths through at most ``k`` blocks are
        counted exactly; ``k >= L`` equals backprop for a stack of length ``L``; ``k = 0`` is the
        residual path alone. ``None`` runs exact backprop (plain ``lax.scan``) through the same code.
        Use :func:`hbpjax.gradient_agreement` to choose ``k`` for your model.
      tol: optional; stop sweeping a stack once the relative change of its carry cotangents is
        ``<= tol``, after at most ``iterations`` sweeps.
      gamma: backward-only split ``K' = (1 - gamma) K`` of the stacks found automatically (about 0.2
        for pre-LN Transformers scanned over layers, 1.0 is fixed-point iteration); a
        ``residual_scan`` or hbpjax module keeps the ``gamma`` it was given.
      scans: which scans to convert: ``"auto"`` (every scan with a residual path), ``"marked"`` (only
        :func:`hbpjax.residual_scan` and hbpjax's Flax modules) or a callable
        ``StackInfo -> bool`` choosing per scan.
      return_report: also return a :class:`hbpjax.SweepReport`: per converted stack, the sweeps
        its backward ran and the relative change of the last one.
      save_linearization: keep every layer's linearization between sweeps (default; usually fastest;
        what is costly to recompute, such as matmul and transcendental outputs, is stored, and each
        sweep redoes the elementwise arithmetic). With ``False`` each sweep recomputes it, a group of
        layers at a time (8 groups): the backward's memory drops to about backprop's, for one more
        forward of every layer per sweep.
      layer_axis: a mesh axis name: every converted stack whose per-layer inputs are sharded along
        their layer axis over it runs layer-parallel (local sweeps, O(1) collectives per sweep).
      mesh: the mesh for ``layer_axis`` (default: the one set with ``jax.set_mesh``).

    Returns:
      A function with ``fun``'s positional signature returning ``(value, grad)`` (or
      ``((value, aux), grad)``), ``grad`` shaped like the ``argnums`` arguments; with
      ``return_report``, ``(that, report)``.

    Raises:
      TypeError: ``fun`` is not callable, an option has the wrong type, or (at call time) a
        differentiated argument holds an integer or non-array leaf (use
        :func:`hbpjax.filter_value_and_grad` for a pytree with static leaves).
      ValueError: an option has a bad value (a negative ``iterations``, a ``gamma`` outside
        ``[0, 1]``, an unknown ``scans`` string).

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> def loss(w, h0):
      ...     h, _ = hbpjax.residual_scan(lambda h, x: jnp.sin(w * h), h0, length=32)
      ...     return jnp.sum(h)
      >>> exact = jax.grad(loss)(0.1, jnp.ones(4))
      >>> for k in (0, 2, 32):  # sweeps: the gradient fills in as k grows, exact at k >= 32
      ...     value, g = hbpjax.highway_value_and_grad(loss, iterations=k)(0.1, jnp.ones(4))
      ...     print(k, f"{g / exact:.2f}")
      0 0.42
      2 0.88
      32 1.00
    """
    options = Options(
        iterations, tol, gamma, scans, save_linearization, return_report, layer_axis=layer_axis, mesh=mesh,
        name="hbpjax.highway_value_and_grad",
    )
    return ValueAndGrad(fun, argnums, has_aux, holomorphic, allow_int, options=options)


def highway_grad(
    fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False, holomorphic: bool = False,
    allow_int: bool = False, *, iterations: int | jax.Array | None = DEFAULT_ITERATIONS, tol: float | None = None,
    gamma: float = 0.0, scans: str | Callable = "auto", return_report: bool = False, save_linearization: bool = True,
    layer_axis: str | None = None, mesh: Any = None,
) -> Callable:
    """Like ``jax.grad``, with Highway-BP in every residual stack of ``fun``.

    Built on :func:`highway_value_and_grad` as ``jax.grad`` is on ``jax.value_and_grad``: the
    residual stacks of ``fun`` (``lax.scan``s with a residual path, Python loops of identical residual
    blocks, every :func:`hbpjax.residual_scan`) run their backward as ``iterations`` parallel sweeps.

    Args:
      fun: function to differentiate, returning a real scalar (or ``(scalar, aux)`` with
        ``has_aux``).
      argnums: int or sequence of ints: which positional arguments to differentiate.
      has_aux: whether ``fun`` returns ``(value, aux)``; ``aux`` is returned, not differentiated.
      holomorphic: as in ``jax.grad``.
      allow_int: as in ``jax.grad``: integer inputs get ``float0`` zero gradients.
      iterations: the number of sweeps ``k`` (an int >= 0, or an integer traced under ``jax.jit``).
        ``k >= L`` equals backprop for a stack of ``L`` layers; ``None`` is exact backprop.
      tol: optional; stop sweeping a stack once its cotangents change by at most ``tol`` (relative).
      gamma: backward-only split ``K' = (1 - gamma) K`` for the stacks found automatically.
      scans: ``"auto"``, ``"marked"`` or a callable ``StackInfo -> bool``: which stacks to convert.
      return_report: also return a :class:`hbpjax.SweepReport`.
      save_linearization: keep every layer's linearization between sweeps (default); ``False``
        recomputes it per sweep, a group of layers at a time, for backprop's memory.
      layer_axis: a mesh axis name: every converted stack whose per-layer inputs are sharded along
        their layer axis over it runs layer-parallel (local sweeps, O(1) collectives per sweep).
      mesh: the mesh for ``layer_axis`` (default: the one set with ``jax.set_mesh``).

    Returns:
      A function with ``fun``'s positional signature returning ``grad`` (or ``(grad, aux)`` with
      ``has_aux``), shaped like the ``argnums`` arguments, exactly like ``jax.grad``; with
      ``return_report``, ``(that, report)``.

    Raises:
      TypeError: ``fun`` is not callable, an option has the wrong type, or (at call time) a
        differentiated argument holds an integer or non-array leaf (use :func:`hbpjax.filter_grad`
        for a pytree with static leaves, such as an Equinox Module).
      ValueError: an option has a bad value (a negative ``iterations``, a ``gamma`` outside
        ``[0, 1]``, an unknown ``scans`` string).

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> W = 0.3 * jnp.ones((16, 4))                  # 16 layers, per-layer weights
      >>> def loss(W):
      ...     h, _ = hbpjax.residual_scan(lambda h, w: jnp.tanh(w * h), jnp.ones(4), W)
      ...     return jnp.sum(h)
      >>> g = hbpjax.highway_grad(loss, iterations=16)(W)    # k >= L: exact
      >>> bool(jnp.allclose(g, jax.grad(loss)(W), rtol=1e-4))
      True
    """
    options = Options(iterations, tol, gamma, scans, save_linearization, return_report, layer_axis=layer_axis, mesh=mesh, name="hbpjax.highway_grad")
    return grad_from_value_and_grad(fun, ValueAndGrad(fun, argnums, has_aux, holomorphic, allow_int, options=options))


def grad_from_value_and_grad(fun: Callable, value_and_grad: ValueAndGrad) -> Callable:
    """``grad`` from a ``value_and_grad`` built by one of hbpjax's transforms, as ``jax.grad`` is
    built: the gradient (and ``aux``), and the report when it returns one."""
    has_aux, report = value_and_grad.has_aux, value_and_grad.options.report

    @functools.wraps(fun)
    def grad_fun(*args, **kwargs):
        out = value_and_grad(*args, **kwargs)
        (value, g), sweeps = out if report else (out, None)
        g = (g, value[1]) if has_aux else g
        return (g, sweeps) if report else g

    return grad_fun


class ValueAndGrad:
    """What :func:`highway_value_and_grad` returns: ``fun``'s value and gradient, with the residual
    stacks of ``fun`` converted while it is traced (once per call, or once under ``jax.jit``).

    Attributes:
      fun: the function.
      argnums, has_aux, holomorphic, allow_int: as for ``jax.value_and_grad`` (``argnums`` checked).
      options: the transform's :class:`~hbpjax._options.Options`.
    """

    def __init__(self, fun, argnums, has_aux, holomorphic, allow_int, *, options: Options):
        if not callable(fun):
            raise TypeError(f"{options.name}: `fun` must be callable; got {fun!r} of type {type(fun).__name__}.")
        self.fun, self.options = fun, options
        self.argnums = self._normalize(argnums)
        self.has_aux, self.holomorphic, self.allow_int = has_aux, holomorphic, allow_int
        self.checked = _checked_output(options.name, fun, has_aux, holomorphic)
        functools.update_wrapper(self, fun)

    def _normalize(self, argnums):
        return normalize_argnums(self.options.name, argnums)

    def _check(self, args) -> None:
        check_args(self.options.name, self.argnums, args, self.allow_int, self.holomorphic)

    def _transform(self, fun, argnums) -> Callable:
        """The JAX transform this one converts the stacks of: ``jax.value_and_grad``."""
        return jax.value_and_grad(fun, argnums, has_aux=self.has_aux, holomorphic=self.holomorphic, allow_int=self.allow_int)

    def _conversion(self, args, kwargs):
        nums = (self.argnums,) if isinstance(self.argnums, int) else self.argnums
        return _conversion.Conversion(self.checked, self.options, args, kwargs, differentiated=nums)

    def __call__(self, *args, **kwargs):
        self._check(args)
        # Exact backprop through the same function (with a layer_axis, through the conversion: the
        # stacks sharded over it run layer-parallel, their backward JAX's transpose of the pipeline).
        if (not self.options.highway and self.options.layer_axis is None) or _context.in_exact():
            out = self._transform(self.checked, self.argnums)(*args, **kwargs)
            return (out, _report.SweepReport.empty()) if self.options.report else out
        conversion = self._conversion(args, kwargs)
        out = _report.value_and_grad(self._transform, conversion, self.argnums, args, kwargs, holomorphic=self.holomorphic)
        conversion.warn(stacklevel=2)
        return out


def normalize_argnums(name: str, argnums) -> int | tuple[int, ...]:
    """Checks ``argnums`` at wrap time, as ``jax.grad`` does: an int or a non-empty int sequence."""

    try:
        if isinstance(argnums, Sequence) and not isinstance(argnums, str):
            out = tuple(as_int(a) for a in argnums)
        else:
            return as_int(argnums)
    except TypeError:
        raise TypeError(
            f"{name}: `argnums` must be an int or a sequence of ints; got {argnums!r}."
        ) from None
    if not out:
        raise ValueError(f"{name}: `argnums` must name at least one argument; got {argnums!r}.")
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: `argnums` must not repeat an argument; got {argnums!r}.")
    return out


def check_args(name: str, argnums, args, allow_int: bool, holomorphic: bool = False) -> None:
    """Call-time checks on the differentiated positional arguments."""
    nums = (argnums,) if isinstance(argnums, int) else argnums
    for a in nums:
        if not -len(args) <= a < len(args):
            raise TypeError(
                f"{name}: differentiating with respect to argnums={argnums} requires at least "
                f"{max(a + 1, -a)} positional arguments to be passed by the caller, but got only "
                f"{len(args)} positional arguments. Pass the argument positionally or change argnums."
            )
    if allow_int or holomorphic:
        return
    for a in nums:
        for path, leaf in jax.tree_util.tree_flatten_with_path(args[a])[0]:
            if not hasattr(leaf, "dtype") and not isinstance(leaf, (int, float, complex)):
                raise TypeError(
                    f"{name}: argument {a} has a leaf{jax.tree_util.keystr(path)} that is not an array: "
                    f"{describe(leaf)}. To differentiate the arrays of a pytree holding other things (an "
                    "Equinox Module), use hbpjax.filter_grad / hbpjax.filter_value_and_grad, or move the "
                    "leaf out of the differentiated argument."
                )
            dtype = jnp.result_type(leaf) if not hasattr(leaf, "dtype") else leaf.dtype
            if not jnp.issubdtype(dtype, jnp.inexact):
                raise TypeError(
                    f"{name}: argument {a} has a leaf{jax.tree_util.keystr(path)} of dtype "
                    f"{dtype}, but gradients need real or complex floating-point inputs. Cast it "
                    "to float, move it out of argnums, or pass allow_int=True (float0 gradients)."
                )


def _checked_output(name: str, fun: Callable, has_aux: bool, holomorphic: bool) -> Callable:
    """Wraps ``fun`` so a misshapen output is reported under our name before JAX sees it."""

    @functools.wraps(fun)
    def checked(*args, **kwargs):
        out = fun(*args, **kwargs)
        value = out
        if has_aux:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError(
                    f"{name}: with has_aux=True the function must return a pair (value, aux); "
                    f"got {describe(out)}."
                )
            value = out[0]
        shape = jnp.shape(value) if hasattr(value, "shape") or jnp.isscalar(value) else None
        if shape != ():
            raise TypeError(
                f"{name}: gradients are only defined for scalar-output functions; the function "
                f"returned {describe(value)}. Reduce it to a scalar (e.g. "
                "jnp.mean), return extra outputs with has_aux=True, or use jax.vjp."
            )
        dtype = jnp.result_type(value)
        if not holomorphic and not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name}: gradients need a real floating-point output; the function returned "
                f"dtype {dtype}. Cast the loss to float (or use jax.vjp for integer outputs)."
            )
        return out

    return checked
