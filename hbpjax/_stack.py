"""The one description of a residual stack, and the one custom VJP built from it.

A :class:`Stack` says everything the forward, the custom VJP and the Highway-BP backward need to
know about a stack of ``L`` steps, whoever built it (:func:`hbpjax.residual_scan`, or the automatic
conversion of a ``lax.scan`` found in a user's function):

* the forward step on the *whole* carry, ``carry_i, y_i = step(carry_{i-1}, x_i, consts)``, whose
  values the forward computes exactly as written;
* the residual split on the *differentiated* carry leaves ``h`` (every floating-point leaf):
  ``z_i, yb_i = block(h_{i-1}, (x_i, s_{i-1}), consts)`` and ``h_i = residual(h_{i-1}, z_i)``, with
  ``residual`` elementwise in ``h``. ``s`` are the other carry leaves (integer counters, PRNG keys):
  state the forward computes and the block reads as per-step inputs, never differentiated;
* where the cotangent of each per-step output ``y_i`` goes: into a carry (``y_i`` *is* a new carry
  leaf, like the carries :func:`hbpjax.residual_scan` returns), into the block (``y_i`` is any other
  function of ``(h_{i-1}, x_i)``, computed by ``block`` as ``yb``), or nowhere (non-differentiable
  outputs, aux state);
* the options: length, direction, forward unrolling, the backward-only ``gamma`` and how the
  backward linearizes the layers.

:func:`hbpjax._backward.differentiate` turns a stack and a forward function into the
``jax.custom_vjp`` whose backward is Highway-BP, on one device or over a chain of devices.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
from jax import lax

from ._common import check_gamma, check_linearize

PyTree = Any

CARRY = "carry"  # y_route tag: the per-step output is a (differentiated) carry leaf
BLOCK = "block"  # y_route tag: the per-step output is computed by the block


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stack(abc.ABC):
    """A residual stack as the forward and the backward see it (see the module docstring).

    Attributes:
      length: the number of steps ``L``.
      diff: positions, in the flat list of carry leaves, of the differentiated leaves ``h``.
      carry_in_ys: per carry leaf, the index of the per-step output leaf that equals the new carry
        (the forward then saves no second copy of it), or ``None``.
      y_route: per per-step output leaf (flattened), ``(CARRY, p)`` (its cotangent joins that of
        differentiated carry leaf ``p``), ``(BLOCK, m)`` (the block's ``m``-th extra output) or
        ``None`` (no cotangent). Leaves past the end of the tuple have ``None``.
      gamma: backward-only split ``K' = (1 - gamma) K``, ``J' = J + gamma K``.
      linearize: ``"vmap"`` or ``"unroll"``.
      unroll: forward scan unrolling.
      reverse: the forward runs from the last step to the first (``lax.scan(reverse=True)``).
      name: the public function the stack came from, for error messages.
    """

    length: int
    diff: tuple[int, ...]
    carry_in_ys: tuple[int | None, ...]
    y_route: tuple[tuple[str, int] | None, ...] = ()
    gamma: float = 0.0
    linearize: str = "vmap"
    unroll: int | bool = 1
    reverse: bool = False
    name: str = "hbpjax"

    def __post_init__(self):
        object.__setattr__(self, "gamma", check_gamma(self.name, self.gamma))
        check_linearize(self.name, self.linearize)

    @property
    def state(self) -> tuple[int, ...]:
        """Positions of the carry leaves that are not differentiated."""
        return tuple(i for i in range(len(self.carry_in_ys)) if i not in self.diff)

    @property
    def block_outputs(self) -> int:
        """How many extra per-step outputs ``yb`` the block computes."""
        return sum(1 for r in self.y_route if r is not None and r[0] == BLOCK)

    @abc.abstractmethod
    def step(self, carry: list, x: PyTree, consts: tuple) -> tuple[list, PyTree]:
        """One forward step on the whole flat carry: ``(new carry leaves, per-step outputs)``."""

    @abc.abstractmethod
    def block(self, h: list, xe: tuple[PyTree, list], consts: tuple) -> tuple[PyTree, list]:
        """``(z, yb)`` from the differentiated leaves ``h``, ``xe = (x, s)`` and the shared ``consts``."""

    @abc.abstractmethod
    def residual(self, h: list, z: PyTree) -> list:
        """The new differentiated leaves, elementwise in ``h``."""


def scan_steps(stack: Stack, init: list, xs: PyTree, consts: tuple, *, length: int | None = None):
    """``(final carry, per-step outputs, extra)`` by ``lax.scan`` over ``stack.step``.

    ``extra`` holds, stacked, the carry leaves that no per-step output already holds (see
    :func:`saved_carries`); ``length`` overrides ``stack.length`` (a chunk of a layer-parallel stack).
    """
    extra = [i for i, m in enumerate(stack.carry_in_ys) if m is None]

    def body(carry, x):
        new, ys = stack.step(carry, x, consts)
        return new, (ys, [new[i] for i in extra])

    final, (ys, extra_saved) = lax.scan(
        body, init, xs, length=stack.length if length is None else length, reverse=stack.reverse,
        unroll=stack.unroll,
    )
    return final, ys, extra_saved


def saved_carries(stack: Stack, ys: PyTree, extra: list) -> list:
    """Every carry leaf after every step (stacked), for the backward, without storing a leaf twice."""
    y_leaves, extra = jax.tree.leaves(ys), iter(extra)
    return [y_leaves[m] if m is not None else next(extra) for m in stack.carry_in_ys]


def scan_forward(stack: Stack, init: list, xs: PyTree, consts: tuple):
    """``(final carry, per-step outputs, saved carries)``: the forward of a single-device stack."""
    final, ys, extra = scan_steps(stack, init, xs, consts)
    return final, ys, saved_carries(stack, ys, extra)

