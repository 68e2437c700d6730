"""Where a stack's backward runs: the placements of its layers.

Everything the Highway-BP backward exchanges across the boundary of the layers it holds goes
through a :class:`Placement`: :class:`OneDevice` for a whole stack on one device, or
:class:`OnMeshAxis` for a stack whose layers are split in contiguous chunks over a mesh axis (inside
``shard_map``). Neighbouring chunks exchange one carry-sized value per sweep and join the prefix
scan with one gather of per-device summaries, so the backward holds no loop over layers or
devices. A new way of placing a stack (over hosts, in pipeline stages) is a new placement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from .prefix import prepare_jitted as _prepare
from .prefix import solve_jitted as _solve

PyTree = Any

tmap = jax.tree.map


class Placement(Protocol):
    """Where this stack (or this chunk of it) sits: what comes before and after it.

    The extension point of the backward: a new way of splitting a stack (over devices, over hosts,
    in pipeline stages) is a new placement. Per-layer quantities are pytrees of arrays with a leading
    axis over this chunk's layers.
    """

    def total_length(self, local_length: int) -> int:
        """The number of layers of the whole stack, given this chunk's."""

    def from_next(self, first: PyTree) -> PyTree:
        """The next chunk's value of a per-layer quantity at its first layer (zeros past the end)."""

    def from_previous(self, last: PyTree) -> PyTree:
        """The previous chunk's value of a per-layer quantity at its last layer (zeros before the
        first chunk)."""

    def on_last(self, x: PyTree) -> PyTree:
        """``x`` where this chunk ends the stack, zeros elsewhere, for ``x`` the cotangent of a
        replicated value (the final carry's)."""

    def only_last(self, x: PyTree) -> PyTree:
        """This chunk's own ``x`` where it ends the stack, zeros elsewhere."""

    def solver(self, prepared: PyTree, k: PyTree) -> Callable[[PyTree], PyTree]:
        """``solve(u) -> y`` for ``y[j] = u[j] + k[j] * y[j + 1]`` over the whole stack (``y`` past
        this chunk's end is the next chunk's ``y[0]``), given this chunk's ``k`` and its plan
        ``_prefix.prepare(k)``."""

    def constant_k_solver(self, discount: float) -> Callable[[PyTree], PyTree] | None:
        """``solve(u)`` for a constant ``k = discount`` (the residual path ``h + z``, ``K = 1``, with
        ``discount = 1 - gamma``) if this placement has one that needs no preparation, else ``None``."""

    def reduce_first(self, x: PyTree) -> PyTree:
        """The cotangent of the initial carry from this chunk's (only the first chunk's counts)."""

    def reduce_shared(self, x: PyTree) -> PyTree:
        """This chunk's contribution to the cotangent of a value shared by all layers."""

    def total(self, x: jax.Array) -> jax.Array:
        """A scalar summed over all chunks (norms)."""


class OneDevice:
    """The whole stack is here: nothing before it but ``init``, nothing after it."""

    def total_length(self, local_length: int) -> int:
        return local_length

    def from_next(self, first):
        """The next chunk's first value of a per-layer quantity (zero past the end)."""
        return tmap(jnp.zeros_like, first)

    def from_previous(self, last):
        """The previous chunk's last value of a per-layer quantity (zero before the start)."""
        return tmap(jnp.zeros_like, last)

    def on_last(self, x):
        """``x`` where this chunk ends the stack, zero elsewhere."""
        return x

    def only_last(self, x):
        """This chunk's ``x`` where it ends the stack, zero elsewhere."""
        return x

    def solver(self, prepared, k):
        return lambda u: _solve(prepared, u)

    def constant_k_solver(self, discount):
        """A reverse cumulative sum (``discount = 1``) or, for ``gamma > 0``, its discounted form.

        The sum is an associative scan (``2 log2 L`` levels of adds), not ``lax.cumsum``: on a CPU
        XLA lowers that to a reduce-window doing ``O(L^2)`` adds per element (3-5x slower at
        L = 16 to 16384; 7 ms of an 80 ms pre-activation ResNet step at k = 0).
        """
        if discount == 1.0:
            return lambda u: tmap(lambda a: lax.associative_scan(jnp.add, a, reverse=True, axis=0), u)
        return lambda u: _solve(_prepare(tmap(lambda a: jnp.full_like(a, discount), u)), u)

    def reduce_first(self, x):
        """The cotangent of ``init``: only the chunk holding layer 1 contributes."""
        return x

    def reduce_shared(self, x):
        """This chunk's contribution to the cotangent of a shared (replicated) value."""
        return x

    def total(self, x):
        """A sum over all chunks (norms)."""
        return x


class OnMeshAxis:
    """This chunk is one of ``size`` contiguous chunks along the manual mesh axis ``axis``."""

    def __init__(self, axis: str, size: int):
        self.axis, self.size = axis, size
        self.index = lax.axis_index(axis)

    def total_length(self, local_length):
        return local_length * self.size

    def _shift(self, x, step):
        pairs = [(i, i + step) for i in range(self.size) if 0 <= i + step < self.size]
        return tmap(lambda a: lax.ppermute(a, self.axis, perm=pairs), x)

    def from_next(self, first):
        return self._shift(first, -1)  # the last chunk receives zeros

    def from_previous(self, last):
        return self._shift(last, +1)  # the first chunk receives zeros

    def on_last(self, x):
        # The cotangent of a replicated output reaches the devices in parts (shard_map splits it);
        # their sum is the whole cotangent, which belongs to the chunk that computed the output.
        return self.only_last(tmap(lambda a: lax.psum(a, self.axis), x))

    def only_last(self, x):
        return tmap(lambda a: jnp.where(self.index == self.size - 1, a, jnp.zeros_like(a)), x)

    def solver(self, prepared, k):
        # Within the chunk w = w_local + P * W_next, where W_next is w at the first layer of the next
        # chunk and P[j] = prod_{m >= j} k[m] (k only: computed once per backward).
        last_only = tmap(lambda a: jnp.zeros_like(a).at[-1].set(a[-1]), k)
        P = _solve(prepared, last_only)
        A_all = self._gather(tmap(lambda p: p[0], P))  # each chunk's transfer coefficient
        A_plan = _prepare(A_all)

        def solve(u):
            w_local = _solve(prepared, u)
            b_all = self._gather(tmap(lambda w: w[0], w_local))
            # The scan over the chunks' summaries: w_first[c] = b[c] + A[c] * w_first[c + 1].
            w_first = _solve(A_plan, b_all)
            w_next = tmap(
                lambda wf: lax.dynamic_index_in_dim(
                    jnp.concatenate([wf[1:], jnp.zeros_like(wf[:1])]), self.index, keepdims=False
                ),
                w_first,
            )
            return tmap(lambda wl, p, wn: wl + p * wn[None], w_local, P, w_next)

        return solve

    def constant_k_solver(self, discount):
        return None  # the chunks' transfer coefficients are per device: the general solver

    def _gather(self, x):
        """Every chunk's ``x`` stacked on a new leading axis, on every device (one collective).

        A psum of one-hot rows rather than ``all_gather``, whose result can carry an explicit data
        sharding on the new axis under a partially manual shard_map.
        """

        def one(a):
            mine = (jnp.arange(self.size) == self.index).reshape((self.size,) + (1,) * a.ndim)
            return lax.psum(jnp.where(mine, a[None], jnp.zeros_like(a)[None]), self.axis)

        return tmap(one, x)

    # Inside shard_map(check_vma=False) the cotangent of a replicated input is summed over the
    # devices by shard_map itself: each chunk returns its own contribution.
    def reduce_first(self, x):
        return tmap(lambda a: jnp.where(self.index == 0, a, jnp.zeros_like(a)), x)

    def reduce_shared(self, x):
        return x

    def total(self, x):
        return lax.psum(x, self.axis)
