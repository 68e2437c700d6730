"""Stacks in straight-line code: residual blocks written one after the other (a Python loop of
layers), found in a jaxpr and described as the steps of a scan.

A Python loop of residual blocks traces to the blocks' equations written out one after the other.
What threads them is a float value, the *spine* ``h_0 -> h_1 -> ...``: each ``h_i`` is an
elementwise function of ``h_{i-1}`` (a residual path, :mod:`hbpjax._analysis.split`) that also reads values
the block computed from ``h_{i-1}`` (a *join*: ``h + f(h)``, ``relu(h + f(h))``, a gate, the mean
and variance of a post-LN ``LayerNorm``). Between two consecutive joins lies a *segment*: the
equations that depend on the earlier join and that the later one needs. Consecutive segments that
are the same program up to renaming (primitives, parameters, shapes, dtypes, wiring) form a chain;
a pattern of ``p`` different segments repeated (attention then MLP sublayers, or gemma's local then
global layers) forms a chain of groups of ``p``. A shape change ends a chain.

A chain is converted as the scan it would be: the first group's equations become the step of a
scan (:func:`hbpjax._analysis.stacks.scan_stack`) over the per-layer inputs (each layer's weights, random
bits, anything only it reads), with the values every layer reads alike as shared inputs and the
values used outside the chain as per-step outputs. The forward still evaluates the user's
equations, bit for bit, and only the backward stacks the per-layer inputs on a new axis.

Conservative by construction: anything that is not a clean chain (a layer reading another
layer's values other than through the spine, an input shared by some layers but not all, layers
that differ) is left alone, and :func:`find` says why.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from . import dedup, primitives
from . import jaxprs as _jaxpr
from . import split as _split
from .jaxprs import is_float
from .stacks import ScanStack

#: The most that stacking a chain's per-layer inputs for the backward may take (bytes); a larger
#: chain is left to backprop, and said so.
STACK_LIMIT = 2**31
#: The longest repeating pattern of different layers looked for (gemma alternates 2 kinds).
MAX_PERIOD = 8


@dataclasses.dataclass(eq=False)
class Chain:
    """A chain of ``length`` groups of ``period`` residual segments found in a jaxpr.

    Attributes:
      init: the value entering the first group (``h_0``).
      carries: the value leaving each group (``h_1 .. h_L``).
      layers: per group, its equations in program order.
      shared: the values every group reads alike (the scan's consts).
      per_layer: per group, the values only it reads, in the order the step reads them.
      outputs: per group, the values of its equations used outside the chain, in one order.
      body: the first group as a scan step ``(shared, h, per_layer) -> (h_next, outputs)``.
      period, length: ``p`` and ``L``.
      layer_positions: per group, the positions of its equations in the jaxpr.
    """

    init: core.Var
    carries: list
    layers: list
    shared: list
    per_layer: list
    outputs: list
    body: Any
    period: int
    length: int
    layer_positions: list

    @property
    def positions(self) -> list[int]:
        """The positions of the chain's equations in the jaxpr it was found in."""
        return [i for layer in self.layer_positions for i in layer]

    def stacked_bytes(self) -> int:
        """What stacking the per-layer inputs for the backward takes."""
        return sum(int(np.prod(v.aval.shape)) * jnp.dtype(v.aval.dtype).itemsize * self.length for v in self.per_layer[0])

    def forward(self, stack: ScanStack, init: list, xs: list, consts: tuple, *, eval_eqn=_jaxpr.bind, lin=None):
        """``(final, ys, saved, linearization)`` as :func:`hbpjax._analysis.forward.scan_forward` gives them,
        from the user's own equations, layer by layer: ``xs`` is the list of every layer's inputs."""
        h = init[0]
        saved, ys, values = [], [], []
        hoisted = lin.hoisted(consts) if lin is not None else []

        def run(h, inputs, consts, layer):
            env = dict(zip(self.shared, consts))
            env[self.init if layer == 0 else self.carries[layer - 1]] = h
            env.update(zip(self.per_layer[layer], inputs))
            for eqn in self.layers[layer]:
                env.update(zip(eqn.outvars, eval_eqn(eqn, [_jaxpr.read(env, a) for a in eqn.invars])))
            return env[self.carries[layer]], [env[v] for v in self.outputs[layer]]

        if lin is not None:
            # The linearization repeats the layer's equations: both traced once, the repeats
            # removed, and that program run on every layer (the layers are the same program).
            with_values = dedup.traced_once(
                lambda h, inputs, consts: (*run(h, inputs, consts, 0), lin.step([h], (inputs, []), consts)),
                h, list(xs[0]), consts,
            )
        for layer, inputs in enumerate(xs):
            saved.append(h)
            if lin is None:
                h, y = run(h, inputs, consts, layer)
            else:
                h, y, v = with_values(h, list(inputs), consts)
                values.append(v)
            ys.append(y)
        stack_columns = lambda rows: [jnp.stack(column) for column in zip(*rows)] if rows and rows[0] else []
        linearization = None if lin is None else (stack_columns(values), hoisted)
        return [h], stack_columns(ys), [jnp.stack(saved)], linearization


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChainStack(ScanStack):
    """The stack of a :class:`Chain`: a scan step (its first group) whose per-layer inputs arrive
    as one list per layer (the forward reads them where they are) and are stacked for the backward."""

    def step_inputs(self, init, xs):
        return [init[0]], (list(xs[0]), [])

    def layer_inputs(self, xs):
        return [jnp.stack(column) for column in zip(*xs)]

    def layer_cotangents(self, ct_xs):
        return [[None if c is None else c[i] for c in ct_xs] for i in range(self.length)]


@dataclasses.dataclass
class Miss:
    """A spine of residual blocks that is not converted, and why."""

    first: core.JaxprEqn
    joins: int
    reason: str
    position: int  # of ``first`` in the jaxpr


# ---------------------------------------------------------------------------------------- finding


def find(jaxpr: core.Jaxpr, *, outputs: Sequence | None = None) -> tuple[list[Chain], list[Miss]]:
    """The chains of ``jaxpr`` (its own equations; what calls and loops hold is another jaxpr's)
    and the spines of residual blocks that are not chains, with the reason. ``outputs`` are the
    values read after ``jaxpr`` (default: its outputs): a chain returns those it computes."""
    graph = _Graph(jaxpr, jaxpr.outvars if outputs is None else outputs)
    chains, misses = [], []
    for spine in graph.spines():
        joins = [n for n in spine[1:] if graph.kind[n] == "join"]
        if len(joins) < 2:
            continue
        # A segment runs from what a join reads on the spine to what the next join reads (or the
        # spine's end): the steps between a join and the next (a ReLU after the add) stay with the
        # join before them, and whatever precedes the first join (a position embedding) stays out.
        # The last segment ends at the last join or at one of the steps after it (a ReLU after the
        # add belongs to the layer, a loss's sin does not): the end that repeats the most wins.
        starts = [graph.pred[j] for j in joins]
        segments = [graph.segment(a, b) for a, b in itertools.pairwise(starts)]
        keys = [graph.key(segment, start) for segment, start in zip(segments, starts)]
        best: tuple | None = None
        for end in spine[spine.index(joins[-1]):]:
            last = graph.segment(starts[-1], end)
            candidate = (segments + [last], keys + [graph.key(last, starts[-1])], starts + [end])
            runs = _runs([k[0] for k in candidate[1]])
            covered = sum(p * g for _, p, g in runs)
            if best is None or covered > best[0]:
                best = (covered, runs, candidate)
        assert best is not None  # the spine holds the last join: one candidate at least
        _, found, (segments, keys, boundaries) = best
        if not found:
            misses.append(Miss(segments[0][0], len(joins), _difference(keys, segments), graph.order[segments[0][0]]))
            continue
        for start, period, groups in found:
            chain, reason = graph.chain(boundaries, start, period, groups)
            if chain is None:
                misses.append(Miss(segments[start][0], len(joins), reason, graph.order[segments[start][0]]))
            else:
                chains.append(chain)
    return chains, misses


def _runs(keys: Sequence) -> list[tuple[int, int, int]]:
    """``(start, period, groups)`` of the repeating runs of ``keys``: groups of ``period`` segments,
    two groups or more, the longest cover first, then the shortest period."""
    found, a = [], 0
    while a < len(keys):
        best = None
        for p in range(1, MAX_PERIOD + 1):
            b = a
            while b + p < len(keys) and keys[b] == keys[b + p]:
                b += 1
            groups = (b - a + p) // p
            if groups >= 2 and (best is None or groups * p > best[2] * best[1]):
                best = (a, p, groups)
        if best is None:
            a += 1
            continue
        found.append(best)
        a = best[0] + best[1] * best[2]
    return found


def _difference(keys, segments) -> str:
    """How the first two segments of a spine that repeat nothing differ."""
    if len(keys) < 2:
        return "a single residual block"
    a, b = keys[0][0], keys[1][0]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            eqn_a, eqn_b = segments[0][i], segments[1][i]
            return (
                f"{len(keys)} residual blocks, no two consecutive alike: the second differs from the first at "
                f"its equation {i} ({_describe(eqn_b)} against {_describe(eqn_a)}): left to backprop"
            )
    return f"{len(keys)} residual blocks, no two consecutive alike ({len(a)} against {len(b)} equations): left to backprop"


def _describe(eqn) -> str:
    shapes = ", ".join(str(v.aval) for v in eqn.outvars)
    return f"{primitives.name(eqn)} -> {shapes}"


class _Graph:
    """Who depends on whom in one jaxpr, and its residual links."""

    def __init__(self, jaxpr, outputs):
        self.jaxpr = jaxpr
        self.bit: dict = {}
        self.anc: dict = {}  # var -> bitmask of the vars it is computed from (itself included)
        self.producer: dict = {}
        for var in jaxpr.invars + jaxpr.constvars:
            self._add(var, 0)
        for eqn in jaxpr.eqns:
            deps = 0
            for a in eqn.invars:
                if isinstance(a, core.Var):
                    deps |= self.anc.get(a, 0)
            for v in eqn.outvars:
                self._add(v, deps)
                self.producer[v] = eqn
        self.order = {e: i for i, e in enumerate(jaxpr.eqns)}
        self.used_outside = {v for v in outputs if isinstance(v, core.Var)}
        self.kind, self.pred = {}, {}
        for eqn in jaxpr.eqns:
            self._link(eqn)
        self._jaxpr_texts: dict = {}

    def _add(self, var, deps):
        self.bit[var] = 1 << len(self.bit)
        self.anc[var] = deps | self.bit[var]

    def depends(self, v, on) -> bool:
        return isinstance(v, core.Var) and bool(self.anc.get(v, 0) & self.bit[on])

    def _link(self, eqn):
        """Marks ``eqn``'s output a join (or an elementwise step) of the value it is diagonal in."""
        if primitives.is_loop_or_branch(eqn):
            return
        whole = _whole_layer(eqn)
        if whole is not None:  # a layer under jax.checkpoint (nnx.remat, nn.remat) or jit, residual add inside
            out, a = whole
            self.kind[out], self.pred[out] = "join", a
            return
        if len(eqn.outvars) != 1 or not is_float(eqn.outvars[0].aval):
            return
        out = eqn.outvars[0]
        spine = [
            a for a in eqn.invars
            if isinstance(a, core.Var) and a.aval.shape == out.aval.shape and a.aval.dtype == out.aval.dtype
            and _split.elementwise_in(eqn, a)
        ]
        # Of several candidates, the one the others are computed from (h in h + f(h)).
        spine = [a for a in spine if all(b is a or self.depends(b, a) for b in spine)]
        if len(spine) != 1:
            return
        (a,) = spine
        others = [b for b in eqn.invars if b is not a]
        self.kind[out] = "join" if any(self.depends(b, a) for b in others) else "step"
        self.pred[out] = a

    def spines(self) -> list[list]:
        """The longest paths of links, longest first: ``[h_0, n_1, n_2, ...]``."""
        children: dict = {}
        for node, parent in self.pred.items():
            children.setdefault(parent, []).append(node)
        height: dict = {}
        for node in sorted(self.pred, key=lambda v: -self.order.get(self.producer[v], 0)):
            height[node] = 1 + max((height.get(c, 1) for c in children.get(node, ())), default=0)
        taken, out = set(), []
        roots = [v for v in children if v not in self.pred]
        starts = sorted(roots, key=lambda v: -max(height.get(c, 1) for c in children[v]))
        for root in starts:
            node, path = root, [root]
            while True:
                nxt = [c for c in children.get(node, ()) if c not in taken]
                if not nxt:
                    break
                # A link inside another's block (a LayerNorm's h - mean(h), read by the block that
                # h + block(h) adds) is not the stream's continuation, however long its tail.
                outer = [c for c in nxt if not any(d is not c and self._inside(c, d, node) for d in nxt)]
                node = max(outer or nxt, key=lambda c: height.get(c, 1))
                taken.add(node)
                path.append(node)
            if len(path) > 2:
                out.append(path)
        return out

    def _inside(self, c, d, parent) -> bool:
        """Whether link ``c`` lies in the block of link ``d``: ``d`` reads, besides ``parent``, a
        value computed from ``c``."""
        eqn = self.producer[d]
        return any(isinstance(b, core.Var) and b is not parent and self.depends(b, c) for b in eqn.invars)

    def segment(self, a, b) -> list:
        """The equations that depend on ``a`` and that ``b`` needs (``b``'s own included), in order."""
        need = self.anc[b]
        return [
            e for e in self.jaxpr.eqns
            if any(self.bit[v] & need for v in e.outvars) and a not in e.outvars and any(self.depends(v, a) for v in e.outvars)
        ]

    def key(self, eqns: list, start) -> tuple:
        """``(program, external)``: the segment's program up to renaming, and the values it reads
        from outside (in the order it first reads them)."""
        local: dict = {start: ("h",)}
        external: list = []
        program = []
        for i, eqn in enumerate(eqns):
            refs: list[tuple] = []
            for a in eqn.invars:
                if isinstance(a, core.Literal):
                    refs.append(primitives.literal_key(a))
                elif a in local:
                    refs.append(local[a])
                else:
                    if a not in external:
                        external.append(a)
                    refs.append(("x", external.index(a), str(a.aval)))
            for j, v in enumerate(eqn.outvars):
                local[v] = ("v", i, j)
            params = primitives.params_key(eqn, self._jaxpr_texts)
            program.append((eqn.primitive, params, tuple(refs), tuple(str(v.aval) for v in eqn.outvars)))
        return tuple(program), external

    def chain(self, boundaries, start, period, groups):
        """The :class:`Chain` of ``groups`` groups of ``period`` segments from segment ``start``, or
        ``(None, why not)``."""
        init = boundaries[start]
        carries = [boundaries[start + (g + 1) * period] for g in range(groups)]
        starts = [init, *carries[:-1]]
        layers = [self.segment(a, b) for a, b in zip(starts, carries)]
        keys = [self.key(eqns, h) for eqns, h in zip(layers, starts)]
        if any(k[0] != keys[0][0] for k in keys):
            return None, "its layers differ once grouped (one reads a value of another): left to backprop"
        chain_values = 0
        for eqns in layers:
            for e in eqns:
                for v in e.outvars:
                    chain_values |= self.bit[v]
        shared, per_layer = [], []
        for column in zip(*[k[1] for k in keys]):
            reader = next((i for i, v in enumerate(column) if self.anc[v] & chain_values), None)
            if reader is not None:
                return None, f"layer {reader + 1} reads a value another layer computed, not through the residual stream: left to backprop"
            if all(v is column[0] for v in column):
                shared.append(column[0])
            elif len(set(column)) == len(column):
                per_layer.append(column)
            else:
                first = next(i for i in range(len(column)) if any(column[j] is column[i] for j in range(i)))
                return None, f"layer {first + 1} reads an input that another layer reads too, but not every layer does: left to backprop"
        per_layer = [[column[g] for column in per_layer] for g in range(groups)]
        owned = {self.order[e] for eqns in layers for e in eqns}
        final = carries[-1]  # the chain's final value, returned as such
        union = sorted({
            where for eqns in layers for where in _positions(eqns, [
                v for e in eqns for v in e.outvars
                if v is not final and (v in self.used_outside or self._used_by_others(v, owned))
            ])
        })
        outputs = [[eqns[i].outvars[j] for i, j in union] for eqns in layers]
        body = _body(layers[0], init, carries[0], shared, per_layer[0], outputs[0])
        positions = [[self.order[e] for e in eqns] for eqns in layers]
        return Chain(init, carries, layers, shared, per_layer, outputs, body, period, groups, positions), None

    def _used_by_others(self, v, owned) -> bool:
        users: dict[Any, list] | None = getattr(self, "_users", None)
        if users is None:
            users = {}
            self._users = users
            for e in self.jaxpr.eqns:
                for a in e.invars:
                    if isinstance(a, core.Var):
                        users.setdefault(a, []).append(e)
        return any(self.order[e] not in owned for e in users.get(v, ()))


def _same_type(x, y) -> bool:
    return getattr(x, "shape", None) == getattr(y, "shape", ()) and getattr(x, "dtype", None) == getattr(y, "dtype", ())


def _whole_layer(eqn) -> tuple | None:
    """``(h_new, h)`` when ``eqn`` is a checkpoint or a plain call that computes ``h_new`` from its
    operand ``h`` (same shape and dtype) through a residual path inside, with a block that reads
    ``h`` (a whole residual layer, ``h + f(h)``, wrapped by ``jax.checkpoint`` or ``jit``); else
    ``None``. The chain's step then reads through the wrapper, as a scan's does, keeping its policy."""
    if primitives.contents(eqn) not in (primitives.REMAT, primitives.JIT, primitives.INLINE):
        return None
    inner = primitives.aligned_inner(eqn)
    if inner is None:
        return None
    found = []
    for j, out in enumerate(eqn.outvars):
        if isinstance(out, core.DropVar) or not is_float(out.aval) or not isinstance(inner.outvars[j], core.Var):
            continue
        for i, a in enumerate(eqn.invars):
            if not isinstance(a, core.Var) or not _same_type(a.aval, out.aval):
                continue
            split = _split.residual_split(inner, [inner.invars[i]], [inner.outvars[j]])
            if split.has_residual_path and _jaxpr.depends_on(inner.eqns, [inner.invars[i]], split.z):
                found.append((out, a))
    return found[0] if len(found) == 1 else None


def _positions(eqns, values) -> list:
    where = {v: (i, j) for i, e in enumerate(eqns) for j, v in enumerate(e.outvars)}
    return [where[v] for v in values]


def _body(eqns, init, carry_out, shared, per_layer, outputs):
    """The group's equations as a scan step ``(shared, h, per_layer) -> (h_next, outputs)``."""

    def step(*args):
        env = dict(zip(shared, args[: len(shared)]))
        env[init] = args[len(shared)]
        env.update(zip(per_layer, args[len(shared) + 1 :]))
        for eqn in eqns:
            env.update(zip(eqn.outvars, _jaxpr.bind(eqn, [_jaxpr.read(env, a) for a in eqn.invars])))
        return [env[carry_out], *[env[v] for v in outputs]]

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=getattr(v.aval, "weak_type", False)) for v in (*shared, init, *per_layer)]
    return jax.make_jaxpr(step)(*avals)
