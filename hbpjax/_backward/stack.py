"""The one description of a residual stack: what the forward, the custom VJP and the Highway-BP
backward need to know about a stack of ``L`` steps, whoever built it (:func:`hbpjax.residual_scan`,
or the conversion of a ``lax.scan`` or a chain found in a user's function):

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
* the options: length, direction, forward unrolling, and the stack's own
  :class:`~hbpjax._front.options.StackOptions` (the backward-only ``gamma``, how the backward
  linearizes the layers).

:class:`Stack` is the extension point of the backward: a new way of finding a stack is a new
subclass (:class:`hbpjax._analysis.stacks.ScanStack` for a scan step given as a jaxpr,
:class:`hbpjax._analysis.chains.ChainStack` for a chain), never a second backward.
:func:`hbpjax._backward.differentiate.differentiate` turns a stack and a forward function into the
``jax.custom_vjp`` whose backward is Highway-BP.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
from jax import lax

from .._front.options import StackOptions

PyTree = Any

CARRY = "carry"  # y_route tag: the per-step output is a (differentiated) carry leaf
BLOCK = "block"  # y_route tag: the per-step output is computed by the block


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stack(abc.ABC):
    """A residual stack as the forward and the backward see it (see the module docstring).

    Attributes:
      length: the number of steps ``L``.
      num_carry: the number of carry leaves (flat).
      diff: positions, in the flat list of carry leaves, of the differentiated leaves ``h``.
      y_route: per per-step output leaf (flattened), ``(CARRY, p)`` (its cotangent joins that of
        differentiated carry leaf ``p``), ``(BLOCK, m)`` (the block's ``m``-th extra output) or
        ``None`` (no cotangent). Leaves past the end of the tuple have ``None``.
      options: the stack's backward-only ``gamma`` and how it is linearized (checked already).
      unroll: forward scan unrolling.
      reverse: the forward runs from the last step to the first (``lax.scan(reverse=True)``).
      block_reads_carry: whether ``block`` depends on ``h`` (``J != 0``). Only then does the
        backward move any ``|K| > 1`` from the prefix scan into the sweeps; a block that ignores
        the carry (a linear diagonal recurrence) keeps ``k = 0`` exact whatever ``K`` is.
      k_within_one: whether ``|K| <= 1`` is known (from the split: ``h + z``, gates from a sigmoid,
        ReLU masks), so the backward needs no clip, and stores no raw ``K``, for it.
      k_is_one: whether ``K = 1`` exactly (every differentiated leaf's residual is ``h + ...``): the
        prefix scan is then a reverse cumulative sum and ``K`` is never computed.
      ys_read_carry: whether any per-step output the block computes depends on ``h``. Only then
        do their cotangents reach the carries (through ``J``), and the backward's first estimate
        takes a VJP of every layer; outputs of the layer's own inputs alone (the updated layer
        state ``nnx.scan`` returns per step, a per-layer auxiliary value) only reach ``xs`` and the
        shared values, in the one final VJP.
      remat: the checkpoint the user wrapped each step in (``nnx.remat``, ``jax.checkpoint``),
        kept around the block: the forward keeps what its policy saves, the backward recomputes
        the rest, ``recompute_layers`` layers at a time (``None``: no checkpoint).
    """

    length: int
    num_carry: int
    diff: tuple[int, ...]
    y_route: tuple[tuple[str, int] | None, ...] = ()
    options: StackOptions = dataclasses.field(default_factory=StackOptions)
    unroll: int | bool = 1
    reverse: bool = False
    block_reads_carry: bool = True
    k_within_one: bool = False
    k_is_one: bool = False
    ys_read_carry: bool = True
    remat: Any = None  # hbpjax._analysis.split.Remat

    @property
    def state(self) -> tuple[int, ...]:
        """Positions of the carry leaves that are not differentiated."""
        return tuple(i for i in range(self.num_carry) if i not in self.diff)

    @property
    def block_outputs(self) -> int:
        """How many extra per-step outputs ``yb`` the block computes."""
        return sum(1 for r in self.y_route if r is not None and r[0] == BLOCK)

    @property
    def ys_reach_carry(self) -> bool:
        """Whether the cotangents of the block's per-step outputs reach the carries (see
        :attr:`ys_read_carry`)."""
        return bool(self.block_outputs) and self.ys_read_carry

    @abc.abstractmethod
    def step(self, carry: list, x: PyTree, consts: tuple) -> tuple[list, PyTree]:
        """One forward step on the whole flat carry: ``(new carry leaves, per-step outputs)``."""

    @abc.abstractmethod
    def block(self, h: list, xe: tuple[PyTree, list], consts: tuple) -> tuple[PyTree, list]:
        """``(z, yb)`` from the differentiated leaves ``h``, ``xe = (x, s)`` and the shared ``consts``."""

    @abc.abstractmethod
    def residual(self, h: list, z: PyTree) -> list:
        """The new differentiated leaves, elementwise in ``h``."""

    def step_inputs(self, init: list, xs: PyTree) -> tuple[list, tuple]:
        """``(h, xe)`` of the first step, from the stack's initial carry and per-layer inputs."""
        x = [a[0] for a in jax.tree.leaves(xs)]
        return [init[i] for i in self.diff], (x, [init[i] for i in self.state])

    def layer_inputs(self, xs: PyTree) -> PyTree:
        """The per-layer inputs as the backward reads them, stacked on a leading layer axis (a
        scan's ``xs`` are already)."""
        return xs

    def layer_cotangents(self, ct_xs: PyTree) -> PyTree:
        """The cotangents of the per-layer inputs, laid out as :meth:`layer_inputs` received them."""
        return ct_xs

    def path(self, h: list, xe, consts: tuple):
        """The block path of a layer: ``((new leaves, yb), z)`` whose Jacobian in ``h`` is ``J``.

        The block, then the residual with its own ``h`` held fixed: one VJP of it takes the
        cotangent of the layer's output to ``J^T`` of it (``K``, the residual's own dependence on
        ``h``, is the prefix scan's). ``z`` is returned as an auxiliary value, for ``K``.
        """
        z, yb = self.block(h, xe, consts)
        return (self.residual([lax.stop_gradient(a) for a in h], z), yb), z
