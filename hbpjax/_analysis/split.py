"""The residual split of a step, found from its jaxpr.

For a step ``h_new = f(h, inputs)`` traced to a jaxpr, and one carry leaf ``h_p``, call a value
*diagonal in* ``h_p`` if it is ``h_p`` itself, or the output (of ``h_p``'s shape, floating point) of
an elementwise equation that reads at least one value diagonal in ``h_p``. Elementwise equations
are the primitives in :data:`ELEMENTWISE` and calls (``jit``, ``custom_jvp_call``) whose inner
jaxpr is elementwise on those values (``jax.nn.relu``, ``jnp.where``, ...). Every other use of a
value diagonal in ``h_p`` is a *cut*: a reduction, a matmul, a reshape, a gather, an unknown
primitive, or anything the caller marks opaque (the block of a ``residual_scan``). A cut's output,
and every value that depends on another carry leaf, belong to the block.

Then, per carry leaf ``h_p`` whose new value is diagonal in ``h_p``::

    residual_p(h_p, z) = the diagonal equations from h_p to its new value      (elementwise in h_p)
    z                  = the other values those equations read (cut values, other leaves, inputs)

and ``K_p = d residual_p / d h_p`` is diagonal. A leaf whose new value is not diagonal in itself has
``residual_p(h, z) = z_p`` and ``K_p = 0``. Whatever the split, ``K + J`` is the step's whole
Jacobian, so Highway-BP with ``k >= L`` sweeps is exact; the split only decides how good a small
``k`` is. Unknown primitives are cuts, never errors: the split may miss a residual path, never make
a wrong one.

Examples (what the rule gives): ``x + mlp(layer_norm(x))`` has ``K = 1``; ``relu(x + y)`` the ReLU
mask; a GRU ``(1 - u) * n + u * h`` has ``K = u``; an LSTM ``c' = f * c + i * g`` has ``K_c = f`` and
``h' = o * tanh(c')`` has ``K_h = 0`` (it reads ``c'``, which depends on another leaf); a running
mean ``m' = 0.9 m + 0.1 h'`` has ``K_m = 0.9``; ``layer_norm(h + z)`` has ``K = gain / std`` (the
mean and the variance are cuts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core

from . import primitives
from .bounds import k_bound
from .jaxprs import Atom, bind, closed_env, evaluate, run

IDENTITY, DIAGONAL, NONE = "identity", "diagonal", "none"

@dataclasses.dataclass(frozen=True)
class ResidualSplit:
    """A step's residual split (see the module docstring).

    Attributes:
      kinds: per carry leaf, ``"identity"`` (``K = 1``), ``"diagonal"`` or ``"none"`` (``K = 0``).
      h: per carry leaf, the jaxpr variable holding it.
      outs: per carry leaf, the atom holding its new value.
      z: the values the residual reads besides the carry, computed by the block.
      out_z: per carry leaf of kind ``"none"``, the position in ``z`` of its new value.
      eqns: per carry leaf, the elementwise equations of its residual, in program order.
      positions: per carry leaf, the positions of those equations in the step's jaxpr.
      k_bounds: per carry leaf, an upper bound on ``|K|`` proved from the step (interval
        arithmetic), or ``None`` when none is known (0 for leaves of kind ``"none"``).
    """

    kinds: tuple[str, ...]
    h: tuple[core.Var, ...]
    outs: tuple[Atom, ...]
    z: tuple[Atom, ...]
    out_z: tuple[int | None, ...]
    eqns: tuple[tuple[core.JaxprEqn, ...], ...]
    positions: tuple[tuple[int, ...], ...]
    k_bounds: tuple[float | None, ...] = ()

    @property
    def has_residual_path(self) -> bool:
        return any(kind != NONE for kind in self.kinds)

    def residual(self, h: Sequence, z: Sequence, *, eval_eqn: Callable = bind) -> list:
        """The new carry leaves from the carry leaves ``h`` and the block's values ``z``.

        Each leaf's equations see only its own carry leaf; whatever else they read (another leaf
        included) comes from ``z``, so the carry Jacobian is diagonal by construction.
        """
        out = []
        for p, (var, zi) in enumerate(zip(self.outs, self.out_z)):
            if zi is not None:
                out.append(z[zi])
                continue
            env = {v: value for v, value in zip(self.z, z) if isinstance(v, core.Var)}
            env[self.h[p]] = h[p]
            out.append(evaluate(self.eqns[p], env, [var], eval_eqn=eval_eqn)[0])
        return out


def residual_split(
    jaxpr: core.Jaxpr,
    h: Sequence[core.Var],
    outs: Sequence[Atom],
    *,
    opaque: Callable[[core.JaxprEqn], bool] = lambda eqn: False,
) -> ResidualSplit:
    """The residual split of ``jaxpr`` for carry leaves ``h`` whose new values are ``outs``.

    Args:
      jaxpr: the step's jaxpr (the body of a scan, or a residual function).
      h: the variables of the differentiated carry leaves (a subset of ``jaxpr.invars``).
      outs: per leaf, the atom (usually one of ``jaxpr.outvars``) with its new value.
      opaque: equations to treat as cuts whatever they are (a ``residual_scan``'s block).
    """
    h, outs = tuple(h), tuple(outs)
    producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    z: list = []

    def add_z(atom):
        if isinstance(atom, core.Literal) or atom not in z:
            z.append(atom)
        return len(z) - 1 if isinstance(atom, core.Literal) else z.index(atom)

    kinds: list = []
    out_z: list = []
    eqns: list[tuple] = []
    positions: list[tuple] = []
    position = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
    for p, out in enumerate(outs):
        layouts: dict = {}
        diag: dict = _classify(jaxpr.eqns, {h[p]: p}, {p: h[p].aval}, opaque, layouts=layouts)  # type: ignore[assignment]  # this leaf alone is the carry
        if not (isinstance(out, core.Var) and diag.get(out) == p and layouts.get(out, _plain(h[p].aval)) == _plain(h[p].aval)):
            kinds.append(NONE)
            out_z.append(add_z(out))  # the new value is the block's (K = 0)
            eqns.append(())
            positions.append(())
            continue
        path: set[int] = set()
        todo = [out]
        while todo:
            var = todo.pop()
            if var is h[p] or position[var] in path:
                continue
            path.add(position[var])
            for a in producer[var].invars:
                if isinstance(a, core.Var) and diag.get(a) == p:
                    todo.append(a)
                elif isinstance(a, core.Var):
                    add_z(a)
        kinds.append(_kind(out, h[p], p, diag, producer))
        out_z.append(None)
        eqns.append(tuple(jaxpr.eqns[i] for i in sorted(path)))
        positions.append(tuple(sorted(path)))
    bounds = tuple(
        0.0 if zi is not None else k_bound(jaxpr, h[p], outs[p], eqns[p]) for p, zi in enumerate(out_z)
    )
    return ResidualSplit(tuple(kinds), h, outs, tuple(z), tuple(out_z), tuple(eqns), tuple(positions), bounds)


@dataclasses.dataclass(frozen=True)
class Remat:
    """The ``jax.checkpoint`` a step was wrapped in (``nnx.remat``, ``nn.remat``): its policy
    (``None``: save nothing) and ``prevent_cse``."""

    policy: Callable | None
    prevent_cse: bool


def read_through(body: core.ClosedJaxpr, carry: Sequence[int], *, keep: Callable = lambda eqn: False):
    """``(flat, remat, rule)``: ``body`` with the wrappers around its residual path evaluated by
    their contents, the checkpoint among them (``None`` if there is none) and whether one of them
    is a custom derivative rule.

    A wrapper (``jit``, ``pjit``, a checkpoint) is read through when it computes a new value of a
    carry leaf in ``carry`` (positions among the body's outputs) from the carry, so the residual
    path inside it is found (``nnx.scan`` over ``nnx.remat`` layers, ``lax.scan`` of a
    ``jax.checkpoint``-ed step). Wrappers that only compute part of the block stay whole (a cut).
    ``keep`` names wrappers never to read through. The derivative of a wrapper is that of its
    contents, so the flat step has the body's Jacobian; a checkpoint's memory meaning is returned
    for the stack to keep.
    """
    remat, rule = None, False
    for _ in range(8):  # wrappers nest a few deep at most (a jit around a remat)
        jaxpr = body.jaxpr
        carry_out = {jaxpr.outvars[i] for i in carry if isinstance(jaxpr.outvars[i], core.Var)}
        wrapped = {
            eqn for eqn in jaxpr.eqns
            if primitives.call(eqn) is not None and not keep(eqn) and carry_out.intersection(eqn.outvars)
            and len(primitives.inner(eqn)[0].invars) == len(eqn.invars)
        }
        if not wrapped:
            break
        for eqn in jaxpr.eqns:
            if eqn in wrapped and primitives.is_checkpoint(eqn) and remat is None:
                remat = Remat(eqn.params.get("policy"), bool(eqn.params.get("prevent_cse", True)))
            rule = rule or (eqn in wrapped and primitives.is_rule(eqn))

        def inline(eqn, invals, wrapped=wrapped):
            if eqn not in wrapped:
                return bind(eqn, invals)
            inner, consts = primitives.inner(eqn)
            return run(inner, {**dict(zip(inner.constvars, consts)), **dict(zip(inner.invars, invals))})

        shaped: list[Any] = [v.aval for v in jaxpr.invars]
        avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in shaped]
        body = jax.make_jaxpr(lambda *a, body=body, inline=inline: run(body.jaxpr, closed_env(body, a), eval_eqn=inline))(*avals)
    return body, remat, rule


def _classify(eqns, diag: dict, h_avals: dict, opaque, strict: bool = False, layouts: dict | None = None) -> dict | None:
    """``{var: leaf}`` for every value diagonal in a carry leaf. With ``strict``, ``None`` as soon as
    a value read from the carry is used in a cut (the test for an elementwise call's body).

    ``layouts`` (filled in where given) holds how each diagonal value's elements lie, where that is
    not the carry leaf's own layout: ``(perm, shape)``, the value being an elementwise function of
    the leaf transposed by ``perm`` and then reshaped to ``shape`` (an ``einsum("bi,i->bi", h, a)``
    computes ``h * a`` with the batch axis last, then transposes it back).
    """
    diag = dict(diag)
    layouts = {} if layouts is None else layouts
    for eqn in eqns:
        found = None if opaque(eqn) else _diagonal_leaf(eqn, diag, h_avals, layouts)
        if found is not None:
            leaf, layout = found
            diag.update((v, leaf) for v in eqn.outvars)
            if layout != _plain(h_avals[leaf]):
                layouts.update((v, layout) for v in eqn.outvars)
        elif strict and not primitives.is_flag(eqn) and any(isinstance(a, core.Var) and a in diag for a in eqn.invars):
            return None
    return diag


def _plain(aval) -> tuple:
    """The layout of a carry leaf itself: no transposition, its own shape."""
    return tuple(range(len(aval.shape))), tuple(aval.shape)


def _diagonal_leaf(eqn, diag: dict, h_avals: dict, layouts: dict | None = None) -> tuple | None:
    """``(leaf, layout)``: the carry leaf ``eqn``'s outputs are diagonal in, and how their elements
    lie (see :func:`_classify`); ``None`` if ``eqn`` is a cut."""
    leaves = {diag[a] for a in eqn.invars if isinstance(a, core.Var) and a in diag}
    if len(leaves) != 1:
        return None  # reads no carry leaf, or mixes two
    (leaf,) = leaves
    want = h_avals[leaf]
    if not all(_is_float(v.aval) for v in eqn.outvars):
        return None
    layouts = {} if layouts is None else layouts
    on_path = [(i, a) for i, a in enumerate(eqn.invars) if isinstance(a, core.Var) and diag.get(a) == leaf]
    in_layouts = {layouts.get(a, _plain(want)) for _, a in on_path}
    if len(in_layouts) != 1:
        return None  # two values of the leaf whose elements lie differently
    (layout,) = in_layouts
    if len(on_path) == 1 and len(eqn.outvars) == 1:
        changed = primitives.layout_change(eqn, on_path[0][0], layout, want.shape)
        if changed is not None:
            return leaf, changed
    if any(getattr(v.aval, "shape", None) != layout[1] for v in eqn.outvars):
        return None
    if primitives.is_elementwise(eqn):
        return leaf, layout
    if layout != _plain(want):
        return None
    inner = primitives.elementwise_body(eqn)
    if inner is not None:
        inner_diag = {iv: 0 for iv, a in zip(inner.invars, eqn.invars) if isinstance(a, core.Var) and diag.get(a) == leaf}
        found = _classify(inner.eqns, inner_diag, {0: want}, lambda e: False, strict=True)
        if found is not None and all(isinstance(o, core.Var) and o in found for o in inner.outvars):
            return leaf, layout
    return None


def elementwise_in(eqn, a: core.Var) -> bool:
    """Whether ``eqn``'s outputs are elementwise functions of its operand ``a``, in ``a``'s layout."""
    return _diagonal_leaf(eqn, {a: 0}, {0: a.aval}) == (0, _plain(a.aval))


def _kind(out, h_var, leaf: int, diag: dict, producer: dict) -> str:
    """``"identity"`` if the path from ``h_var`` to ``out`` only adds values to it (``K = 1``)."""
    var = out
    while var is not h_var:
        eqn = producer[var]
        on_path = [a for a in eqn.invars if isinstance(a, core.Var) and diag.get(a) == leaf]
        if len(on_path) == 1 and primitives.keeps_unit_slope(eqn, on_path[0]):
            var = on_path[0]
        else:
            return DIAGONAL
    return IDENTITY


def _is_float(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
