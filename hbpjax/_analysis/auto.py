"""Automatic stacks: the residual scans of any function, found in its jaxpr and converted.

``highway_grad(fun)`` traces ``fun`` once (``jax.make_jaxpr``), then evaluates the traced program
equation by equation under ``jax.value_and_grad``. Every equation is bound as traced, except the
``scan`` equations chosen for conversion: those run as a Highway-BP stack (:mod:`hbpjax._stack`,
:mod:`hbpjax._backward`) whose forward evaluates the scan's own step, so values are those of ``fun``
and only the backward of the converted scans changes. Scans inside ``jit``/``nnx.jit`` and
``jax.checkpoint`` are found too; ``lax.fori_loop`` with static bounds, ``nnx.scan``, ``nnx.RNN``,
``nn.scan`` and ``nn.RNN`` all lower to ``scan``.

A scan is converted when its step has a residual path (:mod:`hbpjax._split`) and the caller's
``scans=`` choice takes it. The scan of a :func:`hbpjax.residual_scan` carries a mark with its
options (:mod:`hbpjax._marks`), so it keeps its own ``gamma``, ``linearize`` and split (its block is
a cut, whatever it computes) and counts for ``scans="marked"``. Nothing inside a
:func:`hbpjax.exact` region is converted.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core

from .._backward import layers as _layers
from .._backward.sweeps import Local, differentiate
from .._front import context as _context
from .._front.context import EXACT_SCOPE
from .._front.options import Options, StackOptions
from . import chains as _chains
from . import jaxprs as _jaxpr
from . import marks as _marks
from . import primitives
from .jaxprs import is_float
from .split import NONE
from .stacks import scan_forward, scan_stack


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


# ----------------------------------------------------------------------------------------- tracing


def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.core.Tracer, jax.ShapeDtypeStruct))


@dataclasses.dataclass
class Traced:
    """``fun`` traced on some arguments: its jaxpr over the array leaves of ``(args, kwargs)``."""

    closed: core.ClosedJaxpr
    in_tree: Any
    dynamic: list[int]  # positions of the leaves that are the jaxpr's inputs
    out_tree: Any
    out_static: dict  # output leaves that are not arrays (Python values in aux), by position

    def inputs(self, args: tuple, kwargs: dict) -> list:
        """The jaxpr's inputs from arguments laid out as the traced ones."""
        leaves, in_tree = jax.tree.flatten((args, kwargs))
        if in_tree != self.in_tree:
            raise ValueError(f"hbpjax: arguments changed between tracing and evaluation: {in_tree} vs {self.in_tree}")
        return [leaves[i] for i in self.dynamic]

    def unflatten(self, outs: Sequence):
        dynamic, leaves = iter(outs), []
        for i in range(self.out_tree.num_leaves):
            leaves.append(self.out_static[i] if i in self.out_static else next(dynamic))
        return jax.tree.unflatten(self.out_tree, leaves)


def trace(
    fun: Callable, args: tuple, kwargs: dict, *, differentiated: Sequence[int] = (), unshard: str | None = None
) -> Traced:
    """Traces ``fun(*args, **kwargs)`` to a jaxpr over the array leaves of the arguments and every
    leaf of the positional arguments in ``differentiated`` (Python numbers there are traced, as
    ``jax.grad`` traces them); other non-array leaves are baked into the jaxpr.

    With ``unshard`` (a transform's ``layer_axis``), the arguments are traced as if that Explicit
    mesh axis shards none of them: JAX refuses to trace a scan over inputs sharded along their
    leading axis, and such scans are exactly the ones evaluated layer-parallel."""
    leaves, in_tree = jax.tree.flatten((args, kwargs))
    traced_args = {a % len(args) for a in differentiated} if args else set()
    starts = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in args])
    forced = {i for a in traced_args for i in range(starts[a], starts[a + 1])}
    dynamic = [i for i, leaf in enumerate(leaves) if i in forced or _is_dynamic(leaf)]
    found = {}

    def flat_fun(*values):
        filled = list(leaves)
        for i, v in zip(dynamic, values):
            filled[i] = v
        a, kw = jax.tree.unflatten(in_tree, filled)
        out_leaves, out_tree = jax.tree.flatten(fun(*a, **kw))
        found["tree"] = out_tree
        found["static"] = {i: x for i, x in enumerate(out_leaves) if not _is_dynamic(x)}
        return [x for i, x in enumerate(out_leaves) if i not in found["static"]]

    values = [leaves[i] for i in dynamic]
    if unshard is not None:
        values = [_without_axis(v, unshard) for v in values]
    closed = jax.make_jaxpr(flat_fun)(*values)
    return Traced(closed, in_tree, dynamic, found["tree"], found["static"])


def _without_axis(value, axis: str):
    """``value``'s type with ``axis`` taken out of its sharding (the value itself if its type has
    no mesh or does not use ``axis``)."""
    aval: Any = jax.typeof(value)
    sharding = getattr(aval, "sharding", None)
    if sharding is None or getattr(sharding, "mesh", None) is None or sharding.mesh.empty:
        return value
    uses = lambda s: s == axis or (isinstance(s, tuple) and axis in s)
    if not any(uses(s) for s in sharding.spec):
        return value
    drop = lambda s: None if s == axis else tuple(a for a in s if a != axis) or None if isinstance(s, tuple) else s
    spec = jax.sharding.PartitionSpec(*(drop(s) for s in sharding.spec))
    return jax.ShapeDtypeStruct(
        aval.shape, aval.dtype, sharding=jax.sharding.NamedSharding(sharding.mesh, spec), weak_type=aval.weak_type
    )


# ------------------------------------------------------------------------------------- the analysis


@dataclasses.dataclass
class _Found:
    """One scan equation, analysed: its report and, if it has a residual path, its stack."""

    info: StackInfo
    stack: Any  # ScanStack | None
    marked: bool
    trivial: bool = False  # length 0 or 1: Highway-BP would be exact backprop


def _analyse(eqn: core.JaxprEqn, *, options: StackOptions, marked_by: core.JaxprEqn | None, eval_eqn) -> _Found:
    """The report and stack of a scan equation; ``marked_by`` is the mark of a ``residual_scan``'s
    scan (its options apply, its block is a cut, and its source is the user's call)."""
    mark = _marks.stack_mark(marked_by) if marked_by is not None else None
    params = eqn.params
    num_consts, num_carry, body = primitives.scan_layout(eqn)
    carry_avals = [v.aval for v in body.jaxpr.invars[num_consts : num_consts + num_carry]]
    carry = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in carry_avals)
    if mark is None:
        options = _linearize_for(options, body.jaxpr, body.jaxpr.invars[num_consts + num_carry :], params["length"])
    split, stack = scan_stack(
        body, num_consts=num_consts, num_carry=num_carry, length=params["length"], reverse=params["reverse"],
        unroll=params["unroll"], options=mark.options if mark else options,
        opaque=_marks.is_block if mark else (lambda e: False), eval_eqn=eval_eqn,
    )
    kinds = iter(split.kinds)
    residual = tuple(next(kinds) if is_float(a) else NONE for a in carry_avals)
    converted = split.has_residual_path and params["length"] >= 2
    if not split.has_residual_path:
        reason = _no_path_reason(stack)
    elif params["length"] < 2:
        reason = f"length {params['length']}: nothing to parallelise (exact)"
    else:
        reason = "residual_scan" if mark else "residual path found"
        if stack.remat is not None:
            reason += " inside the step's jax.checkpoint (recomputed as its policy asks, a group of layers at a time)"
        if stack.rule:
            reason += " inside the step's custom derivative rule (whose Jacobian the backward keeps)"
    info = StackInfo(
        source=_jaxpr.user_source(marked_by if mark and marked_by is not None else eqn), kind="residual_scan" if mark else "scan",
        length=params["length"],
        carry=carry, residual=residual, converted=converted, reason=reason,
    )
    return _Found(info, stack if converted else None, mark is not None, trivial=params["length"] < 2)


@dataclasses.dataclass
class _FoundChain:
    """One chain of a jaxpr, analysed: its report and, if converted, its stack."""

    chain: _chains.Chain
    info: StackInfo
    stack: Any  # ChainStack | None
    marked: bool = False


def _analyse_chains(jaxpr, *, options: StackOptions, eval_eqn, exact_only: bool = False) -> tuple[list, list]:
    """``(chains, misses)`` of ``jaxpr``: each chain with its report and stack, each near miss (three
    residual blocks or more that are not a chain) as ``(its first equation, a StackInfo saying why)``."""
    chains, misses = _chains.find(jaxpr)
    found = []
    for chain in chains:
        first, last = chain.layers[0][0], chain.layers[-1][0]
        body = chain.body.jaxpr
        split, stack = scan_stack(
            chain.body, num_consts=len(chain.shared), num_carry=1, length=chain.length,
            options=_linearize_for(options, body, body.invars[len(chain.shared) + 1 :], chain.length),
            eval_eqn=eval_eqn, kind=_chains.ChainStack,
        )
        aval: Any = chain.init.aval
        carry = (jax.ShapeDtypeStruct(aval.shape, aval.dtype),)
        layers = f"{chain.length} layers" if chain.period == 1 else f"{chain.length} groups of {chain.period} blocks"
        reason = f"{layers} written one after the other, {_jaxpr.user_source(first)} to {_jaxpr.user_source(last)}"
        converted = split.has_residual_path
        if not converted:
            reason += ": " + _no_path_reason(stack)
        elif chain.stacked_bytes() > _chains.STACK_LIMIT:
            converted = False
            reason += (
                f": its per-layer inputs take {chain.stacked_bytes() / 2**20:.0f} MiB stacked, over the "
                f"{_chains.STACK_LIMIT / 2**20:.0f} MiB limit (hbpjax._chains.STACK_LIMIT): left to backprop"
            )
        info = StackInfo(
            source=_jaxpr.user_source(first), kind="chain", length=chain.length, carry=carry,
            residual=split.kinds, converted=converted, reason=reason, period=chain.period,
            last_source=_jaxpr.user_source(last),
        )
        found.append(_FoundChain(chain, info, stack if converted else None))
    infos = [
        (miss.first, StackInfo(source=_jaxpr.user_source(miss.first), kind="chain", length=miss.joins, carry=(),
                               residual=(), converted=False, reason=miss.reason))
        for miss in misses if miss.joins >= 3
    ]
    return found, infos


#: Automatic stacks of this many layers or fewer that convolve with a kernel per layer are
#: linearized layer by layer on a CPU.
UNROLL_CONVOLUTIONS = 64


def _linearize_for(options: StackOptions, body, per_layer, length: int) -> StackOptions:
    """The options of an automatic stack: vmapped linearization, except for short stacks that
    convolve with a kernel per layer on a CPU, where vmapping makes grouped convolutions, which
    XLA's CPU backend runs many times slower than the separate ones (layer by layer instead)."""
    if jax.default_backend() != "cpu" or length > UNROLL_CONVOLUTIONS:
        return options
    kernels = [k for k in map(primitives.convolution_kernel, body.eqns) if k is not None]
    if kernels and _jaxpr.depends_on(body.eqns, per_layer, kernels):
        return dataclasses.replace(options, linearize="unroll")
    return options


def _no_path_reason(stack) -> str:
    """Why a step has no residual path, naming what computes its new carry when that is a wrapper
    the split cannot read."""
    jaxpr = stack.flat.jaxpr
    outs = {jaxpr.outvars[i] for i in stack.diff if isinstance(jaxpr.outvars[i], core.Var)}
    opaque = sorted({e.primitive.name for e in jaxpr.eqns if outs.intersection(e.outvars) and _jaxpr.sub_jaxprs(e)})
    if opaque:
        return f"the step's new carry comes out of {', '.join(opaque)}, which the split cannot read through: exact backprop"
    if not stack.diff:
        return "no floating-point carry: nothing to differentiate along the scan (exact)"
    return "no carry leaf has a residual path (h_new is not h plus or times something): exact backprop"


def _choose(scans) -> Callable[[Any], bool]:
    if scans == "auto":
        return lambda found: True
    if scans == "marked":
        return lambda found: found.marked
    return lambda found: bool(scans(found.info))


_CALLS = ("jit", "pjit")
_REMATS = ("checkpoint", "remat", "remat2")
_INLINE = {"closed_call": "call_jaxpr", "core_call": "call_jaxpr"}  # calls that only name their contents
#: Equations whose contents the rewrite evaluates (converting the stacks inside); what any other
#: equation holds (a custom_vjp's or custom_jvp's rule, a while loop, a shard_map) runs as traced.
REWRITTEN = frozenset({"scan", "cond", *_CALLS, *_REMATS, *_INLINE})


def _inner(eqn) -> tuple[Any, Sequence]:
    """``(jaxpr, consts)`` of a call or checkpoint equation."""
    inner = eqn.params[_INLINE.get(eqn.primitive.name, "jaxpr")]
    return getattr(inner, "jaxpr", inner), getattr(inner, "consts", ())


def _branches(eqn):
    """``[(jaxpr, consts)]`` of a ``cond``'s branches."""
    return [(getattr(b, "jaxpr", b), getattr(b, "consts", ())) for b in eqn.params["branches"]]


class Rewriter:
    """Evaluates a traced program, running the chosen scans as Highway-BP stacks.

    Attributes:
      converted: how many stacks were converted (``residual_scan``s split over devices count too:
        their backward is Highway-BP already).
      trivial: how many ``residual_scan``s of length 0 or 1 were met (nothing to parallelise:
        their backward is exact either way, so they are not converted and not warned about).
      kept_exact: how many equations were left alone inside :func:`hbpjax.exact` regions.
      reported: the stacks given a report slot, in program order.
    """

    def __init__(self, options: Options, slots=None):
        self.options = options
        self.choose = _choose(options.scans)
        self.auto = StackOptions(gamma=options.gamma, name=options.name)  # automatically found stacks'
        self.slots = slots  # per reporting stack, the input its sweep report comes back in
        self.converted = 0
        self.trivial = 0
        self.kept_exact = 0
        self.reported: list[StackInfo] = []
        self.slot_of: dict = {}  # id of a reporting stack's equation (or chain) -> its slot
        self._nested = 0
        self._found: dict[int, _Found] = {}
        self._chains: dict[int, tuple] = {}
        self._rewrites: dict[int, bool] = {}

    def found(self, eqn, marked_by=None) -> _Found:
        """The analysis of a scan equation (``marked_by``: the mark of a ``residual_scan``'s scan)."""
        if id(eqn) not in self._found:
            self._found[id(eqn)] = _analyse(eqn, options=self.auto, marked_by=marked_by, eval_eqn=self.eval_nested)
        return self._found[id(eqn)]

    def eval_nested(self, eqn, invals: list) -> list:
        """:meth:`eval_eqn` for the block of a converted stack (its scans are converted, unreported)."""
        self._nested += 1
        try:
            return self.eval_eqn(eqn, invals)
        finally:
            self._nested -= 1

    def converts(self, eqn, marked_by=None) -> bool:
        found = self.found(eqn, marked_by)
        return found.stack is not None and self.choose(found)

    def chains(self, jaxpr) -> list[_FoundChain]:
        """The chains of ``jaxpr``'s own equations that are converted (none for exact backprop)."""
        if not self.options.highway:
            return []
        return [c for c in self._chain_analysis(jaxpr)[0] if c.stack is not None and self.choose(c)]

    def _chain_analysis(self, jaxpr) -> tuple[list, list]:
        if id(jaxpr) not in self._chains:
            self._chains[id(jaxpr)] = (jaxpr, _analyse_chains(jaxpr, options=self.auto, eval_eqn=self.eval_nested))
        return self._chains[id(jaxpr)][1]

    # ---------------------------------------------------------------- what the program holds

    def rewrites(self, jaxpr) -> bool:
        """Whether anything in ``jaxpr`` (through calls and checkpoints) is converted."""
        if id(jaxpr) not in self._rewrites:
            self._rewrites[id(jaxpr)] = bool(self.chains(jaxpr)) or any(self._rewrites_eqn(eqn) for eqn in jaxpr.eqns)
        return self._rewrites[id(jaxpr)]

    def _rewrites_eqn(self, eqn) -> bool:
        if _jaxpr.in_scope(eqn, EXACT_SCOPE):
            return False
        name, mark = eqn.primitive.name, _marks.stack_mark(eqn)
        if mark is not None:
            return True  # evaluated by its contents, counted (converted already, or converted here)
        if name == "scan":
            return self.converts(eqn) or self.rewrites(primitives.scan_layout(eqn)[2].jaxpr)
        if name == "cond":
            return any(self.rewrites(j) for j, _ in _branches(eqn))
        if name in _CALLS or name in _REMATS or name in _INLINE:
            return self.rewrites(_inner(eqn)[0])
        return False

    def reporting(self, jaxpr) -> list[tuple[int, StackInfo]]:
        """The stacks of ``jaxpr`` that :meth:`eval_eqn` gives a report slot, in program order, each
        as ``(key, info)``: the key of its scan equation or chain."""
        out: list[tuple[int, StackInfo]] = []
        if not self.options.highway:  # exact backprop (layer-parallel stacks only): nothing sweeps
            return out
        chains = {id(c.chain.layers[0][0]): c for c in self.chains(jaxpr)}
        for eqn in jaxpr.eqns:
            if id(eqn) in chains:
                out.append((id(eqn), chains[id(eqn)].info))
            mark = _marks.stack_mark(eqn)
            if _jaxpr.in_scope(eqn, EXACT_SCOPE) or (mark is not None and mark.layer_axis is not None):
                continue
            if mark is not None:
                scans = [e for e in _inner(eqn)[0].eqns if e.primitive.name == "scan"]
                out += [(id(e), self.found(e, eqn).info) for e in scans if self.converts(e, eqn)]
            elif eqn.primitive.name == "scan":
                out += [(id(eqn), self.found(eqn).info)] if self.converts(eqn) else []
            elif eqn.primitive.name in _CALLS or eqn.primitive.name in _REMATS or eqn.primitive.name in _INLINE:
                out += self.reporting(_inner(eqn)[0])
        return out

    def _slot(self, key, info):
        """The report slot of a stack converted at the top level (``None`` inside another's block)."""
        if self._nested:
            return None
        self.reported.append(info)
        if self.slots is None:
            return None
        return self.slots[self.slot_of[key]]

    # ---------------------------------------------------------------------------- evaluation

    def eval_closed(self, closed, args: Sequence) -> list:
        return self.eval_jaxpr(closed.jaxpr, closed.consts, args)

    def eval_jaxpr(self, jaxpr, consts: Sequence, args: Sequence, *, marked_by=None) -> list:
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        chains = self.chains(jaxpr) if marked_by is None else []
        if chains:
            return self._eval_with_chains(jaxpr, env, chains)
        for eqn in jaxpr.eqns:
            invals = [_jaxpr.read(env, a) for a in eqn.invars]
            if marked_by is not None and eqn.primitive.name == "scan":
                outs = self._eval_scan(eqn, invals, marked_by)
            else:
                outs = self.eval_eqn(eqn, invals)
            env.update(zip(eqn.outvars, outs))
        return [_jaxpr.read(env, a) for a in jaxpr.outvars]

    def _eval_with_chains(self, jaxpr, env: dict, chains: list) -> list:
        """Evaluates ``jaxpr`` with each chain run as one stack, when its first value is needed
        (after what its inputs need, which no value of the chain feeds)."""
        in_chain = {i for c in chains for i in c.chain.eqn_ids}
        made_by = {}
        for c in chains:
            for v in [*c.chain.carries[-1:], *(v for outs in c.chain.outputs for v in outs)]:
                made_by[v] = c
        done: set = set()

        def run(eqns):
            for eqn in eqns:
                if id(eqn) in done or id(eqn) in in_chain:
                    continue
                for a in eqn.invars:
                    if isinstance(a, core.Var) and a not in env and a in made_by:
                        run_chain(made_by[a])
                env.update(zip(eqn.outvars, self.eval_eqn(eqn, [_jaxpr.read(env, a) for a in eqn.invars])))
                done.add(id(eqn))

        def run_chain(c):
            chain = c.chain
            inputs = [chain.init, *chain.shared, *(v for layer in chain.per_layer for v in layer)]
            run(_jaxpr.needed(jaxpr.eqns, [v for v in inputs if isinstance(v, core.Var) and v not in env]))
            env.update(zip(made_by_keys(c), self._eval_chain(c, env)))

        def made_by_keys(c):
            return [c.chain.carries[-1], *(v for outs in c.chain.outputs for v in outs)]

        run(jaxpr.eqns)
        for v in jaxpr.outvars:
            if isinstance(v, core.Var) and v not in env:
                run_chain(made_by[v])
        return [_jaxpr.read(env, a) for a in jaxpr.outvars]

    def _eval_chain(self, c: _FoundChain, env: dict) -> list:
        """A chain as a Highway-BP stack: ``[h_L, *every layer's outputs]``."""
        chain, stack = c.chain, c.stack
        self.converted += 1
        slot = self._slot(id(chain.layers[0][0]), c.info)
        init = [jax.numpy.asarray(env[chain.init], getattr(chain.init.aval, "dtype", None))]
        xs = [[_jaxpr.read(env, v) for v in layer] for layer in chain.per_layer]
        consts = tuple(_jaxpr.read(env, v) for v in chain.shared)
        forward = functools.partial(chain.forward, stack)
        final, ys = differentiate(stack, init, xs, consts, options=self.options, forward=forward, chain=Local, slot=slot)
        per_layer = [[y[g] for y in ys] for g in range(chain.length)]
        return [final[0], *(v for outs in per_layer for v in outs)]

    def eval_eqn(self, eqn, invals: list) -> list:
        """One equation: a converted scan, a marked one, a call with converted scans inside, or
        bound as traced."""
        name = eqn.primitive.name
        if _jaxpr.in_scope(eqn, EXACT_SCOPE):
            self.kept_exact += 1
            return _jaxpr.bind(eqn, invals)
        mark = _marks.stack_mark(eqn)
        if mark is not None or _marks.is_block(eqn):  # the contents, marked scans converted
            if mark is not None and mark.layer_axis is not None:
                self.converted += 1  # a layer-parallel residual_scan: Highway-BP inside already
                mark = None
            return self.eval_jaxpr(*_inner(eqn), invals, marked_by=eqn if mark is not None else None)
        if name == "scan":
            return self._eval_scan(eqn, invals, None)
        if name == "cond" and self._rewrites_eqn(eqn):  # the same cond, stacks in its branches converted
            branches = [functools.partial(self._eval_inner, j, c) for j, c in _branches(eqn)]
            return list(jax.lax.switch(invals[0], [lambda *ops, b=b: b(ops) for b in branches], *invals[1:]))
        if name in _INLINE and self.rewrites(_inner(eqn)[0]):
            return self.eval_jaxpr(*_inner(eqn), invals)
        if name in _CALLS and self.rewrites(_inner(eqn)[0]):
            fn = functools.partial(self.eval_jaxpr, *_inner(eqn))
            return list(jax.jit(_named(fn, eqn.params.get("name", "jit")))(*invals))
        if name in _REMATS and self.rewrites(_inner(eqn)[0]):
            fn = functools.partial(self.eval_jaxpr, *_inner(eqn))
            policy, prevent_cse = eqn.params.get("policy"), eqn.params.get("prevent_cse", True)
            return list(jax.checkpoint(lambda *a: fn(a), policy=policy, prevent_cse=prevent_cse)(*invals))
        return _jaxpr.bind(eqn, invals)

    def _eval_inner(self, jaxpr, consts, args) -> list:
        """A jaxpr run more than once or conditionally (a loop body, a branch): its stacks are
        converted without a report slot, as in the block of a stack."""
        self._nested += 1
        try:
            return self.eval_jaxpr(jaxpr, consts, args)
        finally:
            self._nested -= 1

    def _eval_scan(self, eqn, invals, marked_by) -> list:
        found = self.found(eqn, marked_by)
        self.trivial += found.marked and found.trivial
        if not self.converts(eqn, marked_by):
            num_consts, num_carry, body = primitives.scan_layout(eqn)
            if not self.rewrites(body.jaxpr):
                return _jaxpr.bind(eqn, invals)
            # The same scan, differentiated exactly by JAX, with the stacks inside its step converted.
            consts, init, xs = invals[:num_consts], invals[num_consts : num_consts + num_carry], invals[num_consts + num_carry :]

            def step(carry, x):
                out = self._eval_inner(body.jaxpr, body.consts, [*consts, *carry, *x])
                return out[:num_carry], out[num_carry:]

            params = eqn.params
            final, ys = jax.lax.scan(step, init, xs, length=params["length"], reverse=params["reverse"], unroll=params["unroll"])
            return [*final, *ys]
        if not self.options.highway:  # exact backprop: only layer-parallel stacks are run differently
            return self._exact_scan(eqn, invals)
        self.converted += 1
        slot = self._slot(id(eqn), found.info)
        init, xs, consts = self._operands(eqn, invals)
        parallel = self._layer_parallel(found.stack, init, xs, consts)
        if parallel is not None:
            return parallel
        forward = functools.partial(scan_forward, found.stack)
        final, ys = differentiate(
            found.stack, init, xs, consts, options=self.options, forward=forward, chain=Local, slot=slot
        )
        return [*final, *ys]

    @staticmethod
    def _operands(eqn, invals) -> tuple[list, list, tuple]:
        """``(init, xs, consts)`` of a scan equation; literal operands (a Python float as the
        initial carry) become arrays of their type."""
        invals = [jax.numpy.asarray(v, getattr(a.aval, "dtype", None)) if isinstance(a, core.Literal) else v for a, v in zip(eqn.invars, invals)]
        num_consts, num_carry, _ = primitives.scan_layout(eqn)
        return list(invals[num_consts : num_consts + num_carry]), list(invals[num_consts + num_carry :]), tuple(invals[:num_consts])

    def _layer_parallel(self, stack, init, xs, consts) -> list | None:
        """The outputs of ``stack`` run layer-parallel, if the transform has a ``layer_axis`` and
        the stack's per-layer inputs are sharded over it; else ``None``."""
        axis = self.options.layer_axis
        if axis is None or stack.reverse:  # the pipeline runs the layers in order
            return None
        mesh, size = _layers.resolve(axis, self.options.mesh, None, name=self.options.name, xs=xs)
        if not _layers.sharded_over(xs, axis, mesh):
            return None
        _layers.check_length(axis, size, stack.length, name=self.options.name)
        final, ys = _layers.found_stack(stack, init, xs, consts, options=self.options, axis=axis, mesh=mesh, size=size)
        return [*final, *ys]

    def _exact_scan(self, eqn, invals) -> list:
        """A converted scan under exact backprop (``iterations=None`` with a ``layer_axis``): run
        layer-parallel if its inputs are sharded so (JAX differentiates the pipeline), else as is."""
        init, xs, consts = self._operands(eqn, invals)
        parallel = self._layer_parallel(self.found(eqn).stack, init, xs, consts)
        return parallel if parallel is not None else _jaxpr.bind(eqn, invals)


def _named(fn, name):
    """``fn`` (a function of one sequence of arguments) as a function of positional arguments,
    named ``name`` (the name a ``jax.jit`` of it shows in jaxprs)."""

    def named(*args):
        return fn(args)

    named.__name__ = named.__qualname__ = str(name)
    return named


class Conversion:
    """A function traced once on some arguments, evaluated with its chosen stacks converted.

    Attributes:
      traced: the function's jaxpr over its array arguments.
      stacks: the converted stacks that report (``return_report``), in program order.
    """

    def __init__(self, fun: Callable, options: Options, args: tuple, kwargs: dict, *, differentiated=()):
        self.options = options
        with _context.active(options):
            self.traced = trace(fun, args, kwargs, differentiated=differentiated, unshard=options.layer_axis)
        reporting = Rewriter(options).reporting(self.traced.closed.jaxpr)
        self.keys = [key for key, _ in reporting]
        self.stacks = [info for _, info in reporting]

    def evaluate(self, slots, *args, **kwargs):
        """The function's value at ``(args, kwargs)`` (laid out as the traced ones), its stacks
        converted. ``slots`` is ``None`` or a ``float32[len(stacks), 2]`` that the stacks ignore and
        whose cotangent is their sweep report. If nothing was converted, :meth:`warn` says why."""
        rewriter = Rewriter(self.options, slots)
        rewriter.slot_of = {key: i for i, key in enumerate(self.keys)}
        outs = rewriter.eval_closed(self.traced.closed, self.traced.inputs(args, kwargs))
        if sorted(s.source for s in rewriter.reported) != sorted(s.source for s in self.stacks):
            raise AssertionError(f"hbpjax: the stacks that report changed: {rewriter.reported} vs {self.stacks}")
        self.none_converted = self.options.highway and rewriter.converted == rewriter.trivial == rewriter.kept_exact == 0
        return self.traced.unflatten(outs)

    def warn(self, stacklevel: int = 2) -> None:
        """Warns with a :class:`NoStackWarning` if the last evaluation converted nothing, with what
        :func:`find_stacks` says of every scan."""
        if not getattr(self, "none_converted", False):
            return
        infos = Stacks()
        _collect(Rewriter(self.options), self.traced.closed.jaxpr, infos, kept=None, nested=None)
        listing = "".join(f"\n  {i.source} ({i.kind}, L={i.length}): {i.reason}" for i in infos[:5])
        listing = listing or (
            " The function runs no scan and no chain of residual blocks: nothing to convert (a "
            "lax.associative_scan is parallel already)."
        )
        warnings.warn(
            NoStackWarning(
                f"{self.options.name}: found no residual stack to convert (scans={self.options.scans!r}), so this "
                f"gradient is plain backprop.{listing}\nhbpjax.find_stacks(fun, *args) lists every scan and why it "
                "was not converted."
            ),
            stacklevel=stacklevel + 1,
        )


# --------------------------------------------------------------------------------------- find_stacks


def find_stacks(fun: Callable, *args: Any, **kwargs: Any) -> Stacks:
    """The scans of ``fun(*args, **kwargs)`` and what :func:`hbpjax.highway_grad` does with each.

    One :class:`StackInfo` per scan in program order (scans inside ``jit``, ``jax.checkpoint`` and
    other scans included), and one per chain of residual blocks written one after the other (a
    Python loop of layers), converted or not. ``print`` the result for a table.

    Args:
      fun: the function, as you would pass it to ``jax.grad`` (a loss, or a model's forward).
      *args: positional arguments to trace it with (arrays or ``jax.ShapeDtypeStruct``).
      **kwargs: keyword arguments to trace it with.

    Returns:
      A list of :class:`StackInfo` (its ``str`` is a table).

    Raises:
      TypeError: ``fun`` is not callable.

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> def loss(W, x):
      ...     h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)   # residual
      ...     g, _ = jax.lax.scan(lambda g, w: (jnp.tanh(g @ w), None), x, W)       # not
      ...     return jnp.sum(h) + jnp.sum(g)
      >>> stacks = hbpjax.find_stacks(loss, jnp.ones((8, 3, 3)), jnp.ones(3))
      >>> [(s.length, s.residual, s.converted) for s in stacks]
      [(8, ('identity',), True), (8, ('none',), False)]
    """
    if not callable(fun):
        raise TypeError(f"hbpjax.find_stacks: `fun` must be callable; got {fun!r}.")
    options = Options(iterations=0, name="hbpjax.find_stacks")
    with _context.active(options):  # residual_scans trace as they do under highway_grad
        traced = trace(fun, args, kwargs)
    infos = Stacks()
    _collect(Rewriter(options), traced.closed.jaxpr, infos, kept=None, nested=None)
    return infos


def _collect(rewriter: Rewriter, jaxpr, infos: list, *, kept: str | None, nested: str | None, marked_by=None) -> None:
    """Appends, in program order, what ``jaxpr`` holds: scans (then what their bodies hold), calls'
    contents, layer-parallel stacks, and chains of residual blocks written one after the other.

    ``kept`` says why nothing in ``jaxpr`` is converted (an exact region, a custom_vjp's rule, ...),
    ``nested`` what the stacks here are nested in; ``marked_by`` is the mark of a residual_scan.
    """
    in_block = nested == "outer block"  # the block of a converted scan: its chains are not looked for
    chains, misses = ([], []) if in_block else rewriter._chain_analysis(jaxpr)
    at = {id(c.chain.layers[0][0]): c.info for c in chains}
    at.update({id(first): info for first, info in misses})
    chain_eqns = {i for c in chains if c.stack is not None and rewriter.choose(c) for i in c.chain.eqn_ids}
    for eqn in jaxpr.eqns:
        if id(eqn) in at:
            info = at[id(eqn)]
            if kept is not None and info.converted:
                info = dataclasses.replace(info, converted=False, reason=kept)
            elif info.converted and not rewriter.choose(_Found(info, None, marked=False)):
                info = dataclasses.replace(info, converted=False, reason=f"not chosen by scans={rewriter.options.scans!r}")
            infos.append(info)
        name, mark = eqn.primitive.name, _marks.stack_mark(eqn)
        inner_kept = kept or ("inside hbpjax.exact(): kept exact" if _jaxpr.in_scope(eqn, EXACT_SCOPE) else None)
        if inner_kept is None and name not in REWRITTEN:
            inner_kept = f"inside {name}: kept exact (hbpjax does not rewrite what a {name} holds)"
        inner_nested = "outer block" if id(eqn) in chain_eqns else nested
        if mark is not None and mark.layer_axis is not None:
            infos.append(
                StackInfo(
                    source=_jaxpr.user_source(eqn), kind="residual_scan", length=mark.length, carry=(), residual=(),
                    converted=kept is None, reason=kept or f"layer-parallel over mesh axis {mark.layer_axis!r}",
                )
            )
        elif mark is not None:
            _collect(rewriter, _inner(eqn)[0], infos, kept=inner_kept, nested=inner_nested, marked_by=eqn)
        elif name == "scan":
            found = rewriter.found(eqn, marked_by)
            info = found.info
            if inner_kept is not None:
                info = dataclasses.replace(info, converted=False, reason=inner_kept)
            elif inner_nested is not None and found.stack is not None:
                info = dataclasses.replace(info, reason=f"{info.reason} (nested: converted within the {inner_nested})")
            infos.append(info)
            outer = "outer block" if info.converted else "outer loop, which stays exact"
            _collect(rewriter, primitives.scan_layout(eqn)[2].jaxpr, infos, kept=inner_kept, nested=outer)
        else:
            for sub in _jaxpr.sub_jaxprs(eqn):
                _collect(rewriter, sub, infos, kept=inner_kept, nested="cond branch" if name == "cond" else inner_nested)
