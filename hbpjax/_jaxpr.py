"""Reading and evaluating jaxprs with JAX's public ``jax.extend.core`` API.

The automatic stacks (:mod:`hbpjax._auto`) and the residual split (:mod:`hbpjax._split`) evaluate
parts of traced programs: the whole of a function, the step of a scan, only the equations a set of
values needs. Every equation is evaluated by binding its primitive with its own parameters, so the
values are those of the traced program, bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

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
    """Evaluates one equation on ``invals`` (values or tracers); always returns a list."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    if manager is not None:
        # The equation's context, except its mesh: the equation may be evaluated again under
        # another one (inside a shard_map over the layers, where that axis is Manual).
        mesh = jax.sharding.get_abstract_mesh()
        with manager, jax.sharding.use_abstract_mesh(mesh):
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def needed(eqns: Sequence[core.JaxprEqn], targets: Iterable[Atom]) -> list[core.JaxprEqn]:
    """The equations, in order, that the ``targets`` depend on."""
    want = {a for a in targets if isinstance(a, core.Var)}
    keep = []
    for eqn in reversed(eqns):
        if any(v in want for v in eqn.outvars):
            keep.append(eqn)
            want.update(a for a in eqn.invars if isinstance(a, core.Var))
    return keep[::-1]


def depends_on(eqns: Sequence[core.JaxprEqn], sources: Iterable[core.Var], targets: Iterable[Atom]) -> bool:
    """Whether any of ``targets`` is computed from any of ``sources``.

    Calls whose inner jaxpr lines up with the equation (``jit``, checkpoints, ``custom_jvp`` calls)
    are followed inside: an output depends on the inputs its inner computation reads, not on every
    input of the call.
    """
    reached = _reached(eqns, set(sources))
    return any(isinstance(a, core.Var) and a in reached for a in targets)


def _reached(eqns: Sequence[core.JaxprEqn], reached: set) -> set:
    reached = set(reached)
    for eqn in eqns:
        hit = [isinstance(a, core.Var) and a in reached for a in eqn.invars]
        if not any(hit):
            continue
        inner = _aligned_call(eqn)
        if inner is None:
            reached.update(eqn.outvars)
            continue
        inside = _reached(inner.eqns, {v for v, h in zip(inner.invars, hit) if h})
        reached.update(o for o, io in zip(eqn.outvars, inner.outvars) if isinstance(io, core.Var) and io in inside)
    return reached


#: Call-like primitives and the parameter holding the jaxpr they evaluate on their operands.
_CALL_JAXPRS = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr", "remat2": "jaxpr",
}


def _aligned_call(eqn: core.JaxprEqn):
    """The inner jaxpr of a call whose inputs and outputs are the equation's, else ``None``."""
    key = _CALL_JAXPRS.get(eqn.primitive.name)
    inner = eqn.params.get(key) if key else None
    inner = getattr(inner, "jaxpr", inner)
    if inner is None or len(inner.invars) != len(eqn.invars) or len(inner.outvars) != len(eqn.outvars):
        return None
    return inner


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


def traced_once(fun: Callable, *args) -> Callable:
    """``fun`` traced at ``args``, as a function that evaluates it on arguments of the same shapes
    with each computation it repeats evaluated once.

    The trace has its plain calls inlined (:func:`_inlined`) and its equations that repeat an
    earlier one (same primitive, parameters and operands) dropped in favour of the earlier one's
    results (:func:`deduplicate`); the rest are evaluated in order, effects included. A stack's
    forward step computes the layer and then its linearization, whose primal part repeats the
    layer's own equations: evaluated this way, the forward runs each layer once instead of leaving
    XLA to find the repetition (its simplifier may rewrite the two copies differently before its
    own CSE sees them). Only for a forward that is not differentiated: ``custom_jvp`` functions are
    evaluated by their bodies.
    """
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


#: Calls :func:`_inlined` evaluates by their contents.
_INLINED = frozenset({"jit", "pjit", "custom_jvp_call"})


def _inlined(eqn: core.JaxprEqn, invals: list) -> list:
    """Evaluates ``eqn``, by the equations of its inner jaxpr where it is a call that only groups
    them: a ``jit`` without shardings, layouts or donations, a ``custom_jvp`` function (its rule
    says how to differentiate it; what it computes is its body)."""
    name = eqn.primitive.name
    plain = name in _INLINED and (name == "custom_jvp_call" or _plain_jit(eqn))
    if not plain or _aligned_call(eqn) is None:
        return bind(eqn, invals)
    inner = eqn.params[_CALL_JAXPRS[name]]
    return run(inner.jaxpr, closed_env(inner, invals), eval_eqn=_inlined)


def _plain_jit(eqn: core.JaxprEqn) -> bool:
    """Whether a ``jit`` equation sets no sharding, layout or donation of its own."""
    params = eqn.params
    unset = lambda values: all(v is None or type(v).__name__ == "UnspecifiedValue" for v in values)
    return (
        unset(params.get("in_shardings", ())) and unset(params.get("out_shardings", ()))
        and unset(params.get("in_layouts", ())) and unset(params.get("out_layouts", ()))
        and not any(params.get("donated_invars", ()))
    )


def deduplicate(jaxpr: core.Jaxpr) -> core.Jaxpr:
    """``jaxpr`` without the equations that repeat an earlier one (common subexpression
    elimination): the first of equal equations stays, later ones' results are read from it.

    Equations with effects, and those whose parameters cannot be hashed (:func:`_param_key`), are
    always kept.
    """
    seen: dict = {}
    rename: dict = {}
    eqns = []
    jaxpr_keys: dict = {}
    for eqn in jaxpr.eqns:
        invars = [rename.get(a, a) if isinstance(a, core.Var) else a for a in eqn.invars]
        key = None if eqn.effects or eqn.primitive.name in _STATEFUL else _equation_key(eqn, invars, jaxpr_keys)
        if key is not None and key in seen:
            rename.update(zip(eqn.outvars, seen[key]))
            continue
        eqns.append(eqn.replace(invars=invars))
        if key is not None and not any(isinstance(v, core.DropVar) for v in eqn.outvars):
            seen[key] = eqn.outvars
    outvars = [rename.get(a, a) if isinstance(a, core.Var) else a for a in jaxpr.outvars]
    return jaxpr.replace(eqns=eqns, outvars=outvars)


#: Primitives whose results are not a function of their operands.
_STATEFUL = frozenset({"rng_uniform"})

#: Parameters of ``custom_jvp_call`` that say how to differentiate it, not what it computes.
_DERIVATIVE_PARAMS = frozenset({"jvp", "jvp_jaxpr_fun", "jvp_jaxpr_thunk", "symbolic_zeros"})


def _equation_key(eqn: core.JaxprEqn, invars: list, jaxpr_keys: dict):
    """A hashable key equal for equations that compute the same values, else ``None``."""
    try:
        operands = tuple(_atom_key(a) for a in invars)
        skip = _DERIVATIVE_PARAMS if eqn.primitive.name == "custom_jvp_call" else frozenset()
        params = tuple(
            (name, _param_key(value, jaxpr_keys)) for name, value in sorted(eqn.params.items()) if name not in skip
        )
        key = (eqn.primitive, operands, params)
        hash(key)
    except (_Incomparable, TypeError):
        return None
    return key


class _Incomparable(Exception):
    pass


def _atom_key(atom: Atom):
    if isinstance(atom, core.Literal):
        value = np.asarray(atom.val)
        return ("literal", value.dtype.str, value.shape, value.tobytes(), str(atom.aval))
    return atom


def _param_key(value, jaxpr_keys: dict):
    """A hashable stand-in for a parameter value: inner jaxprs by their text (and constants by
    identity), arrays by their bytes, sequences element by element, anything else by its own hash
    (functions by identity); what cannot be hashed raises :class:`_Incomparable`."""
    if isinstance(value, core.ClosedJaxpr | core.Jaxpr):
        # jax >= 0.12: a jaxpr can be its own closed form (``.jaxpr`` is itself, ``.consts`` its own)
        jaxpr = getattr(value, "jaxpr", value)
        consts = getattr(value, "consts", None) or ()
        if id(jaxpr) not in jaxpr_keys:
            jaxpr_keys[id(jaxpr)] = (jaxpr, str(jaxpr))  # holds the jaxpr: its id stays its own
        return ("jaxpr", jaxpr_keys[id(jaxpr)][1], tuple(id(c) for c in consts))
    if isinstance(value, np.ndarray | jax.Array):
        value = np.asarray(value)
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, tuple | list):
        return (type(value).__name__, *(_param_key(v, jaxpr_keys) for v in value))
    try:  # functions and other objects compare by identity: only the same object matches
        hash(value)
    except TypeError:
        raise _Incomparable from None
    return value


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


def holds(jaxpr: core.Jaxpr, primitive: str) -> bool:
    """Whether any equation of ``jaxpr``, at any depth, is a ``primitive``."""
    return any(eqn.primitive.name == primitive or any(holds(sub, primitive) for sub in sub_jaxprs(eqn)) for eqn in jaxpr.eqns)


def scope(eqn: core.JaxprEqn) -> str:
    """The equation's name stack as a string (``"outer/inner"``, transforms as ``"vmap(...)"``)."""
    source = getattr(eqn, "source_info", None)
    return str(getattr(source, "name_stack", "") or "")


def in_scope(eqn: core.JaxprEqn, name: str) -> bool:
    """Whether the equation was traced inside ``jax.named_scope(name)`` (at any depth)."""
    return re.search(r"(^|[/(])" + re.escape(name) + r"($|[/)\[])", scope(eqn)) is not None


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    """Directories of the libraries between the user's code and a traced equation."""
    dirs = [os.path.dirname(__file__)]  # hbpjax/ itself (hbpjax/examples/ is user code: see below)
    for module in ("jax", "jaxlib", "flax", "optax", "equinox"):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(spec.origin))
    return tuple(os.path.join(d, "") for d in dirs)


def user_source(eqn: core.JaxprEqn) -> str:
    """``file:line`` of the innermost frame of the user's code that traced ``eqn``."""
    traceback = getattr(getattr(eqn, "source_info", None), "traceback", None)
    frames = list(getattr(traceback, "frames", None) or [])
    examples = os.path.join(os.path.dirname(__file__), "examples", "")
    for frame in frames:  # innermost first
        name = frame.file_name
        library = name.startswith(_library_dirs()) and not name.startswith(examples)
        if not library and not name.startswith("<frozen "):
            return f"{frame.file_name}:{frame.line_num}"
    if frames:
        return f"{frames[0].file_name}:{frames[0].line_num}"
    return "<unknown>"


def scan_layout(eqn: core.JaxprEqn) -> tuple[int, int, Any]:
    """``(num_consts, num_carry, body)`` of a ``scan`` equation, whatever the JAX version.

    Up to jax 0.11 the parameters hold the counts (``num_consts``, ``num_carry``) and the body as a
    ``ClosedJaxpr``. From jax 0.12 they describe the operands as one ``(consts, carry, xs)`` tree
    (``ft_in``: ``unpack()`` gives the three parts, ``len`` of each its number of leaves) and hold
    the body as a ``Jaxpr`` that is also its own closed form (``.jaxpr``, ``.consts``). In both, the
    equation's operands are consts, carry and xs, and its results the new carry then the per-step
    outputs the body computes.
    """
    params = eqn.params
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"], params["jaxpr"]
    consts, carry, xs = params["ft_in"].unpack()
    if len(consts) + len(carry) + len(xs) != len(eqn.invars):  # a layout this code does not know
        raise NotImplementedError(f"hbpjax: unrecognised scan parameters {sorted(params)} in this JAX version.")
    return len(consts), len(carry), params["jaxpr"]

