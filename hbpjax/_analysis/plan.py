"""The plan: what the one analysis of a traced program found, as an immutable tree.

:mod:`hbpjax._analysis.planner` walks a traced program once and describes every equation by a node
of one of a few kinds: kept :class:`Exact` (evaluated as traced), a scan :class:`Converted` into a
Highway-BP stack, a :class:`ChainNode` of residual blocks written one after the other, a
:class:`Marked` ``residual_scan``, a :class:`LayerParallel` ``residual_scan`` (Highway-BP inside
already), and a :class:`Container` (a ``jit``, a checkpoint, the branches of a ``cond``, a scan
that stays exact) whose contents hold converted stacks. A :class:`Program` lists a jaxpr's nodes in
the order they are evaluated.

The plan is the single source of truth: :func:`hbpjax.find_stacks` prints its rows, the
:class:`hbpjax.NoStackWarning` reads them, a converted node's report slot is its position among the
plan's converted stacks, and :mod:`hbpjax._analysis.evaluate` runs it with one rule per node kind.
Nodes hold the equations they stand for; nothing is looked up again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from jax.extend import core

from .info import StackInfo

Atom = Any


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Node:
    """One step of a program: what it reads, what it computes, what :func:`hbpjax.find_stacks`
    says of it (its own row, then those of what it holds, in program order), and the programs it
    evaluates by their contents."""

    inputs: tuple
    outputs: tuple
    rows: tuple[StackInfo, ...]
    programs: tuple[Program, ...] = ()

    @property
    def converts(self) -> bool:
        """Whether evaluating it runs any stack's backward as Highway-BP."""
        return any(p.converts for p in self.programs)

    @property
    def quiet(self) -> bool:
        """Whether it is a reason not to warn that nothing was converted."""
        return any(p.quiet for p in self.programs)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Exact(Node):
    """An equation evaluated as traced (its derivative is JAX's own). ``rows`` say why each stack it
    holds is not converted; ``silent``: a ``residual_scan`` of length 0 or 1, or an equation inside
    :func:`hbpjax.exact` (nothing to warn about)."""

    eqn: core.JaxprEqn
    silent: bool = False

    @property
    def quiet(self) -> bool:
        return self.silent


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class StackNode(Node):
    """A stack run as Highway-BP: ``stack``; ``slot`` is its position in the sweep report (``None``
    inside another stack's block, a loop or a branch)."""

    stack: Any  # hbpjax._backward.stack.Stack
    slot: int | None

    @property
    def converts(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Converted(StackNode):
    """A scan equation run as a :class:`~hbpjax._analysis.stacks.ScanStack`; ``micro``: with
    ``microbatches``, the same scan's stack traced on one microbatch (:func:`with_microbatch_stacks`)."""

    eqn: core.JaxprEqn
    micro: Any = None


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ChainNode(StackNode):
    """Residual blocks written one after the other (:class:`hbpjax._analysis.chains.Chain`), run
    as a :class:`~hbpjax._analysis.chains.ChainStack`. Reads ``[h_0, *shared, *every layer's
    inputs]``; computes ``[h_L, *every layer's outputs]``."""

    chain: Any  # hbpjax._analysis.chains.Chain


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Marked(Node):
    """A ``residual_scan``'s mark (of its scan, or of its block), evaluated by its contents, its one
    program: a marked scan is converted with the ``residual_scan``'s own options."""

    eqn: core.JaxprEqn


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class LayerParallel(Node):
    """A ``residual_scan`` split over a mesh axis: its backward was built as Highway-BP when it was
    traced; evaluated by its contents as traced."""

    eqn: core.JaxprEqn

    @property
    def converts(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Container(Node):
    """A ``jit``, checkpoint or plain call, a ``cond`` or a scan that stays exact, evaluated by its
    contents (:func:`hbpjax._analysis.evaluate.by_contents`), which hold converted stacks:
    ``programs`` are its inner programs in the order the primitive lists them."""

    eqn: core.JaxprEqn


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Program:
    """A jaxpr's plan: its nodes in evaluation order.

    Attributes:
      jaxpr: the jaxpr.
      consts: the values of its constants.
      items: the nodes, in an order that evaluates each after what it reads.
      outvars: what evaluating it returns (the jaxpr's outputs, or for a stack's block the values
        the block computes; then ``items`` are only those these need).
      rows: what :func:`hbpjax.find_stacks` says of it, in program order.
      converts: whether any of its nodes converts a stack.
      quiet: whether any of its nodes is a reason not to warn that nothing was converted.
    """

    jaxpr: core.Jaxpr
    consts: Sequence
    items: tuple[Node, ...]
    outvars: tuple
    rows: tuple[StackInfo, ...]
    converts: bool = dataclasses.field(init=False)
    quiet: bool = dataclasses.field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "converts", any(node.converts for node in self.items))
        object.__setattr__(self, "quiet", any(node.quiet for node in self.items))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Plan:
    """The plan of a traced function.

    Attributes:
      program: the function's program.
      reporting: the converted stacks that give a sweep report, by slot.
      highway: whether the stacks' backward is Highway-BP (``iterations`` is not ``None``).
    """

    program: Program
    reporting: tuple[StackInfo, ...]
    highway: bool

    @property
    def none_converted(self) -> bool:
        """Whether a :class:`hbpjax.NoStackWarning` is due: Highway-BP asked for, no stack converted,
        and no ``residual_scan`` of length 0 or 1 or :func:`hbpjax.exact` region that explains it."""
        return self.highway and not self.program.converts and not self.program.quiet


def scans(program: Program) -> Iterator[Converted]:
    """The converted scans of ``program`` and of the programs its nodes hold, in program order."""
    for node in program.items:
        if isinstance(node, Converted):
            yield node
        for inner in node.programs:
            yield from scans(inner)


def with_microbatch_stacks(plan: Plan, stacks: Sequence) -> Plan:
    """``plan`` with its converted scans, in the order of :func:`scans`, given ``stacks`` as their
    ``micro`` stacks (the same function traced on one microbatch)."""
    given = iter(stacks)

    def attach(program: Program) -> Program:
        items = []
        for node in program.items:
            micro = {"micro": next(given)} if isinstance(node, Converted) else {}
            inner = tuple(attach(p) for p in node.programs)
            items.append(dataclasses.replace(node, programs=inner, **micro))
        return dataclasses.replace(program, items=tuple(items))

    return dataclasses.replace(plan, program=attach(plan.program))
