"""Reading and evaluating jaxprs with JAX's public ``jax.extend.core`` API.

The automatic stacks (:mod:`hbpjax._analysis.conversion`) and the residual split (:mod:`hbpjax._analysis.split`) evaluate
parts of traced programs: the whole of a function, the step of a scan, only the equations a set of
values needs. Every equation is evaluated by binding its primitive with its own parameters, so the
values are those of the traced program, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core, source_info_util

from . import primitives

Atom = Any  # core.Var or core.Literal


def is_float(x) -> bool:
    """Whether a value (or aval) holds real or complex floating-point numbers (differentiable)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        dtype = jnp.result_type(x)
    return dtype != jax.dtypes.float0 and jnp.issubdtype(dtype, jnp.inexact)


def read(env: dict, atom: Atom):
    """The value of a variable, or a literal's constant."""
    return atom.val if isinstance(atom, core.Literal) else env[atom]


def bind(eqn: core.JaxprEqn, invals: Sequence) -> list:
    """Evaluates one equation on ``invals`` (values or tracers); always returns a list.

    The equation traced anew keeps its own source: the user's line (what :func:`user_source` and
    error messages show) and its name stack (its named scopes, :func:`hbpjax.exact` regions
    included), under the current one.
    """
    if primitives.is_custom_jvp(eqn) and _in_manual_region():
        return _custom_jvp_here(eqn, invals)
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    source = getattr(eqn, "source_info", None)
    context: Any = contextlib.nullcontext()
    if source is not None:
        names = source_info_util.current_name_stack() + source.name_stack
        context = source_info_util.user_context(source.traceback, name_stack=names)
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    with context:
        if manager is None:
            out = eqn.primitive.bind(*subfuns, *invals, **params)
        else:
            # The equation's context, except its mesh: the equation may be evaluated again under
            # another one (inside a shard_map over the layers, where that axis is Manual).
            mesh = jax.sharding.get_abstract_mesh()
            with manager, jax.sharding.use_abstract_mesh(mesh):
                out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _in_manual_region() -> bool:
    """Whether the current abstract mesh has a Manual axis (inside a ``shard_map``)."""
    types = getattr(jax.sharding.get_abstract_mesh(), "axis_types", ()) or ()
    return any(t == jax.sharding.AxisType.Manual for t in types)


def _custom_jvp_here(eqn: core.JaxprEqn, invals: Sequence) -> list:
    """A ``custom_jvp`` equation evaluated inside a ``shard_map``: the same function with the same
    rule, each of their equations bound under the current context.

    JAX evaluates a ``custom_jvp``'s body and rule equation by equation, each under the context it
    was traced in, mesh included: traced outside the ``shard_map`` (a stack found in the user's
    function, run inside one over its layers), they would check the values' Manual types against a
    mesh without that Manual axis. Here the body is evaluated by :func:`run`, and the rule is traced
    in its own context (as it was first traced) and evaluated by :func:`run`.
    """
    jaxpr, consts = primitives.inner(eqn)
    num_consts = eqn.params["num_consts"]
    rule = eqn.params["jvp_jaxpr_fun"]

    @jax.custom_jvp
    def function(*args):
        return run(jaxpr, {**dict(zip(jaxpr.constvars, consts)), **dict(zip(jaxpr.invars, args))})

    def function_jvp(primals, tangents):
        with eqn.ctx.manager:
            rule_jaxpr, rule_consts, out_zeros = rule.call_wrapped(*[False] * (len(primals) - num_consts))
        rule_jaxpr = getattr(rule_jaxpr, "jaxpr", rule_jaxpr)
        env = dict(zip(rule_jaxpr.constvars, rule_consts))
        env.update(zip(rule_jaxpr.invars, [*primals[num_consts:], *tangents[num_consts:]]))
        out = run(rule_jaxpr, env)
        out_primals, nonzero = out[: len(out_zeros)], iter(out[len(out_zeros) :])
        out_tangents = [zero_tangent(p) if zero else next(nonzero) for p, zero in zip(out_primals, out_zeros)]
        return out_primals, out_tangents

    function.defjvp(function_jvp)
    return list(function(*invals))


def zero_tangent(value):
    """The zero tangent of a value (``float0`` for integers, keys and booleans)."""
    if is_float(value):
        return jnp.zeros_like(value)
    return np.zeros(jnp.shape(value), jax.dtypes.float0)


def needed(eqns: Sequence[core.JaxprEqn], targets: Iterable[Atom]) -> list[core.JaxprEqn]:
    """The equations, in order, that the ``targets`` depend on."""
    return [eqns[i] for i in needed_positions(eqns, targets)]


def needed_positions(eqns: Sequence[core.JaxprEqn], targets: Iterable[Atom]) -> list[int]:
    """The positions, in order, of the equations that the ``targets`` depend on."""
    want = {a for a in targets if isinstance(a, core.Var)}
    keep = []
    for i in reversed(range(len(eqns))):
        if any(v in want for v in eqns[i].outvars):
            keep.append(i)
            want.update(a for a in eqns[i].invars if isinstance(a, core.Var))
    return keep[::-1]


def depends_on(eqns: Sequence[core.JaxprEqn], sources: Iterable[core.Var], targets: Iterable[Atom]) -> bool:
    """Whether any of ``targets`` is computed from any of ``sources``.

    Calls whose inner jaxpr lines up with the equation (``jit``, checkpoints, ``custom_jvp`` calls)
    are followed inside: an output depends on the inputs its inner computation reads, not on every
    input of the call. Every output of a scan or a ``cond`` depends on all of its inputs.
    """
    reached = _label(eqns, dict.fromkeys(sources, 1), frozenset(), [], into_loops=False)
    return any(isinstance(a, core.Var) and a in reached for a in targets)


def operand_labels(
    eqns: Sequence[core.JaxprEqn], labels: dict, primitive_names: Iterable[str]
) -> list[tuple[core.JaxprEqn, tuple[int, ...]]]:
    """Which sources the equations of some primitives read, at any depth.

    ``labels`` maps input variables to bit flags. For every equation binding one of
    ``primitive_names`` that reads a labelled value, in ``eqns`` or inside the calls, scans and
    conds they hold, the result has the equation and, per operand, the union of the flags of the
    inputs that operand is computed from (0: from none of them). A scan's carry takes the flags its
    step gives it on any trip; a ``cond``'s outputs those of every branch and of the index; the
    outputs of other loops those of all their operands (their insides are not read).

    Example: with ``labels = {w: 1, h: 2}``, a ``dot_general(h, w)`` inside a ``jit`` of the
    equations is found with ``(2, 1)``.
    """
    found: list = []
    _label(eqns, {v: f for v, f in labels.items() if f}, frozenset(primitive_names), found, into_loops=True)
    return found


def _label(eqns, labels: dict, names: frozenset, found: list, *, into_loops: bool) -> dict:
    """``labels`` (variable -> nonzero flags) grown by the equations' outputs."""
    labels = dict(labels)
    for eqn in eqns:
        ins = [labels.get(a, 0) if isinstance(a, core.Var) else 0 for a in eqn.invars]
        if not any(ins):
            continue
        if eqn.primitive.name in names:
            found.append((eqn, tuple(ins)))
        outs = _label_through(eqn, ins, names, found, into_loops=into_loops)
        labels.update((v, f) for v, f in zip(eqn.outvars, outs) if f)
    return labels


def _label_through(eqn, ins: list, names: frozenset, found: list, *, into_loops: bool) -> list:
    """The flags of an equation's outputs, recording the equations found inside it."""

    def inside(jaxpr, flags, found=found) -> dict:
        return _label(jaxpr.eqns, dict(zip(jaxpr.invars, flags)), names, found, into_loops=into_loops)

    def outputs(jaxpr, labels) -> list:
        return [labels.get(o, 0) if isinstance(o, core.Var) else 0 for o in jaxpr.outvars]

    aligned = primitives.aligned_inner(eqn)
    if aligned is not None:
        return outputs(aligned, inside(aligned, ins))
    if into_loops and primitives.is_scan(eqn):
        num_consts, num_carry, body = primitives.scan_layout(eqn)
        body = getattr(body, "jaxpr", body)
        flags, carry = list(ins), slice(num_consts, num_consts + num_carry)
        while True:  # flags only grow: the carry's settle within a few trips
            trial: list = []
            out = outputs(body, inside(body, flags, trial))
            new = [f | o for f, o in zip(flags[carry], out)]
            if new == flags[carry]:
                found.extend(trial)
                return out
            flags[carry] = new
    if into_loops and primitives.is_cond(eqn):
        outs = [ins[0]] * len(eqn.outvars)
        for jaxpr, _ in primitives.branches(eqn):
            outs = [a | b for a, b in zip(outs, outputs(jaxpr, inside(jaxpr, ins[1:])))]
        return outs
    every = 0
    for f in ins:
        every |= f
    return [every] * len(eqn.outvars)


def evaluate(
    eqns: Sequence[core.JaxprEqn],
    env: dict,
    targets: Sequence[Atom],
    *,
    eval_eqn: Callable[[core.JaxprEqn, list], list] = bind,
) -> list:
    """The values of ``targets`` from the inputs in ``env``, evaluating only the equations needed.

    Args:
      eqns: equations of one jaxpr, in order.
      env: values of the variables the needed equations read (inputs, consts); not modified.
      targets: the atoms to compute.
      eval_eqn: how to evaluate one equation (default :func:`bind`; the automatic stacks pass one
        that rewrites nested scans).
    """
    env = dict(env)
    for eqn in needed(eqns, targets):
        for var, value in zip(eqn.outvars, eval_eqn(eqn, [read(env, a) for a in eqn.invars])):
            env[var] = value
    return [read(env, a) for a in targets]


def run(
    jaxpr: core.Jaxpr, env: dict, *, eval_eqn: Callable[[core.JaxprEqn, list], list] = bind
) -> list:
    """Every equation of ``jaxpr`` in order (effects included): its outputs, given its inputs in
    ``env``. ``eval_eqn`` evaluates one equation, as in :func:`evaluate`."""
    env = dict(env)
    for eqn in jaxpr.eqns:
        env.update(zip(eqn.outvars, eval_eqn(eqn, [read(env, a) for a in eqn.invars])))
    return [read(env, a) for a in jaxpr.outvars]


def closed_env(closed: core.ClosedJaxpr, args: Sequence) -> dict:
    """The environment of a closed jaxpr: its constants and its inputs bound to ``args``."""
    env = dict(zip(closed.jaxpr.constvars, closed.consts))
    env.update(zip(closed.jaxpr.invars, args))
    return env


def sub_jaxprs(eqn: core.JaxprEqn) -> list[core.Jaxpr]:
    """The jaxprs an equation holds in its parameters (bodies of scans, jits, conds, ...)."""
    return [getattr(j, "jaxpr", j) for j in core.jaxprs_in_params(eqn.params)]


def computes_complex(jaxpr: core.Jaxpr) -> bool:
    """Whether any equation of ``jaxpr``, at any depth, computes a complex value."""
    for eqn in jaxpr.eqns:
        dtypes = (getattr(v.aval, "dtype", None) for v in eqn.outvars)
        if any(d is not None and jnp.issubdtype(d, jnp.complexfloating) for d in dtypes):
            return True
        if any(computes_complex(sub) for sub in sub_jaxprs(eqn)):
            return True
    return False


def holds(jaxpr: core.Jaxpr, test: Callable[[core.JaxprEqn], bool]) -> bool:
    """Whether any equation of ``jaxpr``, at any depth, passes ``test``."""
    return any(test(eqn) or any(holds(sub, test) for sub in sub_jaxprs(eqn)) for eqn in jaxpr.eqns)
