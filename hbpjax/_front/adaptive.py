"""Choosing ``k`` while training: :class:`AdaptiveIterations` keeps the gradient's agreement up.

Agreement between Highway-BP and exact gradients drops as training goes on, so a ``k`` chosen at
initialisation may not last. The controller measures it now and then on the current batch (one
exact backward, amortised over ``every`` steps) and moves ``k`` to keep the cosine similarity
above a target. ``k`` is a traced integer of the train step, so changing it never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import lax

from . import adapters
from .adapters import normalize_argnums
from .options import Options, as_int, as_real

_NAME = "hbpjax.AdaptiveIterations"
logger = logging.getLogger("hbpjax")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["k", "step", "cosine", "measured_k"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class AdaptiveState:
    """The controller's state: a pytree of arrays to keep in the train state.

    Attributes:
      k: ``int32``: the number of sweeps the next steps use.
      step: ``int32``: steps taken so far.
      cosine: ``float32``: the last measured cosine similarity to the exact gradient (NaN before
        the first measurement).
      measured_k: ``int32``: the ``k`` that ``cosine`` was measured at.

    Examples:
      >>> import hbpjax
      >>> state = hbpjax.AdaptiveIterations(k_init=3).init()
      >>> int(state.k), int(state.step)
      (3, 0)
    """

    k: jax.Array
    step: jax.Array
    cosine: jax.Array
    measured_k: jax.Array

    def __str__(self) -> str:
        try:
            return (
                f"step {int(self.step)}: k = {int(self.k)} (last measured: cosine {float(self.cosine):.4f} at "
                f"k = {int(self.measured_k)})"
            )
        except Exception:  # traced
            return "AdaptiveState (traced)"


@dataclasses.dataclass(frozen=True)
class AdaptiveIterations:
    """Raises or lowers ``k`` during training to keep the gradient's cosine to exact above a target.

    Every ``every`` steps (the first step included) the train step also computes the exact gradient
    on its batch and the cosine similarity ``c`` of the Highway-BP gradient to it. Below ``target``,
    ``k`` grows (doubles, at least by one); above ``relax`` it shrinks by one; in between it stays;
    always within ``[k_min, k_max]``. The update itself uses the Highway-BP gradient. Decisions are
    logged to the ``"hbpjax"`` logger (``log=True``) and kept in the state.

    Attributes:
      target: the cosine similarity to keep (0.99 usually trains like backprop).
      k_min, k_max: the range of ``k``.
      every: measure every this many steps (the cost: one exact backward per ``every`` steps).
      k_init: ``k`` before the first measurement.
      relax: above this cosine, ``k`` is lowered; default halfway between ``target`` and 1.
      log: log every measurement (step, cosine, old and new ``k``).

    Raises:
      TypeError: a setting has the wrong type.
      ValueError: a setting is out of range (``target`` outside ``(0, 1)``, ``relax < target``,
        ``k_min > k_max``, ``every < 1``).

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> W, x = 0.5 * jax.random.normal(jax.random.key(0), (16, 4, 4)), jnp.ones(4)
      >>> def loss(W, x):
      ...     h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)
      ...     return jnp.sum(h ** 2)
      >>> controller = hbpjax.AdaptiveIterations(target=0.99, every=10, k_init=0)
      >>> step = jax.jit(controller.value_and_grad(loss))   # compiled once for every k
      >>> state = controller.init()
      >>> (value, grads), state = step(state, W, x)          # step 0 measures: k = 0 is too few
      >>> print(state)
      step 1: k = 1 (last measured: cosine 0.7977 at k = 0)
    """

    target: float = 0.99
    k_min: int = 0
    k_max: int = 64
    every: int = 50
    k_init: int = 2
    relax: float | None = None
    log: bool = False

    def __post_init__(self):
        def real(name, value, low, high):
            try:
                value = as_real(value)
            except TypeError:
                raise TypeError(f"{_NAME}: `{name}` must be a float; got {value!r}.") from None
            if not low < value < high:
                raise ValueError(f"{_NAME}: `{name}` must be in ({low}, {high}); got {value}.")
            return value

        def count(name, value, low):
            try:
                value = as_int(value)
            except TypeError:
                raise TypeError(f"{_NAME}: `{name}` must be an int; got {value!r}.") from None
            if value < low:
                raise ValueError(f"{_NAME}: `{name}` must be >= {low}; got {value}.")
            return value

        target = real("target", self.target, 0.0, 1.0)
        relax = (1.0 + target) / 2 if self.relax is None else real("relax", self.relax, 0.0, 1.0 + 1e-9)
        if relax < target:
            raise ValueError(f"{_NAME}: `relax` ({relax}) must be >= `target` ({target}), or k would oscillate.")
        k_min, k_max = count("k_min", self.k_min, 0), count("k_max", self.k_max, 0)
        if k_max < k_min:
            raise ValueError(f"{_NAME}: `k_max` ({k_max}) must be >= `k_min` ({k_min}).")
        k_init = count("k_init", self.k_init, 0)
        if not k_min <= k_init <= k_max:
            raise ValueError(f"{_NAME}: `k_init` ({k_init}) must be in [k_min, k_max] = [{k_min}, {k_max}].")
        for name, value in (("target", target), ("relax", relax), ("k_min", k_min), ("k_max", k_max), ("k_init", k_init)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "every", count("every", self.every, 1))

    def init(self) -> AdaptiveState:
        """The state before the first step."""
        return AdaptiveState(
            k=jnp.int32(self.k_init), step=jnp.int32(0), cosine=jnp.float32(jnp.nan), measured_k=jnp.int32(self.k_init)
        )

    def decide(self, state: AdaptiveState, cosine: jax.Array) -> AdaptiveState:
        """The state after a measurement of ``cosine`` at ``state.k`` (pure; used by the step)."""
        grow = jnp.minimum(self.k_max, jnp.maximum(state.k + 1, 2 * state.k))
        shrink = jnp.maximum(self.k_min, state.k - 1)
        k = jnp.where(cosine < self.target, grow, jnp.where(cosine > cast(float, self.relax), shrink, state.k))
        return AdaptiveState(k=k.astype(jnp.int32), step=state.step, cosine=cosine.astype(jnp.float32), measured_k=state.k)

    def value_and_grad(
        self, fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False, **options: Any
    ) -> Callable[..., tuple[Any, AdaptiveState]]:
        """A value-and-gradient function with ``k`` from the controller's state.

        Args:
          fun: the loss, as for :func:`hbpjax.highway_value_and_grad` (or, when the differentiated
            arguments are NNX modules, :func:`hbpjax.nnx.value_and_grad`; when they hold leaves
            that are not floating-point arrays, :func:`hbpjax.filter_value_and_grad`).
          argnums: which positional arguments to differentiate, as for ``jax.value_and_grad``.
          has_aux: whether ``fun`` returns ``(value, aux)``.
          **options: other fields of :class:`hbpjax.Options` (``gamma``, ``scans``, ``tol``), or
            ``options=hbpjax.Options(...)``; ``iterations`` is the controller's.

        Returns:
          ``step(state, *args, **kwargs) -> ((value, grads), new_state)``, jit-friendly: the exact
          gradient is computed under ``lax.cond``, only on measuring steps.
        """
        nums = normalize_argnums(_NAME, argnums)
        nums = (nums,) if isinstance(nums, int) else nums

        def step(state: AdaptiveState, *args, **kwargs):
            # The same adapter as the transform for these arguments (plain, filtered, NNX); the exact
            # gradient is taken on a snapshot of their arrays, so it sees the state the step saw.
            adapter = adapters.for_arguments(args, nums)
            snapshot, rebuild = adapter.arrays(args, kwargs)
            given = dict(options)
            run = Options.given(_NAME, given.pop("options", None), {**given, "iterations": state.k})
            out = adapter.value_and_grad(fun, argnums, has_aux, options=run)(*args, **kwargs)
            grads = out[1]
            exact_fn = adapter.value_and_grad(fun, argnums, has_aux, options=dataclasses.replace(run, iterations=None, tol=None))

            def measure(snapshot):
                a, kw = rebuild(snapshot)
                cosine = _cosine(grads, exact_fn(*a, **kw)[1])
                new = self.decide(state, cosine)
                if self.log:
                    jax.debug.callback(_log, new.step, cosine, state.k, new.k)
                return new

            due = state.step % self.every == 0
            new = lax.cond(due, measure, lambda _: state, snapshot)
            return out, dataclasses.replace(new, step=state.step + 1)

        return step


def _cosine(a, b) -> jax.Array:
    leaves = lambda t: [x for x in jax.tree.leaves(t) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    dot = sum(jnp.sum(jnp.real(jnp.conj(x) * y)).astype(jnp.float32) for x, y in zip(leaves(a), leaves(b)))
    na = jnp.sqrt(sum(jnp.sum(jnp.abs(x) ** 2).astype(jnp.float32) for x in leaves(a)))
    nb = jnp.sqrt(sum(jnp.sum(jnp.abs(y) ** 2).astype(jnp.float32) for y in leaves(b)))
    return jnp.where(na * nb > 0, dot / jnp.where(na * nb > 0, na * nb, 1.0), 1.0)


def _log(step, cosine, k, new_k):
    logger.info("hbpjax.AdaptiveIterations: step %d: cosine %.5f at k=%d -> k=%d", int(step), float(cosine), int(k), int(new_k))
