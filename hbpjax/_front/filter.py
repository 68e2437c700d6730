"""``filter_grad`` and ``filter_value_and_grad``: Equinox's gradient transforms with Highway-BP.

``eqx.filter_value_and_grad(fun)`` differentiates ``fun`` with respect to the floating-point
arrays of its first argument (an ``eqx.Module``, or any pytree) and treats every other leaf
(activation functions, integers, flags) as static. These do the same, with the residual stacks of
``fun`` converted as :func:`hbpjax.highway_value_and_grad` converts them. Equinox itself is not
needed: a Module is a pytree, and so are the gradients (``None`` where a leaf is not differentiated,
as Equinox returns them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .options import Options
from .transform import DEFAULT_ITERATIONS, ValueAndGrad, grad_from_value_and_grad


def _is_inexact_array(x) -> bool:
    """Equinox's ``is_inexact_array``: a floating-point (or complex) JAX or NumPy array."""
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)


def is_array_like(x) -> bool:
    """Whether ``jax.grad`` accepts ``x`` as a leaf: an array, a NumPy scalar or a Python number."""
    return hasattr(x, "dtype") or isinstance(x, (int, float, complex))


def partition(tree):
    """``(diff, tree)``: the inexact arrays of ``tree`` (``None`` elsewhere), and ``tree`` itself."""
    return jax.tree.map(lambda x: x if _is_inexact_array(x) else None, tree), tree


def combine(diff, tree):
    """``tree`` with the arrays of ``diff`` (from :func:`partition`) in place of its own."""
    return jax.tree.map(lambda d, x: x if d is None else d, diff, tree, is_leaf=lambda v: v is None)


class _FilterValueAndGrad(ValueAndGrad):
    """:class:`hbpjax._transform.ValueAndGrad` of the first argument's inexact arrays."""

    def __init__(self, fun, has_aux, *, options: Options):
        super().__init__(fun, 0, has_aux, False, False, options=options)

    def __call__(self, x, *args, **kwargs):
        diff, tree = partition(x)
        fun = self.fun

        @functools.wraps(fun)
        def of_arrays(diff, *args, **kwargs):
            return fun(combine(diff, tree), *args, **kwargs)

        inner = ValueAndGrad(of_arrays, 0, self.has_aux, False, False, options=self.options)
        return inner(diff, *args, **kwargs)


def filter_value_and_grad(
    fun: Callable | None = None, *, has_aux: bool = False, iterations: int | jax.Array | None = DEFAULT_ITERATIONS,
    tol: float | None = None, gamma: float = 0.0, scans: str | Callable = "auto", return_report: bool = False,
    save_linearization: bool = True, layer_axis: str | None = None, mesh: Any = None) -> Callable[..., Any]:
    """``eqx.filter_value_and_grad`` with Highway-BP inside every residual stack of ``fun``.

    Differentiates with respect to the floating-point arrays of the first argument (an Equinox
    Module or any pytree); every other leaf is static. Usable as a decorator.

    Args:
      fun: the function, ``fun(x, *args, **kwargs)`` returning a real scalar (or ``(scalar, aux)``).
      has_aux: whether ``fun`` returns ``(value, aux)``.
      iterations: the number of sweeps ``k``; ``k >= L`` is exact; ``None`` is exact backprop.
      tol: optional; stop sweeping a stack once its cotangents change by at most ``tol`` (relative).
      gamma: backward-only split ``K' = (1 - gamma) K`` for the stacks found automatically.
      scans: ``"auto"``, ``"marked"`` or a callable ``StackInfo -> bool``: which stacks to convert.
      return_report: also return a :class:`hbpjax.SweepReport`.
      save_linearization: keep every layer's linearization between sweeps (default).
      layer_axis: a mesh axis name: every converted stack whose per-layer inputs are sharded along
        their layer axis over it runs layer-parallel (local sweeps, O(1) collectives per sweep).
      mesh: the mesh for ``layer_axis`` (default: the one set with ``jax.set_mesh``).

    Returns:
      ``(value, grads)`` (``((value, aux), grads)`` with ``has_aux``), ``grads`` shaped like ``x``
      with ``None`` where a leaf is not a floating-point array; with ``return_report``,
      ``(that, report)``.

    Raises:
      TypeError: ``fun`` is not callable or an option has the wrong type.
      ValueError: an option has a bad value.

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> params = {"w": 0.5 * jnp.ones((6, 3, 3)), "act": jnp.tanh}   # a non-array leaf
      >>> def loss(params, x):
      ...     step = lambda h, w: (h + params["act"](h @ w), None)
      ...     return jnp.sum(jax.lax.scan(step, x, params["w"])[0])
      >>> value, grads = hbpjax.filter_value_and_grad(loss, iterations=6)(params, jnp.ones(3))
      >>> grads["w"].shape, grads["act"]
      ((6, 3, 3), None)
    """
    options = Options(iterations, tol, gamma, scans, save_linearization, return_report, layer_axis=layer_axis, mesh=mesh, name="hbpjax.filter_value_and_grad")
    make = lambda fun: _FilterValueAndGrad(fun, has_aux, options=options)
    return make if fun is None else make(fun)


def filter_grad(
    fun: Callable | None = None, *, has_aux: bool = False, iterations: int | jax.Array | None = DEFAULT_ITERATIONS,
    tol: float | None = None, gamma: float = 0.0, scans: str | Callable = "auto", return_report: bool = False,
    save_linearization: bool = True, layer_axis: str | None = None, mesh: Any = None) -> Callable:
    """``eqx.filter_grad`` with Highway-BP inside every residual stack of ``fun``.

    See :func:`filter_value_and_grad`; returns only the gradients (and ``aux`` with ``has_aux``).

    Args:
      fun: the function, ``fun(x, *args, **kwargs)`` returning a real scalar (or ``(scalar, aux)``).
      has_aux: whether ``fun`` returns ``(value, aux)``.
      iterations: the number of sweeps ``k``; ``k >= L`` is exact; ``None`` is exact backprop.
      tol: optional; stop sweeping a stack once its cotangents change by at most ``tol`` (relative).
      gamma: backward-only split ``K' = (1 - gamma) K`` for the stacks found automatically.
      scans: ``"auto"``, ``"marked"`` or a callable ``StackInfo -> bool``: which stacks to convert.
      return_report: also return a :class:`hbpjax.SweepReport`.
      save_linearization: keep every layer's linearization between sweeps (default).
      layer_axis: a mesh axis name: every converted stack whose per-layer inputs are sharded along
        their layer axis over it runs layer-parallel (local sweeps, O(1) collectives per sweep).
      mesh: the mesh for ``layer_axis`` (default: the one set with ``jax.set_mesh``).

    Returns:
      The gradients, shaped like the first argument with ``None`` where a leaf is not a
      floating-point array (``(grads, aux)`` with ``has_aux``; with ``return_report``, ``(that, report)``).

    Raises:
      TypeError: ``fun`` is not callable or an option has the wrong type.
      ValueError: an option has a bad value.

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> def loss(w, x):
      ...     return jnp.sum(jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, w)[0])
      >>> hbpjax.filter_grad(loss, iterations=4)(0.5 * jnp.ones((4, 3, 3)), jnp.ones(3)).shape
      (4, 3, 3)
    """
    options = Options(iterations, tol, gamma, scans, save_linearization, return_report, layer_axis=layer_axis, mesh=mesh, name="hbpjax.filter_grad")
    make = lambda fun: grad_from_value_and_grad(fun, _FilterValueAndGrad(fun, has_aux, options=options))
    return make if fun is None else make(fun)
