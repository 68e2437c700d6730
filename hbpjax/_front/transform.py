"""``highway_grad`` and ``highway_value_and_grad``: ``jax.grad`` with Highway-BP inside residual stacks.

The function is traced and planned once per call (once under ``jax.jit``); its residual stacks
(``lax.scan``s and Python-loop chains with a residual path, and every :func:`hbpjax.residual_scan`)
run with a Highway-BP backward (:mod:`hbpjax._analysis.conversion`); everything else is
differentiated by JAX as usual. How the arguments are differentiated (plain pytrees, Equinox-style
filtering, NNX modules) is an :class:`~hbpjax._front.adapters.Adapter`'s business; what is done
with the stacks is the :class:`hbpjax.Options`'. ``highway_grad`` is built on
``highway_value_and_grad``, as ``jax.grad`` is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Unpack

import jax.numpy as jnp

from . import context as _context
from . import report as _report
from .adapters import Adapter
from .options import OptionKeywords, Options, describe


def highway_value_and_grad(
    fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False, holomorphic: bool = False,
    allow_int: bool = False, *, options: Options | None = None, **keywords: Unpack[OptionKeywords],
) -> Callable[..., tuple[Any, Any]]:
    """Like ``jax.value_and_grad``, with Highway-BP in every residual stack of ``fun``.

    Every residual stack that ``fun`` runs computes its backward with ``iterations`` parallel sweeps
    instead of one sequential pass over its layers: the ``lax.scan``s whose step has a residual path
    (``h + f(h)``, a gate ``a * h + b``, ``relu(h + f(h))``; made by ``lax.scan``,
    ``lax.fori_loop``, ``nnx.scan``, ``nnx.RNN``, ``nn.scan``, ``nn.RNN``, under ``jax.jit`` too),
    Python loops of residual blocks, found in ``fun``'s jaxpr without any change to the model, and
    every :func:`hbpjax.residual_scan`. Values are those of ``fun``; everything outside the stacks
    is differentiated by JAX as usual. :func:`hbpjax.find_stacks` shows what is converted and why;
    a :class:`hbpjax.NoStackWarning` says when nothing is.

    Args:
      fun: function to differentiate, returning a real scalar (or ``(scalar, aux)`` with
        ``has_aux``).
      argnums: int or sequence of ints: which positional arguments to differentiate.
      has_aux: whether ``fun`` returns ``(value, aux)``; ``aux`` is returned, not differentiated.
      holomorphic: as in ``jax.value_and_grad``.
      allow_int: as in ``jax.value_and_grad``: integer inputs get ``float0`` zero gradients.
      options: an :class:`hbpjax.Options` (default: ``Options()``, 4 sweeps).
      **keywords: any field of :class:`hbpjax.Options` (``iterations``, ``tol``, ``gamma``,
        ``scans``, ``save_linearization``, ``recompute_layers``, ``return_report``, ``layer_axis``,
        ``mesh``), replacing that of ``options``.

    Returns:
      A function with ``fun``'s positional signature returning ``(value, grad)`` (or
      ``((value, aux), grad)``), ``grad`` shaped like the ``argnums`` arguments; with
      ``return_report``, ``(that, report)``.

    Raises:
      TypeError: ``fun`` is not callable, an option is unknown or has the wrong type, or (at call
        time) a differentiated argument holds an integer or non-array leaf (use
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
    options = Options.given("hbpjax.highway_value_and_grad", options, keywords)
    return ValueAndGrad(fun, argnums, has_aux, holomorphic, allow_int, options=options)


def highway_grad(
    fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False, holomorphic: bool = False,
    allow_int: bool = False, *, options: Options | None = None, **keywords: Unpack[OptionKeywords],
) -> Callable:
    """Like ``jax.grad``, with Highway-BP in every residual stack of ``fun``.

    Built on :func:`highway_value_and_grad` as ``jax.grad`` is on ``jax.value_and_grad``: the
    residual stacks of ``fun`` (``lax.scan``s with a residual path, Python loops of identical residual
    blocks, every :func:`hbpjax.residual_scan`) run their backward as ``iterations`` parallel sweeps.

    Args:
      fun: function to differentiate, as for :func:`highway_value_and_grad`; so are ``argnums``,
        ``has_aux``, ``holomorphic``, ``allow_int``, ``options`` and the :class:`hbpjax.Options`
        keywords.

    Returns:
      A function with ``fun``'s positional signature returning ``grad`` (or ``(grad, aux)`` with
      ``has_aux``), shaped like the ``argnums`` arguments, exactly like ``jax.grad``; with
      ``return_report``, ``(that, report)``.

    Raises:
      TypeError: ``fun`` is not callable, an option is unknown or has the wrong type, or (at call
        time) a differentiated argument holds an integer or non-array leaf (use
        :func:`hbpjax.filter_grad` for a pytree with static leaves, such as an Equinox Module).
      ValueError: an option has a bad value.

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
    options = Options.given("hbpjax.highway_grad", options, keywords)
    return grad_from_value_and_grad(fun, ValueAndGrad(fun, argnums, has_aux, holomorphic, allow_int, options=options))


def grad_from_value_and_grad(fun: Callable, value_and_grad: ValueAndGrad) -> Callable:
    """``grad`` from a ``value_and_grad`` built by one of hbpjax's transforms, as ``jax.grad`` is
    built: the gradient (and ``aux``), and the report when it returns one."""
    has_aux, report = value_and_grad.has_aux, value_and_grad.options.return_report

    @functools.wraps(fun)
    def grad_fun(*args, **kwargs):
        out = value_and_grad(*args, **kwargs)
        (value, g), sweeps = out if report else (out, None)
        g = (g, value[1]) if has_aux else g
        return (g, sweeps) if report else g

    return grad_fun


class ValueAndGrad:
    """What the value-and-gradient transforms return: ``fun``'s value and gradient, its residual
    stacks converted while it is traced (once per call, or once under ``jax.jit``).

    Attributes:
      fun: the function.
      argnums, has_aux, holomorphic, allow_int: as for ``jax.value_and_grad`` (``argnums`` checked).
      options: the transform's :class:`hbpjax.Options`.
      adapter: how the arguments are differentiated (plain JAX, filtered, NNX modules).
    """

    def __init__(self, fun, argnums, has_aux, holomorphic=False, allow_int=False, *, options: Options, adapter=None):
        if not callable(fun):
            raise TypeError(f"{options.name}: `fun` must be callable; got {fun!r} of type {type(fun).__name__}.")
        self.fun, self.options = fun, options
        self.adapter = Adapter() if adapter is None else adapter
        self.argnums = self.adapter.normalize(options.name, argnums)
        self.has_aux, self.holomorphic, self.allow_int = has_aux, holomorphic, allow_int
        self.checked = _checked_output(options.name, fun, has_aux, holomorphic)
        functools.update_wrapper(self, fun)

    def __call__(self, *args, **kwargs):
        adapter, options = self.adapter, self.options
        adapter.check(options.name, self.argnums, args, allow_int=self.allow_int, holomorphic=self.holomorphic)
        fun, args = adapter.prepare(self.checked, self.argnums, args)
        transform = functools.partial(
            adapter.jax_transform, has_aux=self.has_aux, holomorphic=self.holomorphic, allow_int=self.allow_int
        )
        # Exact backprop through the same function (with a layer_axis, through the conversion: the
        # stacks sharded over it run layer-parallel, their backward JAX's transpose of the pipeline).
        if (not options.highway and options.layer_axis is None) or _context.in_exact():
            out = transform(fun, self.argnums)(*args, **kwargs)
            return (out, _report.SweepReport.empty()) if options.return_report else out
        conversion = adapter.conversion(fun, options, args, kwargs, self.argnums)
        out = _report.value_and_grad(transform, conversion, self.argnums, args, kwargs, holomorphic=self.holomorphic)
        conversion.warn(stacklevel=2)
        return out


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
