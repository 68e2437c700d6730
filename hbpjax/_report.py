"""``SweepReport``: what the backward of each converted stack did (``return_report=True``)."""

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
    """

    sweeps: jax.Array
    change: jax.Array
    sources: tuple[str, ...] = ()

    @classmethod
    def from_slots(cls, slots: jax.Array, sources) -> "SweepReport":
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
