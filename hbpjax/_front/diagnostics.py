"""``gradient_agreement``: how close Highway-BP gradients are to exact ones, per number of sweeps."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import filter as _filter
from .options import check_iterations
from .transform import highway_grad, normalize_argnums

_NAME = "hbpjax.gradient_agreement"


@dataclasses.dataclass(frozen=True)
class GradientAgreement:
    """Highway gradients compared with exact ones, one entry per number of sweeps.

    Attributes:
      iterations: the numbers of sweeps ``k`` that were compared.
      cosine: cosine similarity between the highway and the exact gradient (all differentiated
        leaves flattened into one vector), per ``k``. ``1.0`` is perfect agreement in direction.
      relative_error: ``|g_k - g| / |g|`` per ``k``.
      exact_norm: ``|g|``, the norm of the exact gradient.

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> def loss(W, x):
      ...     return jnp.sum(jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)[0])
      >>> agreement = hbpjax.gradient_agreement(loss, 0.3 * jnp.ones((8, 3, 3)), jnp.ones(3), iterations=(0, 8))
      >>> agreement.iterations, agreement.cosine[-1] > 0.999999
      ((0, 8), True)
    """

    iterations: tuple[int, ...]
    cosine: tuple[float, ...]
    relative_error: tuple[float, ...]
    exact_norm: float

    def __str__(self) -> str:
        lines = ["   k     cosine   rel. error", "----  ---------  -----------"]
        for k, c, e in zip(self.iterations, self.cosine, self.relative_error):
            lines.append(f"{k:4d}  {c:9.6f}  {e:11.3e}")
        return "\n".join(lines)


def _flat(tree) -> np.ndarray:
    leaves = [
        np.asarray(leaf, dtype=np.float64).ravel()
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def gradient_agreement(
    fun: Callable,
    *args: Any,
    iterations: Sequence[int] | int = (0, 1, 2, 4, 8),
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    jit: bool = True,
    gamma: float = 0.0,
    scans: str | Callable = "auto",
) -> GradientAgreement:
    """Compares :func:`hbpjax.highway_grad` with exact ``jax.grad`` for several numbers of sweeps.

    Use it to choose ``iterations`` for *your* model and data: evaluate it on a real batch (at
    initialisation and again after some training, since agreement can drop as training goes on)
    and take the smallest ``k`` whose cosine similarity is close enough to 1 for your purpose
    (0.99 and above usually trains like exact backprop). Every ``k`` is traced and compiled
    separately.

    Works on a Flax NNX model directly: when the differentiated arguments are ``nnx.Module``s, the
    gradients are those of :func:`hbpjax.nnx.grad` (``nnx.Param`` only), the exact reference and
    every ``k`` each computed on a fresh copy of the arguments, so the state a forward reads and
    changes (Dropout's RNG counts, BatchNorm statistics) is the same for all of them and your model
    is left exactly as it was. On a pytree with leaves that are not arrays (an Equinox Module) the
    floating-point arrays are compared, as :func:`hbpjax.filter_grad` differentiates them.

    Args:
      fun: the loss, as you would pass it to ``jax.grad`` (or ``nnx.grad``).
      *args: the arguments to evaluate the gradients at.
      iterations: the numbers of sweeps to compare.
      argnums: which positional arguments to differentiate, as in ``jax.grad``.
      has_aux: whether ``fun`` returns ``(loss, aux)``.
      jit: compile each gradient with ``jax.jit`` (``nnx.jit`` for modules; all ``args`` must then be
        arrays, pytrees of arrays or modules); ``False`` runs them eagerly.
      gamma: as in :func:`hbpjax.highway_grad`.
      scans: as in :func:`hbpjax.highway_grad`.

    Returns:
      A :class:`GradientAgreement`; ``print`` it for a table.

    Raises:
      TypeError: ``fun`` is not callable, or an option has the wrong type.
      ValueError: ``iterations`` lists ``None`` or a negative number.

    Examples:
      >>> import jax.numpy as jnp, hbpjax
      >>> def loss(w):
      ...     h, _ = hbpjax.residual_scan(lambda h, x: jnp.tanh(w * h), jnp.ones(3), length=6)
      ...     return jnp.sum(h)
      >>> agreement = hbpjax.gradient_agreement(loss, 0.5, iterations=(0, 6))
      >>> agreement.relative_error[-1] < 1e-5
      True
    """
    if not callable(fun):
        raise TypeError(f"{_NAME}: `fun` must be callable; got {fun!r}.")
    listed = (iterations,) if isinstance(iterations, (int, np.integer)) or iterations is None else iterations
    ks: list[int] = []
    for k in listed:
        checked = check_iterations(_NAME, k)
        if checked is None:
            raise ValueError(f"{_NAME}: `iterations` lists sweep counts; None (exact) is the reference.")
        ks.append(int(checked))
    nums = normalize_argnums(_NAME, argnums)
    nums = (nums,) if isinstance(nums, int) else nums
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and any(isinstance(args[a], nnx.Module) for a in nums if -len(args) <= a < len(args)):
        from .. import nnx as hbpjax_nnx

        # A snapshot: the reference and every k start from the same state (RNG counts, batch
        # statistics), each on modules of its own, and the user's modules are left as they were.
        graphdef, state = nnx.split(args)
        state = jax.tree.map(lambda a: a, state)

        def grads(k):
            grad_fn = hbpjax_nnx.grad(fun, argnums=argnums, has_aux=has_aux, iterations=k, gamma=gamma, scans=scans)
            g = (nnx.jit(grad_fn) if jit else grad_fn)(*nnx.merge(graphdef, jax.tree.map(lambda a: a, state)))
            return _flat(g[0] if has_aux else g)

    elif any(not _filter.is_array_like(leaf) for a in nums for leaf in jax.tree.leaves(args[a])):
        # Pytrees with static leaves (an Equinox Module): the floating-point arrays are
        # differentiated, as hbpjax.filter_grad does; the rest is closed over.
        parts = [_filter.partition(args[a]) for a in nums]

        def of_arrays(diffs):
            full = list(args)
            for a, d, (_, tree) in zip(nums, diffs, parts):
                full[a] = _filter.combine(d, tree)
            return fun(*full)

        def grads(k):
            grad_fn = highway_grad(of_arrays, 0, has_aux, iterations=k, gamma=gamma, scans=scans)
            g = (jax.jit(grad_fn) if jit else grad_fn)(tuple(d for d, _ in parts))
            return _flat(g[0] if has_aux else g)

    else:

        def grads(k):
            grad_fn = highway_grad(fun, argnums, has_aux, iterations=k, gamma=gamma, scans=scans)
            g = (jax.jit(grad_fn) if jit else grad_fn)(*args)
            return _flat(g[0] if has_aux else g)

    exact = grads(None)
    exact_norm = float(np.linalg.norm(exact))
    cosines, errors = [], []
    for k in ks:
        g = grads(k)
        denominator = np.linalg.norm(g) * exact_norm
        cosines.append(float(g @ exact / denominator) if denominator > 0 else float(np.all(g == exact)))
        errors.append(float(np.linalg.norm(g - exact) / exact_norm) if exact_norm > 0 else float(np.linalg.norm(g)))
    return GradientAgreement(tuple(ks), tuple(cosines), tuple(errors), exact_norm)
