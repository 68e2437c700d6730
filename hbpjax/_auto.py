"""Automatic stacks: the residual scans of any function, found in its jaxpr and converted.

``highway_grad(fun)`` traces ``fun`` once (``jax.make_jaxpr``), then evaluates the traced program
equation by equation under ``jax.value_and_grad``. Every equation is bound as traced, except the
``scan`` equations chosen for conversion: those run as a Highway-BP stack (:mod:`hbpjax._stack`,
:mod:`hbpjax._backward`) whose forward evaluates the scan's own step, so values are those of ``fun``
and only the backward of the converted scans changes. Scans inside ``jit``/``nnx.jit`` and
``jax.checkpoint`` are found too; ``lax.fori_loop`` with static bounds, ``nnx.scan``, ``nnx.RNN``,
``nn.scan`` and ``nn.RNN`` all lower to ``scan``.

A scan is converted when its step has a residual path (:mod:`hbpjax._split`) and the caller's
``scans=`` choice takes it. :func:`hbpjax.residual_scan` marks its scans (a named scope around the
scan, another around the block), so they keep their own ``gamma``, ``linearize`` and split (the
block is a cut, whatever it computes) and count for ``scans="marked"``. Nothing inside a
:func:`hbpjax.exact` region is converted.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend import core

from . import _jaxpr
from ._backward import Local, differentiate
from ._common import is_float
from ._context import EXACT
from ._split import NONE
from ._stack import scan_forward, scan_stack

#: Scope names that mark what hbpjax's own functions trace (see :func:`marker`).
RESIDUAL_SCAN, BLOCK = "hbpjax.residual_scan", "hbpjax.block"
SCANS = ("auto", "marked")


class NoStackWarning(UserWarning):
    """``highway_grad`` found no residual stack to convert: the gradient is plain backprop.

    Call :func:`hbpjax.find_stacks` on the same function and arguments to see every scan and why
    it was not converted.
    """


@dataclasses.dataclass(frozen=True)
class StackInfo:
    """What :func:`hbpjax.find_stacks` found about one scan (or one Python-unrolled chain).

    Attributes:
      source: ``file:line`` in your code that made the scan.
      kind: ``"scan"`` (a ``lax.scan``, ``fori_loop``, ``nnx.scan``, ``nnx.RNN``, ...),
        ``"residual_scan"`` (:func:`hbpjax.residual_scan` or an hbpjax Flax module) or
        ``"unrolled"`` (residual blocks chained by a Python loop).
      length: the number of steps (layers, time steps).
      carry: shape and dtype of every carry leaf.
      residual: per carry leaf, ``"identity"`` (``h + ...``, ``K = 1``), ``"diagonal"`` (an
        elementwise residual path such as a gate or a ReLU) or ``"none"`` (no residual path, or
        not floating point).
      converted: whether ``highway_grad`` runs this stack's backward as Highway-BP.
      reason: why (or why not), in words.
    """

    source: str
    kind: str
    length: int
    carry: tuple
    residual: tuple[str, ...]
    converted: bool
    reason: str

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


# ---------------------------------------------------------------------------------------- markers


def marker(**options) -> str:
    """The scope name :func:`hbpjax.residual_scan` traces its scan in, carrying its options
    (``gamma``, ``linearize``; ``layer_axis`` and ``length`` for a layer-parallel stack)."""
    return RESIDUAL_SCAN + "[" + ",".join(f"{k}={v!r}" if k == "gamma" else f"{k}={v}" for k, v in options.items()) + "]"


_MARKER = re.compile(re.escape(RESIDUAL_SCAN) + r"\[([^\]]*)\]\)*$")


def marked_options(eqn: core.JaxprEqn) -> dict | None:
    """The options of a ``residual_scan``'s scan (or layer-parallel ``shard_map``), else ``None``."""
    found = _MARKER.search(_jaxpr.scope(eqn))
    if found is None:
        return None
    options = dict(item.split("=", 1) for item in found.group(1).split(",") if "=" in item)
    if "gamma" in options:
        options["gamma"] = float(options["gamma"])
    return options


def in_block(eqn: core.JaxprEqn) -> bool:
    """Whether ``eqn`` belongs to the block of a ``residual_scan`` step (a cut for the split)."""
    return _jaxpr.in_scope(eqn, BLOCK)


# ----------------------------------------------------------------------------------------- tracing


def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.core.Tracer, jax.ShapeDtypeStruct))


@dataclasses.dataclass
class Traced:
    """``fun`` traced on some arguments: its jaxpr over the array leaves of ``(args, kwargs)``."""

    closed: core.ClosedJaxpr
    leaves: list  # all leaves of (args, kwargs); non-arrays are baked into the jaxpr
    dynamic: list[int]  # positions of the array leaves, the jaxpr's inputs
    out_tree: Any
    out_static: dict  # output leaves that are not arrays (Python values in aux), by position

    def unflatten(self, outs: Sequence):
        outs, leaves = iter(outs), []
        for i in range(self.out_tree.num_leaves):
            leaves.append(self.out_static[i] if i in self.out_static else next(outs))
        return jax.tree.unflatten(self.out_tree, leaves)


def trace(fun: Callable, args: tuple, kwargs: dict) -> Traced:
    """Traces ``fun(*args, **kwargs)`` to a jaxpr over the array leaves of the arguments."""
    leaves, in_tree = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]
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

    closed = jax.make_jaxpr(flat_fun)(*[leaves[i] for i in dynamic])
    return Traced(closed, leaves, dynamic, found["tree"], found["static"])


# ------------------------------------------------------------------------------------- the analysis


@dataclasses.dataclass
class _Found:
    """One scan equation, analysed: its report and, if it has a residual path, its stack."""

    info: StackInfo
    stack: Any  # ScanStack | None
    marked: bool
    trivial: bool = False  # length 0 or 1: Highway-BP would be exact backprop


def _analyse(eqn: core.JaxprEqn, *, gamma: float, eval_eqn=None, exact: bool = False) -> _Found:
    params = eqn.params
    options = marked_options(eqn)
    num_consts, num_carry, body = _jaxpr.scan_layout(eqn)
    carry_avals = [v.aval for v in body.jaxpr.invars[num_consts : num_consts + num_carry]]
    carry = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in carry_avals)
    split, stack = scan_stack(
        body, num_consts=num_consts, num_carry=num_carry, length=params["length"], reverse=params["reverse"],
        unroll=params["unroll"], gamma=options["gamma"] if options else gamma,
        linearize=options.get("linearize", "vmap") if options else "vmap",
        opaque=in_block if options else (lambda e: False),
        eval_eqn=eval_eqn, name=RESIDUAL_SCAN if options else "hbpjax.highway_grad",
    )
    kinds = iter(split.kinds)
    residual = tuple(next(kinds) if is_float(a) else NONE for a in carry_avals)
    if not split.has_residual_path:
        stack = None
    if exact:
        reason = "inside hbpjax.exact(): kept exact"
    elif stack is None:
        reason = "no carry leaf has a residual path (h_new is not h plus or times something): exact backprop"
    elif params["length"] < 2:
        reason, stack = f"length {params['length']}: nothing to parallelise (exact)", None
    else:
        reason = "residual_scan" if options else "residual path found"
    info = StackInfo(
        source=_jaxpr.user_source(eqn), kind="residual_scan" if options else "scan", length=params["length"],
        carry=carry, residual=residual, converted=stack is not None and not exact, reason=reason,
    )
    return _Found(info, None if exact else stack, options is not None, trivial=params["length"] < 2)


def _choose(scans) -> Callable[[_Found], bool]:
    if scans == "auto":
        return lambda found: True
    if scans == "marked":
        return lambda found: found.marked
    return lambda found: bool(scans(found.info))


def check_scans(name: str, scans):
    """Validates the ``scans=`` option of the transforms."""
    if callable(scans) or (isinstance(scans, str) and scans in SCANS):
        return scans
    if isinstance(scans, str):
        raise ValueError(
            f"{name}: `scans` must be 'auto' (every residual scan), 'marked' (only residual_scan and "
            f"hbpjax modules) or a callable StackInfo -> bool; got {scans!r}."
        )
    raise TypeError(
        f"{name}: `scans` must be 'auto', 'marked' or a callable StackInfo -> bool; got {scans!r} of "
        f"type {type(scans).__name__}."
    )


_CALLS = ("jit", "pjit")
_REMATS = ("remat", "remat2", "checkpoint")


class Rewriter:
    """Evaluates a traced program, running the chosen scans as Highway-BP stacks.

    Attributes:
      converted: how many stacks were converted (``residual_scan``s split over devices count too:
        their backward is Highway-BP already).
      trivial: how many ``residual_scan``s of length 0 or 1 were met (nothing to parallelise:
        their backward is exact either way, so they are not converted and not warned about).
      kept_exact: how many equations were left alone inside :func:`hbpjax.exact` regions.
    """

    def __init__(self, settings, choose: Callable[[_Found], bool], slots=None):
        self.settings = settings
        self.choose = choose
        self.slots = slots  # per top-level converted stack, the input its sweep report comes back in
        self.converted = 0
        self.trivial = 0
        self.kept_exact = 0
        self.reported: list[StackInfo] = []  # the stacks given a report slot, in program order
        self._nested = 0
        self._found: dict[int, _Found] = {}
        self._rewrites: dict[int, bool] = {}

    def found(self, eqn) -> _Found:
        if id(eqn) not in self._found:
            self._found[id(eqn)] = _analyse(eqn, gamma=self.settings.gamma, eval_eqn=self.eval_nested)
        return self._found[id(eqn)]

    def eval_nested(self, eqn, invals: list) -> list:
        """:meth:`eval_eqn` for the block of a converted stack (its scans are converted, unreported)."""
        self._nested += 1
        try:
            return self.eval_eqn(eqn, invals)
        finally:
            self._nested -= 1

    def converts(self, eqn) -> bool:
        found = self.found(eqn)
        return found.stack is not None and self.choose(found)

    def rewrites(self, jaxpr) -> bool:
        """Whether anything in ``jaxpr`` (through calls and checkpoints) is converted."""
        if id(jaxpr) not in self._rewrites:
            self._rewrites[id(jaxpr)] = any(self._rewrites_eqn(eqn) for eqn in jaxpr.eqns)
        return self._rewrites[id(jaxpr)]

    def _rewrites_eqn(self, eqn) -> bool:
        if _jaxpr.in_scope(eqn, EXACT):
            return False
        name = eqn.primitive.name
        if name == "scan":
            return self.converts(eqn)
        if name in _CALLS or name in _REMATS:
            return self.rewrites(eqn.params["jaxpr"].jaxpr if name in _CALLS else _open(eqn.params["jaxpr"]))
        return False

    def eval_closed(self, closed, args: Sequence) -> list:
        return self.eval_jaxpr(closed.jaxpr, closed.consts, args)

    def eval_jaxpr(self, jaxpr, consts: Sequence, args: Sequence) -> list:
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            outs = self.eval_eqn(eqn, [_jaxpr.read(env, a) for a in eqn.invars])
            env.update(zip(eqn.outvars, outs))
        return [_jaxpr.read(env, a) for a in jaxpr.outvars]

    def eval_eqn(self, eqn, invals: list) -> list:
        """One equation: a converted scan, a call with converted scans inside, or bound as traced."""
        name = eqn.primitive.name
        if _jaxpr.in_scope(eqn, EXACT):
            self.kept_exact += 1
            return _jaxpr.bind(eqn, invals)
        if name == "scan":
            self.trivial += self.found(eqn).marked and self.found(eqn).trivial
            if self.converts(eqn):
                self.converted += 1
                slot = None
                if not self._nested:
                    self.reported.append(self.found(eqn).info)
                    if self.slots is not None:
                        slot = self.slots[len(self.reported) - 1]
                return self._run(self.found(eqn).stack, eqn, invals, slot)
        if name in _CALLS and self.rewrites(eqn.params["jaxpr"].jaxpr):
            inner = eqn.params["jaxpr"]
            fn = functools.partial(self.eval_closed, inner)
            return list(jax.jit(_named(fn, eqn.params.get("name", "jit")))(*invals))
        if name in _REMATS and self.rewrites(_open(eqn.params["jaxpr"])):
            inner = eqn.params["jaxpr"]
            fn = functools.partial(self.eval_jaxpr, _open(inner), getattr(inner, "consts", ()))
            policy, prevent_cse = eqn.params.get("policy"), eqn.params.get("prevent_cse", True)
            return list(jax.checkpoint(lambda *a: fn(a), policy=policy, prevent_cse=prevent_cse)(*invals))
        if name == "shard_map" and marked_options(eqn) is not None:
            self.converted += 1  # a layer-parallel residual_scan: Highway-BP inside already
        return _jaxpr.bind(eqn, invals)

    def _run(self, stack, eqn, invals, slot):
        # Literal operands (a Python float as the initial carry) become arrays of their type.
        invals = [jax.numpy.asarray(v, a.aval.dtype) if isinstance(a, core.Literal) else v for a, v in zip(eqn.invars, invals)]
        num_consts, num_carry, _ = _jaxpr.scan_layout(eqn)
        consts = tuple(invals[:num_consts])
        init = list(invals[num_consts : num_consts + num_carry])
        xs = list(invals[num_consts + num_carry :])
        forward = functools.partial(scan_forward, stack)
        final, ys = differentiate(
            stack, init, xs, consts, settings=self.settings, forward=forward, chain=Local, slot=slot
        )
        return [*final, *ys]


def _open(jaxpr):
    return getattr(jaxpr, "jaxpr", jaxpr)


def _named(fn, name):
    """``fn`` (a function of one sequence of arguments) as a function of positional arguments,
    named ``name`` (the name a ``jax.jit`` of it shows in jaxprs)."""

    def named(*args):
        return fn(args)

    named.__name__ = named.__qualname__ = str(name)
    return named


def rewrite(fun: Callable, settings, *, scans, name: str, report: bool = False) -> Callable:
    """``fun`` with its chosen residual scans running as Highway-BP stacks (same values).

    With ``report``, the result takes a first argument ``slots`` (``float32[n, 2]``, zeros): the
    ``i``-th converted stack ignores ``slots[i]`` and returns its sweep report as the cotangent of
    it, so the gradient with respect to ``slots`` is the report. ``rewritten.stacks(*args,
    **kwargs)`` says which stacks those are (``n`` of them, in program order).
    """
    choose = _choose(scans)

    def run(slots, args, kwargs):
        traced = trace(fun, args, kwargs)
        rewriter = Rewriter(settings, choose, slots)
        outs = rewriter.eval_closed(traced.closed, [traced.leaves[i] for i in traced.dynamic])
        if rewriter.converted == rewriter.trivial == rewriter.kept_exact == 0:
            seen = [f.info for f in rewriter._found.values()]
            listing = "".join(f"\n  {i.source} ({i.kind}, L={i.length}): {i.reason}" for i in seen[:5])
            listing = listing or " The function runs no scan (a Python loop of layers is not a stack)."
            warnings.warn(
                NoStackWarning(
                    f"{name}: found no residual stack to convert (scans={scans!r}), so this gradient is "
                    f"plain backprop.{listing}\nhbpjax.find_stacks(fun, *args) lists every scan and "
                    "why it was not converted."
                ),
                stacklevel=3,
            )
        return traced.unflatten(outs), rewriter

    if report:

        @functools.wraps(fun)
        def rewritten(slots, *args, **kwargs):
            return run(slots, args, kwargs)[0]

    else:

        @functools.wraps(fun)
        def rewritten(*args, **kwargs):
            return run(None, args, kwargs)[0]

    def stacks(*args, **kwargs) -> list[StackInfo]:
        """The converted stacks that report, in program order (the rewrite run abstractly)."""
        traced = trace(fun, args, kwargs)
        rewriter = Rewriter(settings, choose)
        jax.make_jaxpr(lambda *d: rewriter.eval_closed(traced.closed, d))(*[traced.leaves[i] for i in traced.dynamic])
        return rewriter.reported

    rewritten.stacks = stacks
    return rewritten


# --------------------------------------------------------------------------------------- find_stacks


def find_stacks(fun: Callable, *args, **kwargs) -> Stacks:
    """The scans of ``fun(*args, **kwargs)`` and what :func:`hbpjax.highway_grad` does with each.

    One :class:`StackInfo` per scan in program order (scans inside ``jit``, ``jax.checkpoint`` and
    other scans included), plus one per chain of residual blocks written as a Python loop (listed,
    not converted). ``print`` the result for a table.

    Args:
      fun: the function, as you would pass it to ``jax.grad`` (a loss, or a model's forward).
      *args, **kwargs: arguments to trace it with (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A list of :class:`StackInfo` (its ``str`` is a table).

    Example:
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
    from . import _context

    settings = _context.HighwaySettings(iterations=0)
    with _context.active(settings):  # layer-parallel residual_scans trace as they would under highway_grad
        traced = trace(fun, args, kwargs)
    rewriter = Rewriter(settings, _choose("auto"))
    infos = Stacks()
    _collect(rewriter, traced.closed.jaxpr, infos, exact=False, nested=False)
    return infos


def _collect(rewriter: Rewriter, jaxpr, infos: list, *, exact: bool, nested: bool) -> None:
    """Appends, in program order, what ``jaxpr`` holds: scans (then what their bodies hold), calls'
    contents, layer-parallel stacks, and chains of residual blocks written out one by one."""
    chains = {id(eqn): info for eqn, info in _unrolled(jaxpr)}
    for eqn in jaxpr.eqns:
        if id(eqn) in chains:
            infos.append(chains[id(eqn)])
        inner_exact = exact or _jaxpr.in_scope(eqn, EXACT)
        name = eqn.primitive.name
        if name == "scan":
            found = rewriter.found(eqn)
            info = found.info
            if inner_exact:
                info = dataclasses.replace(info, converted=False, reason="inside hbpjax.exact(): kept exact")
            elif nested and found.stack is not None:
                info = dataclasses.replace(info, reason=info.reason + " (nested: converted within the outer block)")
            infos.append(info)
            _collect(rewriter, eqn.params["jaxpr"].jaxpr, infos, exact=inner_exact, nested=True)
        elif name == "shard_map" and marked_options(eqn) is not None:
            options = marked_options(eqn)
            infos.append(
                StackInfo(
                    source=_jaxpr.user_source(eqn), kind="residual_scan", length=int(options.get("length", 0)),
                    carry=(), residual=(), converted=not inner_exact,
                    reason=f"layer-parallel over mesh axis {options.get('layer_axis')!r}",
                )
            )
        else:
            for sub in _jaxpr.sub_jaxprs(eqn):
                _collect(rewriter, sub, infos, exact=inner_exact, nested=nested)


def _unrolled(jaxpr) -> list[tuple[core.JaxprEqn, StackInfo]]:
    """Chains ``h <- h + f(h)`` of two or more residual blocks written out one by one, each with the
    equation that starts it."""
    bits: dict = {}
    ancestors: dict = {}
    link: dict = {}
    first: dict = {}
    for var in jaxpr.invars:
        bits[var] = len(bits)
        ancestors[var] = 1 << bits[var]
    for eqn in jaxpr.eqns:
        deps = 0
        for a in eqn.invars:
            if isinstance(a, core.Var):
                deps |= ancestors.get(a, 0)
        if eqn.primitive.name in ("add", "add_any") and len(eqn.outvars) == 1:
            out = eqn.outvars[0]
            a, b = eqn.invars
            for stream, other in ((a, b), (b, a)):
                if (
                    isinstance(stream, core.Var) and isinstance(other, core.Var) and stream is not other
                    and stream.aval.shape == out.aval.shape and stream in bits
                    and (ancestors.get(other, 0) >> bits[stream]) & 1
                    and getattr(stream.aval, "shape", ()) != ()
                ):
                    link[out] = stream
                    first[out] = first.get(stream, eqn)
                    break
        for v in eqn.outvars:
            bits[v] = len(bits)
            ancestors[v] = deps | (1 << bits[v])
    ends = set(link) - set(link.values())
    infos = []
    for end in sorted(ends, key=lambda v: bits[v]):
        n, var = 0, end
        while var in link:
            n, var = n + 1, link[var]
        if n >= 2:
            infos.append((first[end],
                StackInfo(
                    source=_jaxpr.user_source(first[end]), kind="unrolled", length=n,
                    carry=(jax.ShapeDtypeStruct(end.aval.shape, end.aval.dtype),), residual=("identity",),
                    converted=False,
                    reason=(
                        f"{n} residual blocks chained by a Python loop, each traced separately: stack the "
                        "layers with nnx.scan / nn.scan (or hbpjax.nnx.ResidualStack) to convert them"
                    ),
                ))
            )
    return infos
