"""Which highway transform is active while a function is traced, and :func:`exact` regions.

A transform activates its :class:`hbpjax.Options` while it traces the function; code that
runs during the trace (:func:`hbpjax.residual_scan`) reads them here. The value lives in a
``jax.make_user_context``, so it is part of JAX's tracing and compilation cache key: a function
jitted under one number of sweeps is traced again under another (or under plain ``jax.grad``)
instead of silently reusing a stale trace, and nothing leaks into an unrelated ``jax.grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

from .options import Options

#: The scope name of :func:`exact` regions: the automatic conversion leaves what is traced in them alone.
EXACT_SCOPE = "hbpjax.exact"


class _Exact:
    """The context value inside :func:`exact`: no highway transform applies."""

    def __repr__(self) -> str:
        return "hbpjax.exact()"


_EXACT = _Exact()
# None: no transform is active. An Options: that transform's. _EXACT: inside hbpjax.exact().
_ACTIVE = jax.make_user_context(default_value=None)


def current() -> Options | None:
    """The options of the innermost active highway transform, or ``None`` (none, or an exact region)."""
    value = _ACTIVE.value
    # iterations=None (exact) traces through the conversion only to run layer-parallel stacks:
    # a residual_scan is then a plain scan, found like any other.
    return value if isinstance(value, Options) and value.highway else None


def in_exact() -> bool:
    """Whether the code runs inside :func:`exact`."""
    return _ACTIVE.value is _EXACT


def active(options: Options):
    """Context manager activating a transform's ``options`` while its function is traced."""
    return _ACTIVE(options)


@contextlib.contextmanager
def exact() -> Iterator[None]:
    """Keeps a region exact: what is computed inside is differentiated by plain backprop.

    Inside the ``with`` block no scan is converted, ``residual_scan``s (layer-parallel ones included)
    run their exact backward, and a highway transform called there is plain ``jax.grad``. Use it for
    a part of the model where the approximation is not wanted, around an inner ``jax.grad`` whose
    derivative the outer ``highway_grad`` should take exactly (a gradient penalty), or around a
    training step to compare with exact backprop without changing its code.

    Yields:
      The ``with`` block, run with every highway transform and conversion off; the previous state
      comes back when it ends (also on an exception).

    Examples:
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
    with jax.named_scope(EXACT_SCOPE), _ACTIVE(_EXACT):
        yield
