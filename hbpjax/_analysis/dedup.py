"""A forward evaluated with each computation it repeats evaluated once.

A stack's forward step computes the layer and then its linearization, whose primal part repeats
the layer's own equations. Traced once, with plain calls inlined and the repeated equations
removed, the forward runs each layer once instead of leaving XLA to find the repetition (its
simplifier may rewrite the two copies differently before its own CSE sees them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core

from . import primitives
from .jaxprs import bind, closed_env, run


def traced_once(fun: Callable, *args) -> Callable:
    """``fun`` traced at ``args``, as a function that evaluates it on arguments of the same shapes
    with each computation it repeats evaluated once (:func:`traced_once_jaxpr`), effects included.
    Only for a forward that is not differentiated: ``custom_jvp`` functions are evaluated by their
    bodies."""
    closed, tree = traced_once_jaxpr(fun, *args)

    def evaluate(*args):
        return jax.tree.unflatten(tree, run(closed.jaxpr, closed_env(closed, jax.tree.leaves(args))))

    return evaluate


def traced_once_jaxpr(fun: Callable, *args) -> tuple[core.ClosedJaxpr, Any]:
    """What :func:`traced_once` evaluates: ``fun``'s trace at ``args`` (inputs: the leaves of
    ``args``) with plain calls inlined and repeated equations removed, and its output structure."""
    closed, shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    # Calls inlined first: the linearization computes a jitted function's primal inside another
    # call than the step's (partial evaluation adds the residuals to its outputs).
    flat = jax.make_jaxpr(lambda *a: run(closed.jaxpr, closed_env(closed, a), eval_eqn=_inlined))(*jax.tree.leaves(args))
    return core.ClosedJaxpr(deduplicate(flat.jaxpr), flat.consts), jax.tree.structure(shape)


def _inlined(eqn: core.JaxprEqn, invals: list) -> list:
    """Evaluates ``eqn``, by the equations of its inner jaxpr where it is a call that only groups
    them (:func:`hbpjax._analysis.primitives.inlined_when_plain`)."""
    if not primitives.inlined_when_plain(eqn) or primitives.aligned_inner(eqn) is None:
        return bind(eqn, invals)
    jaxpr, consts = primitives.inner(eqn)
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, invals))
    return run(jaxpr, env, eval_eqn=_inlined)


def deduplicate(jaxpr: core.Jaxpr) -> core.Jaxpr:
    """``jaxpr`` without the equations that repeat an earlier one (common subexpression
    elimination): the first of equal equations stays, later ones' results are read from it.

    Equations with effects or state (random numbers) are always kept.
    """
    seen: dict = {}
    rename: dict = {}
    eqns = []
    jaxpr_texts: dict = {}
    for eqn in jaxpr.eqns:
        invars = [rename.get(a, a) if isinstance(a, core.Var) else a for a in eqn.invars]
        key = None
        if not (eqn.effects or primitives.is_stateful(eqn)):
            operands = tuple(primitives.literal_key(a) if isinstance(a, core.Literal) else a for a in invars)
            key = (eqn.primitive, operands, primitives.params_key(eqn, jaxpr_texts))
        if key is not None and key in seen:
            rename.update(zip(eqn.outvars, seen[key]))
            continue
        eqns.append(eqn.replace(invars=invars))
        if key is not None and not any(isinstance(v, core.DropVar) for v in eqn.outvars):
            seen[key] = eqn.outvars
    outvars = [rename.get(a, a) if isinstance(a, core.Var) else a for a in jaxpr.outvars]
    return jaxpr.replace(eqns=eqns, outvars=outvars)
