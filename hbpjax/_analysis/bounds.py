"""A static bound on ``|K|``, the residual path's slope, proved from a step's jaxpr.

Interval arithmetic over the step: value ranges (a sigmoid is in [0, 1], a tanh in [-1, 1], ...)
and, along the residual's equations, ranges of the derivative. The rules per primitive are in
:mod:`hbpjax._analysis.primitives`; unknown primitives give the whole real line, so a bound is
never wrong, only sometimes missing.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.extend import core

from . import primitives
from .intervals import ALL, INF, mul
from .jaxprs import computes_complex


def _literal(a) -> tuple:
    """The interval of a literal: its value for a real scalar, unbounded otherwise."""
    if jnp.ndim(a.val) == 0 and not jnp.iscomplexobj(a.val):
        return (float(a.val), float(a.val))
    return ALL


def values(eqns, known: dict) -> dict:
    """An interval containing every value of each variable (``known`` seeds some; others unbounded)."""
    ranges = dict(known)
    get = lambda a: _literal(a) if isinstance(a, core.Literal) else ranges.get(a, ALL)
    for eqn in eqns:
        ins = [get(a) for a in eqn.invars]
        inner = primitives.bounds_inner(eqn)
        if inner is not None:
            inner_ranges = values(inner.eqns, dict(zip(inner.invars, ins)))
            outs = [inner_ranges.get(o, ALL) if isinstance(o, core.Var) else ALL for o in inner.outvars]
            ranges.update(zip(eqn.outvars, outs))
            continue
        out = primitives.value_range(eqn, ins)
        for v in eqn.outvars:
            ranges[v] = out
    return ranges


def slopes(eqns, h, known_values: dict) -> dict:
    """An interval containing d v / d h (elementwise) for every value ``v`` on the path from ``h``."""
    slope = {h: (1.0, 1.0)}
    value = lambda a: _literal(a) if isinstance(a, core.Literal) else known_values.get(a, ALL)
    d = lambda a: slope.get(a, (0.0, 0.0)) if isinstance(a, core.Var) else (0.0, 0.0)
    for eqn in eqns:
        on = [a for a in eqn.invars if isinstance(a, core.Var) and a in slope]
        if not on:
            continue
        inner = primitives.bounds_inner(eqn) if not primitives.is_checkpoint(eqn) else None
        if inner is not None:
            out = _call_slope(eqn, inner, slope, value)
        else:
            out = primitives.slope(eqn, d, value)
        for v in eqn.outvars:
            slope[v] = out
    return slope


def _call_slope(eqn, inner, slope: dict, value) -> tuple:
    """The slope through a call with one input on the path and one output."""
    on_inner = [iv for iv, a in zip(inner.invars, eqn.invars) if isinstance(a, core.Var) and a in slope]
    if len(on_inner) != 1 or len(inner.outvars) != 1:
        return ALL
    (start,) = on_inner
    outer = next(a for a in eqn.invars if isinstance(a, core.Var) and a in slope)
    inner_values = values(inner.eqns, {iv: value(a) for iv, a in zip(inner.invars, eqn.invars)})
    inner_slope = slopes(inner.eqns, start, inner_values).get(inner.outvars[0], ALL)
    return mul(inner_slope, slope[outer])


def k_bound(jaxpr, h, out, eqns) -> float | None:
    """An upper bound on ``|K| = |d out / d h|`` for a leaf's residual, or ``None`` if unknown.

    ``h + z`` gives 1, a GRU's ``z h + (1 - z) n`` gives 1, ``relu(h + z)`` gives 1; a LayerNorm's
    ``gain / std`` is unknown.
    """
    if computes_complex(jaxpr):
        return None  # the ranges are those of real values
    lo, hi = slopes(eqns, h, values(jaxpr.eqns, {})).get(out, ALL)
    bound = max(abs(lo), abs(hi))
    return None if bound == INF else bound
