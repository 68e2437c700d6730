"""``gradient_agreement``: how close Highway-BP gradients are to exact ones, per number of sweeps."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import adapters
from .adapters import normalize_argnums
from .options import Options, check_iterations

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
    gamma: float | None = None,
    scans: str | Callable | None = None,
    options: Options | None = None,
) -> GradientAgreement:
    """Compares :func:`hbpjax.highway_grad` with exact ``jax.grad`` for several numbers of sweeps.

    Use it to choose ``iterations`` for *your* model and data: evaluate it on a real batch (at
    initialisation and again after some training, since agreement can drop as training goes on)
    and take the smallest ``k`` whose cosine similarity is close enough to 1 for your purpose
    (0.99 and above usually trains like exact backprop). Every ``k`` is traced and compiled
    separately.

    It differentiates as the transform for these arguments does: on a Flax NNX model, the
    ``nnx.Param``s as :func:`hbpjax.nnx.grad` does; on a pytree with leaves that are not
    floating-point arrays (an Equinox Module with an activation function, an ``int`` or a ``bool``
    field), its floating-point arrays as :func:`hbpjax.filter_grad` does; else as
    :func:`hbpjax.highway_grad`. The exact reference and every ``k`` are each computed on a fresh
    copy of the arguments, so the state a forward reads and changes (Dropout's RNG counts,
    BatchNorm statistics) is the same for all of them and your model is left exactly as it was.

    Args:
      fun: the loss, as you would pass it to ``jax.grad`` (or ``nnx.grad``).
      *args: the arguments to evaluate the gradients at.
      iterations: the numbers of sweeps to compare.
      argnums: which positional arguments to differentiate, as in ``jax.grad``.
      has_aux: whether ``fun`` returns ``(loss, aux)``.
      jit: compile each gradient with ``jax.jit`` (over the arrays of the arguments, modules'
        state included); ``False`` runs them eagerly.
      gamma: as in :class:`hbpjax.Options` (default: that of ``options``).
      scans: as in :class:`hbpjax.Options` (default: that of ``options``).
      options: the :class:`hbpjax.Options` to compare with (``tol``, ``save_linearization``, ...);
        its ``iterations`` are replaced by each of ``iterations`` in turn.

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
    chosen = {key: value for key, value in (("gamma", gamma), ("scans", scans)) if value is not None}
    base = Options.given(_NAME, options, chosen)
    # The same adapter as the transform for these arguments (plain, filtered, NNX); every gradient
    # is taken on a fresh copy of the arguments' arrays, so the state a forward reads and changes
    # (Dropout's RNG counts, BatchNorm statistics) is the same for all of them.
    adapter = adapters.for_arguments(args, nums)

    def grads(k):
        run = dataclasses.replace(base, iterations=k, tol=None if k is None else base.tol, return_report=False)
        grad_fn = adapter.value_and_grad(fun, argnums, has_aux, options=run)
        if jit:
            _, g = adapters.run_jitted(grad_fn, adapter, args, {})
        else:
            arrays, rebuild = adapter.arrays(args, {})
            _, g = grad_fn(*rebuild(jax.tree.map(lambda a: a, arrays))[0])
        return _flat(g)

    exact = grads(None)
    exact_norm = float(np.linalg.norm(exact))
    cosines, errors = [], []
    for k in ks:
        g = grads(k)
        denominator = np.linalg.norm(g) * exact_norm
        cosines.append(float(g @ exact / denominator) if denominator > 0 else float(np.all(g == exact)))
        errors.append(float(np.linalg.norm(g - exact) / exact_norm) if exact_norm > 0 else float(np.linalg.norm(g)))
    return GradientAgreement(tuple(ks), tuple(cosines), tuple(errors), exact_norm)
