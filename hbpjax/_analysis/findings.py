"""What a scan or a chain is, as a stack: its :class:`~hbpjax._analysis.stacks.ScanStack` (where it
has a residual path) and the :class:`~hbpjax.StackInfo` row that says so.

The planner (:mod:`hbpjax._analysis.planner`) calls these once per scan equation and per chain it
meets; the rows say what the stack is, whatever the planner then decides (chosen or not, kept exact
or not).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.extend import core

from .._front.options import StackOptions
from . import chains as _chains
from . import marks, primitives
from .info import StackInfo
from .jaxprs import is_float, operand_labels, sub_jaxprs
from .sources import user_source
from .split import NONE
from .stacks import scan_stack


@dataclasses.dataclass(frozen=True)
class Found:
    """A scan or a chain, analysed.

    Attributes:
      info: its row (``converted`` says whether it has a residual path worth converting).
      stack: its stack where ``info.converted``, else ``None``.
      marked: it is a ``residual_scan``'s scan (``scans="marked"`` takes it).
      trivial: a ``residual_scan`` of length 0 or 1 (Highway-BP would be exact backprop).
    """

    info: StackInfo
    stack: Any
    marked: bool = False
    trivial: bool = False


def scan(eqn: core.JaxprEqn, *, options: StackOptions, marked_by: core.JaxprEqn | None) -> Found:
    """A scan equation analysed; ``marked_by`` is the mark of a ``residual_scan``'s scan (its options
    apply, its block is a cut, and its source is the user's call)."""
    mark = marks.stack_mark(marked_by) if marked_by is not None else None
    length = eqn.params["length"]
    num_consts, num_carry, body = primitives.scan_layout(eqn)
    carry_avals = [v.aval for v in body.jaxpr.invars[num_consts : num_consts + num_carry]]
    split, stack = scan_stack(
        body, num_consts=num_consts, num_carry=num_carry, length=length, reverse=eqn.params["reverse"],
        unroll=eqn.params["unroll"], options=mark.options if mark else options,
        opaque=marks.is_block if mark else (lambda e: False),
    )
    if mark is None:
        stack = _linearized_for(stack)
    kinds = iter(split.kinds)
    residual = tuple(next(kinds) if is_float(a) else NONE for a in carry_avals)
    converted = split.has_residual_path and length >= 2
    if not split.has_residual_path:
        reason = _no_path_reason(stack)
    elif length < 2:
        reason = f"length {length}: nothing to parallelise (exact)"
    else:
        reason = "residual_scan" if mark else "residual path found"
        if stack.remat is not None:
            reason += " inside the step's jax.checkpoint (what its policy does not save is recomputed, one layer at a time by default)"
        if stack.rule:
            reason += " inside the step's custom derivative rule (whose Jacobian the backward keeps)"
    info = StackInfo(
        source=user_source(marked_by if mark and marked_by is not None else eqn),
        kind="residual_scan" if mark else "scan", length=length,
        carry=tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in carry_avals),
        residual=residual, converted=converted, reason=reason,
    )
    return Found(info, stack if converted else None, marked=mark is not None, trivial=mark is not None and length < 2)


def chain(chain: _chains.Chain, *, options: StackOptions) -> Found:
    """A chain analysed: converted where it has a residual path and its stacked inputs fit."""
    first, last = chain.layers[0][0], chain.layers[-1][0]
    split, stack = scan_stack(
        chain.body, num_consts=len(chain.shared), num_carry=1, length=chain.length, options=options, kind=_chains.ChainStack
    )
    stack = _linearized_for(stack)
    aval: Any = chain.init.aval
    layers = f"{chain.length} layers" if chain.period == 1 else f"{chain.length} groups of {chain.period} blocks"
    reason = f"{layers} written one after the other, {user_source(first)} to {user_source(last)}"
    converted = split.has_residual_path
    if not converted:
        reason += ": " + _no_path_reason(stack)
    elif stack.remat is not None:
        reason += " under jax.checkpoint (what its policy does not save is recomputed, one layer at a time by default)"
    elif chain.stacked_bytes() > _chains.STACK_LIMIT:
        converted = False
        reason += (
            f": its per-layer inputs take {chain.stacked_bytes() / 2**20:.0f} MiB stacked, over the "
            f"{_chains.STACK_LIMIT / 2**20:.0f} MiB limit (hbpjax._analysis.chains.STACK_LIMIT): left to backprop"
        )
    info = StackInfo(
        source=user_source(first), kind="chain", length=chain.length,
        carry=(jax.ShapeDtypeStruct(aval.shape, aval.dtype),), residual=split.kinds, converted=converted,
        reason=reason, period=chain.period, last_source=user_source(last),
    )
    return Found(info, stack if converted else None)


def miss(miss: _chains.Miss) -> StackInfo:
    """The row of residual blocks that do not make a chain."""
    return StackInfo(
        source=user_source(miss.first), kind="chain", length=miss.joins, carry=(), residual=(), converted=False,
        reason=miss.reason,
    )


#: Automatic stacks of this many layers or fewer that convolve with a kernel per layer are
#: linearized layer by layer on a CPU.
UNROLL_CONVOLUTIONS = 64
#: Automatic stacks of this many layers or fewer that multiply by matrices of their own, of at
#: least ``UNROLL_MATMUL_FLOPS`` floating-point operations per layer, are linearized layer by layer
#: on a CPU.
UNROLL_MATMULS = 16
UNROLL_MATMUL_FLOPS = 2**24
_LAYER, _CARRY = 1, 2


def _linearized_for(stack):
    """An automatic stack, linearized as suits the backend: vmapped, except on a CPU for short
    stacks whose layers convolve with a kernel of their own, or multiply by matrices of their own
    (at any depth of the step: inside its calls, scans and conds) large enough for the matmuls to
    dominate. Vmapped, those become grouped convolutions and batched matmuls, which XLA's CPU
    backend runs slower than the separate ones: the layers are linearized one by one instead,
    still independently of each other. Small matmuls stay vmapped (one op for all layers instead
    of one per layer), and so do the matmuls of steps under a checkpoint, which keep their own way
    (a group of layers at a time, as their policy says). The bounds come from
    ``benchmarks/real_models.py`` (unrolled faster at 17 to 470 MFLOP per layer), ``chains.py`` and
    ``compile_cost.py`` (slower, and slower to compile, at 2 to 8 MFLOP per layer); see
    docs/performance.md."""
    if jax.default_backend() != "cpu":
        return stack
    body = stack.body.jaxpr
    carry = stack.num_consts + stack.num_carry
    labels = {**dict.fromkeys(body.invars[stack.num_consts : carry], _CARRY), **dict.fromkeys(body.invars[carry:], _LAYER)}
    flops = 0
    for eqn, (lhs, rhs, *_) in operand_labels(body.eqns, labels, (primitives.CONVOLUTION, primitives.MATMUL)):
        if eqn.primitive.name == primitives.CONVOLUTION:
            if rhs & _LAYER and stack.length <= UNROLL_CONVOLUTIONS:
                return _unrolled(stack)
        elif (lhs | rhs) & _LAYER and lhs and rhs:  # a matmul by the layer's own matrix
            flops += _matmul_flops(eqn)
    if flops >= UNROLL_MATMUL_FLOPS and stack.length <= UNROLL_MATMULS and stack.remat is None:
        return _unrolled(stack)
    return stack


def _matmul_flops(eqn: core.JaxprEqn) -> int:
    """The floating-point operations of one ``dot_general`` (two per multiply-add)."""
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs: Any = eqn.invars[0].aval
    out: Any = eqn.outvars[0].aval
    return 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in contract)


def _unrolled(stack):
    return dataclasses.replace(stack, options=dataclasses.replace(stack.options, linearize="unroll"))


def _no_path_reason(stack) -> str:
    """Why a step has no residual path, naming what computes its new carry when that is a wrapper
    the split cannot read."""
    jaxpr = stack.flat.jaxpr
    outs = {jaxpr.outvars[i] for i in stack.diff if isinstance(jaxpr.outvars[i], core.Var)}
    opaque = sorted({primitives.name(e) for e in jaxpr.eqns if outs.intersection(e.outvars) and sub_jaxprs(e)})
    if opaque:
        return f"the step's new carry comes out of {', '.join(opaque)}, which the split cannot read through: exact backprop"
    if not stack.diff:
        return "no floating-point carry: nothing to differentiate along the scan (exact)"
    return "no carry leaf has a residual path (h_new is not h plus or times something): exact backprop"
