"""What hbpjax knows about JAX's primitives: the one table, by name.

Every other module asks here instead of comparing primitive names: which equations call an inner
program (where it sits, how the conversion evaluates it by its contents), which act elementwise
(the residual split's "diagonal" steps) and which are cuts, the ranges and slopes the bounds on
``K`` read, what is costly to recompute or worth taking out of a loop, and the one key that says
two equations compute the same thing. A JAX release that renames or adds a primitive is a change
to this module alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from .intervals import ALL, INF, add, mul, neg, union

# ------------------------------------------------------------------------ call-like primitives

#: How the conversion evaluates a call by its contents: under ``jax.jit`` again (its name kept),
#: under ``jax.checkpoint`` again (its policy kept), inline (the call only names its contents), or
#: not at all (a custom derivative rule: its contents run as traced, kept exact).
JIT, REMAT, INLINE, RULE = "jit", "remat", "inline", "rule"


@dataclasses.dataclass(frozen=True)
class Call:
    """A call-like primitive: the parameter holding its inner program and how it is evaluated."""

    param: str
    contents: str
    #: the split counts it as elementwise when its inner program is (``jax.nn.relu`` is a jit)
    elementwise_body: bool = False


CALLS = {
    "jit": Call("jaxpr", JIT, elementwise_body=True),
    "pjit": Call("jaxpr", JIT, elementwise_body=True),
    "closed_call": Call("call_jaxpr", INLINE, elementwise_body=True),
    "core_call": Call("call_jaxpr", INLINE),
    "checkpoint": Call("jaxpr", REMAT),
    "remat": Call("jaxpr", REMAT),
    "remat2": Call("jaxpr", REMAT),
    "custom_jvp_call": Call("call_jaxpr", RULE, elementwise_body=True),
    "custom_vjp_call": Call("call_jaxpr", RULE),
}
_SCAN, _COND, _WHILE = "scan", "cond", "while"
#: Operations that may read a layer's own weights (kernel, matrix): how a stack is linearized.
CONVOLUTION, MATMUL = "conv_general_dilated", "dot_general"
#: custom_jvp functions whose rule is the derivative of their body (so the body can be analysed).
_KNOWN_CUSTOM_JVP = frozenset({"relu", "relu6"})
#: Parameters that say how to differentiate an equation, or that are made afresh at every call of
#: the same function (thunks of a custom rule): two equations compute the same values without them.
_PER_CALL_PARAMS = frozenset({"jvp", "jvp_jaxpr_fun", "jvp_jaxpr_thunk", "fwd_jaxpr_thunk", "out_trees", "symbolic_zeros"})


def name(eqn: core.JaxprEqn) -> str:
    return eqn.primitive.name  # for messages


def call(eqn: core.JaxprEqn) -> Call | None:
    """The :class:`Call` entry of a call-like equation, else ``None``."""
    return CALLS.get(eqn.primitive.name)


def contents(eqn: core.JaxprEqn) -> str | None:
    """How a call is evaluated by its contents (:data:`JIT`, :data:`REMAT`, :data:`INLINE`,
    :data:`RULE`), or ``None`` for an equation that is not a call."""
    return getattr(call(eqn), "contents", None)


def inner(eqn: core.JaxprEqn) -> tuple[core.Jaxpr, Sequence]:
    """``(jaxpr, consts)`` of a call-like equation."""
    value = eqn.params[CALLS[eqn.primitive.name].param]
    return getattr(value, "jaxpr", value), getattr(value, "consts", None) or ()


def aligned_inner(eqn: core.JaxprEqn) -> core.Jaxpr | None:
    """The inner jaxpr of a call whose inputs and outputs are the equation's, else ``None``."""
    if eqn.primitive.name not in CALLS:
        return None
    jaxpr, _ = inner(eqn)
    aligned = len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars)
    return jaxpr if aligned else None


def call_name(eqn: core.JaxprEqn) -> str:
    """The name a ``jit`` shows in jaxprs (the jitted function's)."""
    return str(eqn.params.get("name", eqn.primitive.name))


def is_checkpoint(eqn: core.JaxprEqn) -> bool:
    return contents(eqn) == REMAT


def is_rule(eqn: core.JaxprEqn) -> bool:
    """A custom derivative rule (``custom_jvp``, ``custom_vjp``)."""
    return contents(eqn) == RULE


def is_custom_jvp(eqn: core.JaxprEqn) -> bool:
    return eqn.primitive.name == "custom_jvp_call"


def is_custom_vjp(eqn: core.JaxprEqn) -> bool:
    return eqn.primitive.name == "custom_vjp_call"


def inlined_when_plain(eqn: core.JaxprEqn) -> bool:
    """A call a forward that is not differentiated may evaluate by its contents: a ``jit`` that
    sets no sharding, layout or donation of its own, a ``custom_jvp`` function (its rule says how
    to differentiate it; what it computes is its body) or a checkpoint (what it saves matters to a
    backward only)."""
    if is_custom_jvp(eqn) or is_checkpoint(eqn):
        return True
    if contents(eqn) != JIT:
        return False
    params = eqn.params
    unset = lambda values: all(v is None or type(v).__name__ == "UnspecifiedValue" for v in values)
    return (
        unset(params.get("in_shardings", ())) and unset(params.get("out_shardings", ()))
        and unset(params.get("in_layouts", ())) and unset(params.get("out_layouts", ()))
        and not any(params.get("donated_invars", ()))
    )


def is_scan(eqn: core.JaxprEqn) -> bool:
    return eqn.primitive.name == _SCAN


def is_cond(eqn: core.JaxprEqn) -> bool:
    return eqn.primitive.name == _COND


def is_loop_or_branch(eqn: core.JaxprEqn) -> bool:
    """``scan``, ``while`` and ``cond``: their outputs are not a single step of a residual stream."""
    return eqn.primitive.name in (_SCAN, _WHILE, _COND)


def scan_layout(eqn: core.JaxprEqn) -> tuple[int, int, Any]:
    """``(num_consts, num_carry, body)`` of a ``scan`` equation (operands: consts, carry, xs; results:
    the new carry, then the per-step outputs). Up to jax 0.11 the parameters hold the counts and a
    ``ClosedJaxpr``; from 0.12 one ``(consts, carry, xs)`` tree (``ft_in``) and a ``Jaxpr`` that is
    its own closed form."""
    params = eqn.params
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"], params["jaxpr"]
    consts, carry, xs = params["ft_in"].unpack()
    if len(consts) + len(carry) + len(xs) != len(eqn.invars):  # a layout this code does not know
        raise NotImplementedError(f"hbpjax: unrecognised scan parameters {sorted(params)} in this JAX version.")
    return len(consts), len(carry), params["jaxpr"]


def branches(eqn: core.JaxprEqn) -> list[tuple[core.Jaxpr, Sequence]]:
    """``[(jaxpr, consts)]`` of a ``cond``'s branches."""
    return [(getattr(b, "jaxpr", b), getattr(b, "consts", None) or ()) for b in eqn.params["branches"]]


def inner_programs(eqn: core.JaxprEqn) -> list[tuple[core.Jaxpr, Sequence]]:
    """``[(jaxpr, consts)]`` a scan, a ``cond`` or a call evaluates (a ``cond``'s branches in order)."""
    if is_scan(eqn):
        body = scan_layout(eqn)[2]
        return [(body.jaxpr, body.consts)]
    if is_cond(eqn):
        return branches(eqn)
    return [inner(eqn)]


# ------------------------------------------------------------- elementwise primitives and cuts

#: Primitives that act elementwise (pointwise) on operands of one shape (scalars broadcast).
ELEMENTWISE = frozenset(
    ["abs", "acos", "acosh", "add", "add_any", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil", "clamp", "conj", "convert_element_type", "copy", "copy_p", "cos", "cosh", "digamma", "div", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "imag", "integer_pow", "lgamma", "log", "log1p", "logistic", "max", "min", "mul", "neg", "nextafter", "pow", "real", "reduce_precision", "rem", "round", "rsqrt", "select_n", "sharding_constraint", "sign", "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh"]
)
#: Pointwise tests: inside an elementwise call they may read the carry (``jnp.where(h > 0, h, 0)``);
#: their boolean outputs carry no derivative.
_FLAGS = frozenset(["eq", "ne", "lt", "le", "gt", "ge", "is_finite", "not", "and", "or", "xor"])
#: Steps of a residual path that keep ``K = 1`` (for the report: "identity" vs "diagonal").
_IDENTITY_STEPS = frozenset({"add", "add_any", "copy", "copy_p", "sharding_constraint", "transpose", "reshape", "squeeze", "broadcast_in_dim"})


def is_elementwise(eqn: core.JaxprEqn) -> bool:
    """An elementwise primitive (a conversion only between floating-point types)."""
    if eqn.primitive.name not in ELEMENTWISE:
        return False
    if eqn.primitive.name == "convert_element_type":
        return all(_is_float(a.aval) for a in eqn.invars if isinstance(a, core.Var))
    return True


def is_flag(eqn: core.JaxprEqn) -> bool:
    return eqn.primitive.name in _FLAGS


def layout_change(eqn: core.JaxprEqn, position: int, layout: tuple, h_shape: tuple) -> tuple | None:
    """The layout of the output of ``eqn`` when it moves the elements of its operand ``position``
    without mixing them, else ``None``: a transpose, a reshape or squeeze (row-major order kept), a
    broadcast that only adds unit axes, or a ``dot_general`` with no contracting dimension whose
    other operand has no free dimension (``jnp.einsum("bi,i->bi", h, a)``: ``h * a``, batch axes
    first). ``layout`` is the operand's ``(perm, shape)``: an elementwise function of ``h``
    transposed by ``perm``, then reshaped to ``shape``."""
    perm, shape = layout
    label, out_shape = eqn.primitive.name, _shape(eqn.outvars[0])
    transposed = shape == tuple(h_shape[p] for p in perm)  # no reshape since the transposition
    if label == "transpose" and transposed:
        return tuple(perm[p] for p in eqn.params["permutation"]), out_shape
    if label == "squeeze" or (label == "reshape" and eqn.params.get("dimensions") is None):
        return perm, out_shape
    if label == "broadcast_in_dim" and int(np.prod(out_shape)) == int(np.prod(shape)):
        dims = tuple(eqn.params["broadcast_dimensions"])
        return (perm, out_shape) if dims == tuple(sorted(dims)) else None
    if label == "dot_general" and transposed:
        (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
        mine, other = (batch_l, batch_r) if position == 0 else (batch_r, batch_l)
        if contract_l or contract_r or len(other) != len(_shape(eqn.invars[1 - position])):
            return None  # contracts, or the other operand adds axes of its own
        free = [d for d in range(len(shape)) if d not in mine]
        return tuple(perm[d] for d in (*mine, *free)), out_shape
    return None


def elementwise_body(eqn: core.JaxprEqn) -> core.Jaxpr | None:
    """The inner program of a call that counts as elementwise when that program is, else ``None``."""
    return aligned_inner(eqn) if getattr(call(eqn), "elementwise_body", False) else None


def keeps_unit_slope(eqn: core.JaxprEqn, on_path: core.Var) -> bool:
    """Whether the path through operand ``on_path`` (the only one on the residual path) has slope
    1: ``h + z``, ``h - z``, a copy."""
    first = isinstance(eqn.invars[0], core.Var) and eqn.invars[0] is on_path
    return eqn.primitive.name in _IDENTITY_STEPS or (eqn.primitive.name == "sub" and first)


def is_stop_gradient(eqn: core.JaxprEqn) -> bool:
    return eqn.primitive.name == "stop_gradient"


def rounds_to_own_precision(eqn: core.JaxprEqn) -> bool:
    """A ``reduce_precision`` of a float32 / float64 to its own precision: a no-op
    (``jax.checkpoint`` puts one on every value it stores)."""
    if eqn.primitive.name != "reduce_precision":
        return False
    dtype = _dtype(eqn.invars[0])
    if dtype not in (jnp.float32, jnp.float64):
        return False
    info = jnp.finfo(dtype)
    return (eqn.params.get("exponent_bits"), eqn.params.get("mantissa_bits")) == (info.nexp, info.nmant)


def passes_value(eqn: core.JaxprEqn) -> bool:
    """Whether ``eqn`` passes its operand's value through (a stop_gradient, a copy, a rounding of a
    float32 / float64 to its own precision, a conversion to its own dtype)."""
    label = eqn.primitive.name
    if label in ("stop_gradient", "copy", "copy_p"):
        return True
    if label == "convert_element_type":
        return _dtype(eqn.invars[0]) == _dtype(eqn.outvars[0])
    return rounds_to_own_precision(eqn)


def _shape(atom) -> tuple:
    return tuple(getattr(atom.aval, "shape", ()))


def _dtype(atom):
    return getattr(atom.aval, "dtype", None)


def _is_float(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


# ------------------------------------------------------------------- ranges and slopes (bounds)

#: Values of these primitives stay in a known range whatever their input.
_RANGES = {"logistic": (0.0, 1.0), "tanh": (-1.0, 1.0), "sin": (-1.0, 1.0), "cos": (-1.0, 1.0), "erf": (-1.0, 1.0)}
#: ... and so do their derivatives: d out / d in lies in this range.
_SLOPES = {"logistic": (0.0, 0.25), "tanh": (0.0, 1.0), "sin": (-1.0, 1.0), "cos": (-1.0, 1.0), "erf": (0.0, 1.13)}
#: Elementwise ops that pass values (and derivatives) through unchanged.
_PASS = frozenset({
    "convert_element_type", "copy", "copy_p", "sharding_constraint", "reduce_precision", "stop_gradient", "transpose",
    "reshape", "squeeze", "broadcast_in_dim",
})


def _contracts(eqn: core.JaxprEqn) -> bool:
    (contract_l, contract_r), _ = eqn.params["dimension_numbers"]
    return bool(contract_l or contract_r)


def bounds_inner(eqn: core.JaxprEqn) -> core.Jaxpr | None:
    """The inner program the bounds read through: a call or checkpoint (a value is the same
    whether or not it is rematerialized), a ``custom_jvp`` only where its rule is its body's."""
    if call(eqn) is None or (is_rule(eqn) and not (is_custom_jvp(eqn) and eqn.params.get("name") in _KNOWN_CUSTOM_JVP)):
        return None
    return aligned_inner(eqn)


def value_range(eqn: core.JaxprEqn, ins: list) -> tuple:
    """An interval holding the output of a one-output primitive, given intervals of its operands."""
    label = eqn.primitive.name
    if label in _RANGES:
        return _RANGES[label]
    if label in _PASS and ins:
        return ins[0]
    rules = {
        "neg": lambda: neg(ins[0]),
        "add": lambda: add(ins[0], ins[1]),
        "add_any": lambda: add(ins[0], ins[1]),
        "sub": lambda: add(ins[0], neg(ins[1])),
        "mul": lambda: mul(ins[0], ins[1]),
        "dot_general": lambda: mul(ins[0], ins[1]) if not _contracts(eqn) else ALL,
        "max": lambda: (max(ins[0][0], ins[1][0]), max(ins[0][1], ins[1][1])),
        "min": lambda: (min(ins[0][0], ins[1][0]), min(ins[0][1], ins[1][1])),
        "select_n": lambda: union(*ins[1:]),
        "abs": lambda: (0.0, INF),
        "square": lambda: (0.0, INF),
    }
    if label == "integer_pow" and eqn.params.get("y", 1) % 2 == 0:
        return (0.0, INF)
    return rules[label]() if label in rules else ALL


def slope(eqn: core.JaxprEqn, d: Callable, value: Callable) -> tuple:
    """An interval holding ``d out / d h`` of a one-output elementwise primitive, given ``d(a)``
    (the interval of ``d a / d h`` of an operand) and ``value(a)`` (the interval of its value)."""
    label, ins = eqn.primitive.name, eqn.invars
    if label in _PASS:
        return (0.0, 0.0) if label == "stop_gradient" else d(ins[0])
    if label in _SLOPES and len(ins) == 1:
        return mul(_SLOPES[label], d(ins[0]))
    rules = {
        "neg": lambda: neg(d(ins[0])),
        "add": lambda: add(d(ins[0]), d(ins[1])),
        "add_any": lambda: add(d(ins[0]), d(ins[1])),
        "sub": lambda: add(d(ins[0]), neg(d(ins[1]))),
        "mul": lambda: add(mul(d(ins[0]), value(ins[1])), mul(d(ins[1]), value(ins[0]))),
        "dot_general": lambda: add(mul(d(ins[0]), value(ins[1])), mul(d(ins[1]), value(ins[0]))) if not _contracts(eqn) else ALL,
        "max": lambda: union((0.0, 0.0), *(d(a) for a in ins)),  # one operand's slope, or none
        "min": lambda: union((0.0, 0.0), *(d(a) for a in ins)),
        "select_n": lambda: union(*(d(a) for a in ins[1:])),
    }
    return rules[label]() if label in rules else ALL


# ---------------------------------------------------------------------- cost of recomputing

#: Primitives worth taking out of a loop when they read per-step inputs only: matmuls,
#: convolutions, gathers, transcendentals, reductions, random bits. Elementwise arithmetic and
#: layout changes stay in the loop, fused into the ops that read them.
_COSTLY = frozenset({
    "dot_general", "conv_general_dilated", "gather", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "sin", "cos", "tan", "erf", "erfc", "erf_inv", "sqrt", "rsqrt", "cbrt", "pow",
    "atan2", "lgamma", "digamma", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax",
    "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort", "random_bits",
    "threefry2x32", "fft",
})
#: Elementwise arithmetic and layout changes: cheap to redo from the values they read, fused into
#: the ops that read them; a linearization does not store their outputs. ``one_minus_square`` is
#: the derivative of ``tanh``, a primitive of its own in newer JAX versions.
_RECOMPUTED = frozenset({
    "abs", "add", "add_any", "broadcast_in_dim", "convert_element_type", "copy", "integer_pow",
    "max", "min", "mul", "neg", "one_minus_square", "reshape", "select_n", "sign", "square",
    "squeeze", "sub", "transpose",
})
#: Primitives whose results are not a function of their operands.
_STATEFUL = frozenset({"rng_uniform"})


def is_costly(eqn: core.JaxprEqn) -> bool:
    """Worth computing once for all steps rather than in every step of a loop."""
    return eqn.primitive.name in _COSTLY


def is_recomputed(primitive) -> bool:
    """Cheap to recompute where it is read (elementwise arithmetic, layout changes): a
    linearization does not store its outputs. Takes a primitive (as checkpoint policies get)."""
    return primitive.name in _RECOMPUTED


def is_stateful(eqn: core.JaxprEqn) -> bool:
    return eqn.primitive.name in _STATEFUL


# ------------------------------------------------------------------------------ equation keys


class _Same:
    """A parameter value that compares by identity (a function, an unhashable object)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self):
        return hash(id(self.value))


def params_key(eqn: core.JaxprEqn, jaxpr_texts: dict) -> tuple:
    """A hashable key of an equation's parameters, equal where two equations of the same primitive
    compute the same function of their operands: inner jaxprs by their text (``jaxpr_texts``
    caches it per jaxpr; constants by identity), arrays by their bytes, sequences element by
    element, functions by identity (a wrapped function by the function it wraps); the parameters of
    a custom rule made afresh at every call are left out."""
    return tuple(
        (key, _value_key(value, jaxpr_texts)) for key, value in sorted(eqn.params.items()) if key not in _PER_CALL_PARAMS
    )


def _value_key(value, jaxpr_texts: dict):
    if isinstance(value, core.ClosedJaxpr | core.Jaxpr):
        # jax >= 0.12: a jaxpr can be its own closed form (``.jaxpr`` is itself, ``.consts`` its own)
        jaxpr = getattr(value, "jaxpr", value)
        consts = getattr(value, "consts", None) or ()
        text = jaxpr_texts.get(jaxpr)
        if text is None:
            text = jaxpr_texts[jaxpr] = str(jaxpr)
        return ("jaxpr", text, tuple(_Same(c) for c in consts))
    if isinstance(value, np.ndarray | jax.Array):
        value = np.asarray(value)
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, tuple | list):
        return (type(value).__name__, *(_value_key(v, jaxpr_texts) for v in value))
    if hasattr(value, "f") and callable(value.f):  # a wrapped function: the same when its function is
        return ("fn", _Same(value.f))
    try:
        hash(value)
    except TypeError:
        return _Same(value)
    return value


def literal_key(atom: core.Literal) -> tuple:
    """A hashable key of a literal operand: its type and bytes."""
    value = np.asarray(atom.val)
    return ("literal", value.dtype.str, value.shape, value.tobytes(), str(atom.aval))
