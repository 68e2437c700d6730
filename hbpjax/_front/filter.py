"""``filter_grad`` and ``filter_value_and_grad``: Equinox's gradient transforms with Highway-BP.

``eqx.filter_value_and_grad(fun)`` differentiates ``fun`` with respect to the floating-point
arrays of its first argument (an ``eqx.Module``, or any pytree) and treats every other leaf
(activation functions, integers, flags) as static. These do the same, with the residual stacks of
``fun`` converted as :func:`hbpjax.highway_value_and_grad` converts them. Equinox itself is not
needed: a Module is a pytree, and so are the gradients (``None`` where a leaf is not differentiated,
as Equinox returns them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Unpack

from .adapters import Filter
from .options import OptionKeywords, Options
from .transform import ValueAndGrad, grad_from_value_and_grad


def filter_value_and_grad(
    fun: Callable | None = None, *, has_aux: bool = False, options: Options | None = None,
    **keywords: Unpack[OptionKeywords],
) -> Callable[..., Any]:
    """``eqx.filter_value_and_grad`` with Highway-BP inside every residual stack of ``fun``.

    Differentiates with respect to the floating-point arrays of the first argument (an Equinox
    Module or any pytree); every other leaf is static. Usable as a decorator.

    Args:
      fun: the function, ``fun(x, *args, **kwargs)`` returning a real scalar (or ``(scalar, aux)``).
      has_aux: whether ``fun`` returns ``(value, aux)``.
      options: an :class:`hbpjax.Options` (default: ``Options()``, 4 sweeps).
      **keywords: any field of :class:`hbpjax.Options`, replacing that of ``options``.

    Returns:
      ``(value, grads)`` (``((value, aux), grads)`` with ``has_aux``), ``grads`` shaped like ``x``
      with ``None`` where a leaf is not a floating-point array; with ``return_report``,
      ``(that, report)``.

    Raises:
      TypeError: ``fun`` is not callable or an option is unknown or has the wrong type.
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
    options = Options.given("hbpjax.filter_value_and_grad", options, keywords)
    make = lambda fun: ValueAndGrad(fun, 0, has_aux, options=options, adapter=Filter())
    return make if fun is None else make(fun)


def filter_grad(
    fun: Callable | None = None, *, has_aux: bool = False, options: Options | None = None,
    **keywords: Unpack[OptionKeywords],
) -> Callable:
    """``eqx.filter_grad`` with Highway-BP inside every residual stack of ``fun``.

    See :func:`filter_value_and_grad`; returns only the gradients (and ``aux`` with ``has_aux``).

    Args:
      fun: the function, as for :func:`filter_value_and_grad`; so are ``has_aux``, ``options`` and
        the :class:`hbpjax.Options` keywords.

    Returns:
      The gradients, shaped like the first argument with ``None`` where a leaf is not a
      floating-point array (``(grads, aux)`` with ``has_aux``; with ``return_report``, ``(that, report)``).

    Raises:
      TypeError: ``fun`` is not callable or an option is unknown or has the wrong type.
      ValueError: an option has a bad value.

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> def loss(w, x):
      ...     return jnp.sum(jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, w)[0])
      >>> hbpjax.filter_grad(loss, iterations=4)(0.5 * jnp.ones((4, 3, 3)), jnp.ones(3)).shape
      (4, 3, 3)
    """
    options = Options.given("hbpjax.filter_grad", options, keywords)
    make = lambda fun: grad_from_value_and_grad(fun, ValueAndGrad(fun, 0, has_aux, options=options, adapter=Filter()))
    return make if fun is None else make(fun)
