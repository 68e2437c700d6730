"""The one analysis: a single walk of a traced program that builds its :class:`~.plan.Plan`.

Each equation becomes one node (:mod:`hbpjax._analysis.plan`): a scan with a residual path is
converted (and the program of its block planned in turn, where nested stacks are converted too), a
chain of residual blocks becomes one node for all its layers, a ``residual_scan``'s mark is
evaluated by its contents, a ``jit``, checkpoint, ``cond`` or exact scan whose contents convert
something is a container of their programs, and everything else is kept exact, with the reason
for each stack it holds. The walk is done once per trace; find_stacks, the warning, the sweep
report and the evaluation all read what it built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jax.extend import core

from .._front.context import EXACT_SCOPE
from .._front.options import Options, StackOptions
from . import chains as _chains
from . import findings, marks, primitives
from .info import StackInfo
from .jaxprs import sub_jaxprs
from .plan import ChainNode, Container, Converted, Exact, LayerParallel, Marked, Node, Plan, Program
from .sources import in_scope, user_source


@dataclasses.dataclass(frozen=True)
class Where:
    """Where the walk is: why nothing here is converted (``kept``), inside what stacks here are
    converted (``nested``: they give no sweep report), the mark of the ``residual_scan`` whose
    scan this is (``marked_by``), and whether kept equations here are no reason to warn."""

    kept: str | None = None
    nested: str | None = None
    marked_by: core.JaxprEqn | None = None
    silent: bool = False

    def inside(self, nested: str | None = None) -> Where:
        """Where the contents of something here are (no longer a ``residual_scan``'s own scan)."""
        return Where(self.kept, nested or self.nested, None, self.silent)

    def keep(self, reason: str, *, silent: bool = False) -> Where:
        return Where(self.kept or reason, self.nested, self.marked_by, self.silent or silent)


class Planner:
    """Builds the plan of a traced program under a transform's options (see the module docstring)."""

    def __init__(self, options: Options):
        self.options = options
        self.choose = _chooser(options.scans)
        self.auto = StackOptions(gamma=options.gamma, name=options.name)  # automatically found stacks'
        self.reporting: list[StackInfo] = []

    def plan(self, closed: core.ClosedJaxpr) -> Plan:
        program = self.program(closed.jaxpr, closed.consts, Where())
        return Plan(program=program, reporting=tuple(self.reporting), highway=self.options.highway)

    # ----------------------------------------------------------------------------- programs

    def program(self, jaxpr: core.Jaxpr, consts: Sequence, where: Where, *, outvars=None, residual=frozenset()) -> Program:
        """The program of ``jaxpr``. For a stack's block, ``outvars`` are the values the block
        computes (only what they need is evaluated) and ``residual`` the positions of the stack's
        residual equations (a chain through them is the stack's own residual path, not the block's)."""
        outvars = tuple(jaxpr.outvars if outvars is None else outvars)
        starts = self._find_chains(jaxpr, where, outvars, residual)
        owned = {i for start in starts.values() if isinstance(start, ChainNode) for i in _positions(start)}
        nodes: dict[int, Node] = {}
        rows: list[StackInfo] = []
        for i, eqn in enumerate(jaxpr.eqns):
            if i in starts:
                start = starts[i]
                rows += start.rows if isinstance(start, ChainNode) else [start]
            if i not in owned:
                nodes[i] = self.node(eqn, where)
                rows += nodes[i].rows
        chains = [s for s in starts.values() if isinstance(s, ChainNode)]
        items = _schedule(jaxpr, nodes, chains, outvars)
        if outvars != tuple(jaxpr.outvars):
            items = _needed(items, outvars)
        return Program(jaxpr=jaxpr, consts=tuple(consts), items=tuple(items), outvars=outvars, rows=tuple(rows))

    def node(self, eqn: core.JaxprEqn, where: Where) -> Node:
        """The node of one equation."""
        if in_scope(eqn, EXACT_SCOPE):
            where = where.keep("inside hbpjax.exact(): kept exact", silent=True)
        mark = marks.stack_mark(eqn)
        if mark is not None or marks.is_block(eqn):
            return self._marked(eqn, mark, where)
        if primitives.is_scan(eqn):
            return self._scan(eqn, where)
        kind = primitives.contents(eqn)
        if primitives.is_cond(eqn) or kind in (primitives.JIT, primitives.REMAT, primitives.INLINE):
            return self._container(eqn, where)
        inner = [self.program(j, (), where.keep(_kept_inside(eqn))) for j in sub_jaxprs(eqn)]
        return Exact(**_io(eqn), rows=_rows(inner), eqn=eqn, silent=where.silent)

    # -------------------------------------------------------------------------------- kinds

    def _marked(self, eqn, mark, where: Where) -> Node:
        jaxpr, consts = primitives.inner(eqn)
        if mark is not None and mark.layer_axis is not None:
            row = StackInfo(
                source=user_source(eqn), kind="residual_scan", length=mark.length, carry=(), residual=(),
                converted=where.kept is None, reason=where.kept or f"layer-parallel over mesh axis {mark.layer_axis!r}",
            )
            program = _as_traced(jaxpr, consts)  # its backward is Highway-BP already: nothing to plan
            if where.kept is not None:
                return Exact(**_io(eqn), rows=(row,), eqn=eqn, silent=where.silent)
            return LayerParallel(**_io(eqn), rows=(row,), eqn=eqn, programs=(program,))
        inside = dataclasses.replace(where.inside(), marked_by=eqn if mark is not None else None)
        program = self.program(jaxpr, consts, inside)
        return Marked(**_io(eqn), rows=program.rows, eqn=eqn, programs=(program,))

    def _scan(self, eqn, where: Where) -> Node:
        found = findings.scan(eqn, options=self.auto, marked_by=where.marked_by)
        info, stack = found.info, found.stack
        if where.kept is not None:
            info, stack = dataclasses.replace(info, converted=False, reason=where.kept), None
        elif stack is not None and not self.choose(found):
            info, stack = dataclasses.replace(info, converted=False, reason=f"not chosen by scans={self.options.scans!r}"), None
        if stack is not None:
            if where.nested is not None:
                info = dataclasses.replace(info, reason=f"{info.reason} (nested: converted within the {where.nested})")
            slot = self._slot(info, where)
            stack = self._with_block(stack, where)
            rows = (info, *stack.block_program.rows)
            return Converted(**_io(eqn), rows=rows, eqn=eqn, stack=stack, slot=slot)
        _, _, body = primitives.scan_layout(eqn)
        program = self.program(body.jaxpr, body.consts, where.inside("outer loop, which stays exact"))
        rows = (info, *program.rows)
        if program.converts:
            return Container(**_io(eqn), rows=rows, eqn=eqn, programs=(program,))
        return Exact(**_io(eqn), rows=rows, eqn=eqn, silent=where.silent or found.trivial)

    def _container(self, eqn, where: Where) -> Node:
        inside = where.inside("cond branch" if primitives.is_cond(eqn) else None)
        programs = tuple(self.program(j, c, inside) for j, c in primitives.inner_programs(eqn))
        rows = _rows(programs)
        if any(p.converts for p in programs):
            return Container(**_io(eqn), rows=rows, eqn=eqn, programs=programs)
        return Exact(**_io(eqn), rows=rows, eqn=eqn, silent=where.silent or any(p.quiet for p in programs))

    def _find_chains(self, jaxpr, where: Where, outvars, residual) -> dict[int, ChainNode | StackInfo]:
        """The chains of ``jaxpr`` (converted as nodes, or their rows) and its near misses (rows),
        by the position of their first equation."""
        if where.marked_by is not None or not self.options.highway:
            return {}
        chains, misses = _chains.find(jaxpr, outputs=outvars)
        starts: dict[int, ChainNode | StackInfo] = {}
        for chain in chains:
            if residual and not residual.isdisjoint(chain.positions):
                continue  # the enclosing stack's own residual path runs through it
            starts[chain.layer_positions[0][0]] = self._chain(chain, where)
        for miss in misses:
            if miss.joins >= 3:
                starts[miss.position] = findings.miss(miss)
        return starts

    def _chain(self, chain: _chains.Chain, where: Where) -> ChainNode | StackInfo:
        found = findings.chain(chain, options=self.auto)
        info = found.info
        if where.kept is not None and info.converted:
            return dataclasses.replace(info, converted=False, reason=where.kept)
        if found.stack is None:
            return info
        if not self.choose(found):
            return dataclasses.replace(info, converted=False, reason=f"not chosen by scans={self.options.scans!r}")
        if where.nested is not None:
            info = dataclasses.replace(info, reason=f"{info.reason} (nested: converted within the {where.nested})")
        slot = self._slot(info, where)
        stack = self._with_block(found.stack, where)
        inputs = (chain.init, *chain.shared, *(v for layer in chain.per_layer for v in layer))
        outputs = (chain.carries[-1], *(v for outs in chain.outputs for v in outs))
        return ChainNode(inputs=inputs, outputs=outputs, rows=(info, *stack.block_program.rows), chain=chain, stack=stack, slot=slot)

    # ------------------------------------------------------------------------------ helpers

    def _with_block(self, stack, where: Where):
        """``stack`` with the program of its block: what computes the values its residual reads and
        its per-step outputs, planned in turn (nested stacks in it converted, without a report)."""
        flat = stack.flat
        residual = {i for positions in stack.split.positions for i in positions}
        program = self.program(
            flat.jaxpr, flat.consts, where.inside("outer block"), outvars=(*stack.split.z, *stack.block_ys), residual=residual
        )
        return dataclasses.replace(stack, block_program=program, transform=self.options)

    def _slot(self, info: StackInfo, where: Where) -> int | None:
        """The sweep-report slot of a stack converted here: a new one at the top level, none inside
        another stack's block, a loop or a branch, or under exact backprop."""
        if where.nested is not None or not self.options.highway:
            return None
        self.reporting.append(info)
        return len(self.reporting) - 1


def _chooser(scans) -> Callable[[findings.Found], bool]:
    if scans == "auto":
        return lambda found: True
    if scans == "marked":
        return lambda found: found.marked
    return lambda found: bool(scans(found.info))


def _as_traced(jaxpr: core.Jaxpr, consts: Sequence) -> Program:
    """The program that evaluates ``jaxpr`` as traced."""
    items = tuple(Exact(**_io(eqn), rows=(), eqn=eqn) for eqn in jaxpr.eqns)
    return Program(jaxpr=jaxpr, consts=tuple(consts), items=items, outvars=tuple(jaxpr.outvars), rows=())


def _io(eqn) -> dict:
    return {"inputs": tuple(eqn.invars), "outputs": tuple(eqn.outvars)}


def _kept_inside(eqn) -> str:
    name = primitives.name(eqn)
    return f"inside {name}: kept exact (hbpjax does not rewrite what a {name} holds)"


def _rows(programs) -> tuple[StackInfo, ...]:
    return tuple(row for program in programs for row in program.rows)


def _positions(node: ChainNode) -> set[int]:
    return set(node.chain.positions)


def _schedule(jaxpr: core.Jaxpr, nodes: dict[int, Node], chains: list[ChainNode], outvars) -> list[Node]:
    """The nodes in an order that evaluates each after what it reads: the equations in program
    order, each chain just before the first node that reads what it computes (after what its own
    inputs need)."""
    if not chains:
        return [nodes[i] for i in sorted(nodes)]
    made_by = {v: c for c in chains for v in c.outputs}
    producer = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
    available = set(jaxpr.invars) | set(jaxpr.constvars)
    done: set = set()
    items: list[Node] = []

    def need(atom):
        if not isinstance(atom, core.Var) or atom in available:
            return
        if atom in made_by:
            add_chain(made_by[atom])
        elif producer.get(atom) in nodes:
            add(producer[atom])

    def add(i):
        if i in done:
            return
        done.add(i)
        for a in nodes[i].inputs:
            need(a)
        items.append(nodes[i])
        available.update(nodes[i].outputs)

    def add_chain(chain):
        if chain in done:
            return
        done.add(chain)
        for a in chain.inputs:
            need(a)
        items.append(chain)
        available.update(chain.outputs)

    for i in sorted(nodes):
        add(i)
    for v in outvars:
        need(v)
    return items


def _needed(items: list[Node], outvars) -> list[Node]:
    """The items, in order, that the values ``outvars`` depend on."""
    want = {a for a in outvars if isinstance(a, core.Var)}
    keep = []
    for node in reversed(items):
        if any(v in want for v in node.outputs):
            keep.append(node)
            want.update(a for a in node.inputs if isinstance(a, core.Var))
    return keep[::-1]
