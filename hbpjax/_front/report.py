"""``SweepReport``: what the backward of each converted stack did (``return_report=True``), and how
the transforms get it out of the backward.

Every stack that reports takes a slot, a ``float32[2]`` input that it ignores; its backward returns
the report as the slot's cotangent. The transform differentiates with respect to the slots too, and
their gradient is the report.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.tree_util.register_dataclass, data_fields=["sweeps", "change"], meta_fields=["sources"])
@dataclasses.dataclass(frozen=True)
class SweepReport:
    """Per converted stack, in program order: the sweeps its backward ran and how much they changed.

    A pytree of arrays (usable under ``jax.jit``, returned from a train step, logged); ``print`` it
    for a table. Stacks converted inside the block of another stack, and layer-parallel stacks, are
    not listed.

    Attributes:
      sweeps: ``int32[n]``: the sweeps each stack ran. Fewer than ``iterations`` when ``tol`` stopped
        it or the stack has ``L <= iterations`` layers (``L - 1`` sweeps are exact); ``0`` for a
        traced ``iterations <= 0`` (a negative ``k`` counts as 0).
      change: ``float32[n]``: the relative change ``|w_k - w_{k-1}| / |w_k|`` of the carry cotangents
        in the last sweep (NaN when no sweep ran): small means more sweeps would change little.
      sources: where each stack was made (``file:line``; static).

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> def loss(W, x):
      ...     return jnp.sum(jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)[0])
      >>> grads, report = hbpjax.highway_grad(loss, iterations=2, return_report=True)(0.1 * jnp.ones((8, 3, 3)), jnp.ones(3))
      >>> report.sweeps.tolist()
      [2]
    """

    sweeps: jax.Array
    change: jax.Array
    sources: tuple[str, ...] = ()

    @classmethod
    def empty(cls) -> SweepReport:
        """The report of a gradient that converted nothing (exact backprop)."""
        return cls.from_slots(jnp.zeros((0, 2)), ())

    @classmethod
    def from_slots(cls, slots: jax.Array, sources) -> SweepReport:
        """The report from the gradient with respect to the stacks' report slots."""
        slots = jnp.real(slots)
        return cls(slots[:, 0].astype(jnp.int32), slots[:, 1].astype(jnp.float32), tuple(sources))

    def __str__(self) -> str:
        if not self.sources:
            return "no converted stack"
        try:
            sweeps, change = np.asarray(self.sweeps), np.asarray(self.change)
        except Exception:  # traced: only the structure is known
            return f"SweepReport of {len(self.sources)} stacks (traced)"
        width = max(len(s) for s in self.sources)
        lines = [f"{'stack':<{width}}  sweeps  last change", "-" * width + "  ------  -----------"]
        for source, k, c in zip(self.sources, np.atleast_1d(sweeps), np.atleast_1d(change)):
            lines.append(f"{source:<{width}}  {int(k):6d}  {float(c):11.3e}")
        return "\n".join(lines)


def value_and_grad(transform, conversion, argnums, args: tuple, kwargs: dict, *, holomorphic: bool = False):
    """``transform``'s value and gradient of a converted function, and its report if asked for.

    Args:
      transform: ``transform(f, argnums) -> value_and_grad_f`` (``jax.value_and_grad`` or
        ``nnx.value_and_grad`` with the caller's other options).
      conversion: the traced function (:class:`hbpjax._analysis.conversion.Conversion` or a Flax adapter's), with
        ``options``, ``stacks`` and ``evaluate(slots, *args, **kwargs)``.
      argnums: as given to the transform (ints, or ``nnx.DiffState``).
      args, kwargs: the call's arguments.
      holomorphic: complex slots for a holomorphic gradient.

    Returns:
      ``(value, grads)``, or ``((value, grads), SweepReport)`` when the options ask for a report.
    """
    if not conversion.options.return_report:
        return transform(lambda *a, **kw: conversion.evaluate(None, *a, **kw), argnums)(*args, **kwargs)
    stacks = conversion.stacks
    slots = jnp.zeros((len(stacks), 2), jnp.complex64 if holomorphic else jnp.float32)
    several = isinstance(argnums, (tuple, list))
    nums = tuple(argnums) if several else (argnums,)
    with_slots = lambda *a: conversion.evaluate(a[-1], *a[:-1], **kwargs)
    value, grads = transform(with_slots, (*nums, len(args)))(*args, slots)
    *grads, slot_grads = grads
    grads = tuple(grads) if several else grads[0]
    return (value, grads), SweepReport.from_slots(slot_grads, [s.source for s in stacks])
