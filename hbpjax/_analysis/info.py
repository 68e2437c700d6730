"""What the analysis says of each stack it finds: :class:`StackInfo` rows, the table
:func:`hbpjax.find_stacks` prints, and the warning when nothing is converted."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax


class NoStackWarning(UserWarning):
    """``highway_grad`` found no residual stack to convert: the gradient is plain backprop.

    Call :func:`hbpjax.find_stacks` on the same function and arguments to see every scan and why
    it was not converted. Warned once per trace; filter it as any warning.

    Examples:
      >>> import warnings, jax, jax.numpy as jnp, hbpjax
      >>> loss = lambda w, x: jnp.sum(jnp.tanh(x @ w))          # no scan: nothing to convert
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     _ = hbpjax.highway_grad(loss)(jnp.ones((3, 3)), jnp.ones(3))
      >>> [w.category.__name__ for w in caught]
      ['NoStackWarning']
    """


@dataclasses.dataclass(frozen=True)
class StackInfo:
    """What :func:`hbpjax.find_stacks` found about one scan (or one chain of blocks in a Python loop).

    Attributes:
      source: ``file:line`` in your code that made the scan.
      kind: ``"scan"`` (a ``lax.scan``, ``fori_loop``, ``nnx.scan``, ``nnx.RNN``, ...),
        ``"residual_scan"`` (:func:`hbpjax.residual_scan` or an hbpjax Flax module) or
        ``"chain"`` (residual blocks written one after the other: a Python loop of layers).
      length: the number of steps (layers, time steps; for a chain, groups of ``period`` blocks).
      carry: shape and dtype of every carry leaf.
      residual: per carry leaf, ``"identity"`` (``h + ...``, ``K = 1``), ``"diagonal"`` (an
        elementwise residual path such as a gate or a ReLU) or ``"none"`` (no residual path, or
        not floating point).
      converted: whether ``highway_grad`` runs this stack's backward as Highway-BP.
      reason: why (or why not), in words.
      period: for a chain, how many different blocks repeat as one layer (attention then MLP: 2).
      last_source: for a chain, ``file:line`` of its last layer (``source`` is its first's).

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> def loss(W, x):
      ...     return jnp.sum(jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)[0])
      >>> (info,) = hbpjax.find_stacks(loss, jnp.ones((8, 3, 3)), jnp.ones(3))
      >>> info.kind, info.length, info.residual, info.converted
      ('scan', 8, ('identity',), True)
    """

    source: str
    kind: str
    length: int
    carry: tuple
    residual: tuple[str, ...]
    converted: bool
    reason: str
    period: int = 1
    last_source: str = ""

    def __str__(self) -> str:
        return _table([self])


class Stacks(list):
    """The list :func:`hbpjax.find_stacks` returns: ``print`` it for a table."""

    def __str__(self) -> str:
        return _table(self)


def _table(infos: Sequence[StackInfo]) -> str:
    if not infos:
        return "no scans found"
    rows = [("source", "kind", "L", "carry", "residual", "converted", "reason")]
    for info in infos:
        carry = ", ".join(f"{jax.numpy.dtype(c.dtype).name}{list(c.shape)}" for c in info.carry) or "-"
        rows.append(
            (info.source, info.kind, str(info.length), carry, ", ".join(info.residual) or "-",
             "yes" if info.converted else "no", info.reason)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(rows[0][-1]))
    return "\n".join(line.rstrip() for line in lines)
