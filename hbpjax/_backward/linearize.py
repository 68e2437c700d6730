"""Step 1 of the Highway-BP backward: every layer linearized once, all layers at once.

What is linearized is each layer's *block path* (:meth:`hbpjax._stack.Stack.path`): the block,
then the residual with its own carry held fixed. One VJP of it takes the cotangents of all layers'
outputs to the block's term ``J^T y`` and to the cotangents of the layers' inputs (per-layer ``xs``
mapped, shared values broadcast, so shared weights get one summed gradient instead of a ``(L, ...)``
stack). The residual's part of ``J^T y`` (``y * h`` for a gated residual) is computed inside the
VJP, where XLA fuses it into the ops that read it: passed in as the cotangent of ``z`` it would go
through the optimization barrier that ``jax.checkpoint``'s VJP puts on its cotangents, a
carry-sized buffer in every sweep.

How the linearization is kept between the sweeps that read it:

* ``vmap`` (default): one ``jax.vjp`` of the vmapped block path. Read by more than one VJP, it
  stores only what is costly to recompute (:func:`hbpjax._analysis.primitives.is_recomputed` says what is not); read once it
  is kept whole (nothing to save, no work to redo); blocks that compute complex values are kept
  whole (``jax.checkpoint`` cannot store them).
* ``unroll``: one transpose per layer (one ``jax.vjp`` per layer where the backward linearizes),
  still independent of each other (for ops that XLA batches poorly, such as convolutions with
  per-layer kernels on a CPU, and on a CPU, where per-layer matmuls run faster than batched ones).
* ``save_linearization=False``, and steps the user wrapped in a checkpoint: nothing kept; each
  VJP recomputes the layers in groups (within a group, the checkpoint's policy decides what is
  stored between its forward and its backward).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

from .._analysis import jaxprs as _jaxpr
from .._analysis import primitives
from .._analysis.stacks import Stack
from .._front.options import Options

PyTree = Any
tmap = jax.tree.map


@dataclasses.dataclass(frozen=True)
class Linearization:
    """Every layer's block path, linearized.

    Attributes:
      z: the block's values of every layer (what the residual reads; ``K`` comes from them), or
        ``None`` where the forward computed ``K`` itself.
      vjp: ``vjp(after, ct_block) -> (ct_h, ct_xe, ct_consts)``: the cotangents of every layer's
        inputs, given those of its output (``after[j]``) and of its per-step block outputs.
      k_diag: ``K`` of every layer, where the forward computed it (else ``None``).
    """

    z: PyTree
    vjp: Callable
    k_diag: list | None = None


def linearize(stack: Stack, options: Options, h_prev, xe, consts, *, read_once: bool) -> Linearization:
    """Linearizes all layers of ``stack`` at their inputs ``(h_prev, xe)`` and the shared ``consts``.

    Args:
      stack: the stack.
      options: the transform's options (``save_linearization``).
      h_prev: the differentiated carry leaves entering every layer, stacked.
      xe: ``(xs, state leaves entering every layer)``.
      consts: the values shared by all layers.
      read_once: the linearization is read by one VJP only (no sweeps, no per-step block outputs).
    """
    try:
        return _linearize(stack, options, h_prev, xe, consts, read_once=read_once, unroll=stack.options.linearize == "unroll")
    except NotImplementedError as err:  # a primitive with no batching rule (pure_callback without vmap_method)
        if stack.options.linearize == "unroll":
            raise
        length = h_prev[0].shape[0]
        if length > UNROLL_AT_MOST:
            raise Unbatchable(str(err)) from err
        warnings.warn(
            f"hbpjax: a block of {length} layers holds an operation that cannot be vmapped ({_first_line(err)}); "
            "its layers are linearized one by one instead (linearize='unroll'), still in parallel.",
            UnbatchableWarning,
            stacklevel=2,
        )
        return _linearize(stack, options, h_prev, xe, consts, read_once=read_once, unroll=True)


#: A stack whose block cannot be vmapped is linearized layer by layer up to this many layers (the
#: program grows with the layers); a longer one runs exact backprop.
UNROLL_AT_MOST = 64


class UnbatchableWarning(UserWarning):
    """A block holds an operation JAX cannot vmap: its stack is linearized layer by layer, or runs
    exact backprop.

    Highway-BP applies all layers' transposes at once (a ``vmap`` of the block's linearization). A
    ``jax.pure_callback`` without ``vmap_method`` (or a custom primitive without a batching rule) on
    the block's differentiated path cannot be batched; the stack then takes the route that still
    works and says so with this warning (once per trace).

    Examples:
      >>> import warnings, hbpjax
      >>> warnings.simplefilter("ignore", hbpjax.UnbatchableWarning)   # to silence it
    """


class Unbatchable(Exception):
    """The block cannot be vmapped and the stack is too long to linearize layer by layer."""


def _first_line(err) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _linearize(stack, options, h_prev, xe, consts, *, read_once, unroll) -> Linearization:
    path = stack.path
    if unroll:
        whole = read_once or _holds_complex(path, *(tmap(lambda a: a[0], t) for t in (h_prev, xe)), consts)
        block, vjp_of = (path, jax.vjp) if whole else (_lean(path), _vjp_unrounded)
        z, vjp = _unrolled(block, h_prev, xe, consts, vjp=vjp_of)
    elif recomputes(stack, options):
        z, vjp = _in_groups(path, h_prev, xe, consts)
    else:
        whole = read_once or _holds_complex(jax.vmap(path, in_axes=(0, 0, None)), h_prev, xe, consts)
        block, vjp_of = (path, jax.vjp) if whole else (_lean(path), _vjp_unrounded)
        _, vjp, z = vjp_of(jax.vmap(block, in_axes=(0, 0, None)), h_prev, xe, consts, has_aux=True)
    return Linearization(z, lambda after, ct_block: vjp((after, ct_block)))


def recomputes(stack: Stack, options: Options) -> bool:
    """Whether every VJP recomputes the layers' linearization, a group of layers at a time: when
    asked to save memory (``save_linearization=False``), and for a step the user wrapped in a
    checkpoint (so the backward stays within the memory the checkpoint is for)."""
    return not options.save_linearization or stack.remat is not None


def _saved(prim, *avals, **params) -> bool:
    """The ``jax.checkpoint`` policy of the layers' linearization: store what is costly to
    recompute (matmuls, transcendentals, reductions, comparisons, ...), not elementwise arithmetic."""
    return not primitives.is_recomputed(prim)


def _lean(block):
    """``block`` whose linearization (``jax.vjp``) stores only the values :func:`_saved` keeps.

    A VJP recomputes the rest from them, fused into the ops that read it. Left to JAX's own rules,
    the linearization of a GRU cell stores ``u``, ``u (1 - u)``, ``c`` and ``1 - c**2`` (four
    carry-sized stacks, kept through all sweeps); this way only ``u`` and ``c``.
    """
    return jax.checkpoint(block, policy=_saved)


def _holds_complex(fun, *args) -> bool:
    """Whether ``fun`` computes any complex value, or is given one.

    ``jax.checkpoint`` rounds the values it stores with ``reduce_precision``, which JAX does not
    accept for complex dtypes: such blocks are linearized whole, without :func:`_lean`.
    """
    if any(jnp.iscomplexobj(a) for a in jax.tree.leaves(args)):
        return True
    return _jaxpr.computes_complex(jax.make_jaxpr(fun)(*args).jaxpr)


def _vjp_unrounded(fun, *args, has_aux=False):
    """``jax.vjp(fun, *args, has_aux=has_aux)`` for a ``fun`` under :func:`_lean`, without the
    no-op roundings ``jax.checkpoint`` puts on the values it stores.

    ``jax.checkpoint`` passes every stored value through ``reduce_precision`` to its own dtype's
    precision (against excess precision in fused bfloat16 code). XLA may keep such a rounding as a
    buffer of its own beside the value, which the forward's other readers (``K``, the plan) still
    read: a second copy of every stored stack through all sweeps. For float32 and float64 the
    rounding changes no value, so the linearization is traced once and evaluated without it,
    equation by equation; other dtypes keep it.
    """
    structure = []

    def flat(*args):
        # The VJP function is a pytree: its leaves are the stored values.
        leaves, tree = jax.tree.flatten(jax.vjp(fun, *args, has_aux=has_aux))
        structure.append(tree)
        return leaves

    closed = jax.make_jaxpr(flat)(*args)
    with jax.named_scope("linearization"):  # profiles and HLO dumps name its ops
        leaves = _jaxpr.run(closed.jaxpr, _jaxpr.closed_env(closed, jax.tree.leaves(args)), eval_eqn=_unrounded)
    return jax.tree.unflatten(structure[0], leaves)


def _unrounded(eqn, invals) -> list:
    """Evaluates ``eqn``, passing the value through where it is a ``reduce_precision`` of float32 /
    float64 to their own precision."""
    if primitives.rounds_to_own_precision(eqn):
        return [invals[0]]
    return _jaxpr.bind(eqn, invals)


#: ``save_linearization=False`` recomputes the layers in this many consecutive groups.
GROUPS = 8


def _in_groups(path, h_prev, xe, consts, groups: int = GROUPS):
    """``z`` of every layer and a VJP of ``path`` that recomputes each layer's linearization when
    called, in ``groups`` consecutive groups of layers.

    A loop runs the groups one after the other, so only one group's residuals and temporaries are
    alive at a time; the price is one more forward of every layer per sweep and a sequential depth
    of ``groups`` per sweep. (Recomputing all layers at once would save nothing: XLA would hoist the
    recomputation out of the loop over sweeps.)
    """
    length = h_prev[0].shape[0]
    groups = max(c for c in range(1, min(groups, length) + 1) if length % c == 0)
    all_paths = jax.vmap(path, in_axes=(0, 0, None))
    ungrouped = lambda tree: tmap(lambda a: a.reshape((length,) + a.shape[2:]), tree)
    size = length // groups
    group = lambda tree, i: tmap(lambda a: lax.dynamic_slice_in_dim(a, i * size, size), tree)
    z = ungrouped(lax.map(lambda i: all_paths(*group((h_prev, xe), i), consts)[1], jnp.arange(groups)))

    def vjp(ct):
        # The loop reads each group where it lies (taken as the loop's per-step inputs, the stacks
        # would be copied into it first), and writes each group's cotangent over the one it read:
        # the cotangents of the layers' outputs become those of their inputs in the same buffer.
        ct_out, ct_block = ct
        float0 = lambda a: a.dtype == jax.dtypes.float0  # integer inputs: no cotangent to gather
        zeros = lambda shape, a: np.zeros(shape, a.dtype) if float0(a) else jnp.zeros(shape, a.dtype)

        def one(i, state):
            buf, ct_xe, ct_consts = state
            h, x, c = group((h_prev, xe, ct_block), i)
            g_h, g_xe, g_consts = jax.vjp(all_paths, h, x, consts, has_aux=True)[1]((group(buf, i), c))
            buf = tmap(lambda a, g: lax.dynamic_update_slice_in_dim(a, g, i * size, 0), buf, g_h)
            ct_xe = tmap(lambda a, g: a if float0(a) else a.at[i].set(g), ct_xe, g_xe)
            return buf, ct_xe, tmap(lambda a, g: a if float0(a) else a + g, ct_consts, g_consts)

        shapes = jax.eval_shape(lambda: jax.vjp(all_paths, *group((h_prev, xe), 0), consts, has_aux=True)[1](group(ct, 0)))
        init = (ct_out, tmap(lambda a: zeros((groups,) + a.shape, a), shapes[1]), tmap(lambda a: zeros(a.shape, a), shapes[2]))
        ct_h, ct_xe, ct_consts = lax.fori_loop(0, groups, one, init)
        return ct_h, ungrouped(ct_xe), ct_consts

    return z, vjp


def _unrolled(path, h_prev, xe, consts, *, vjp=jax.vjp):
    """``z`` of every layer and a VJP of ``path`` from one ``vjp`` per layer instead of one of
    ``vmap(path)``: L independent linearizations.

    Nothing chains them, so the backward stays parallel; XLA sees L separate ops instead of one
    batched op, and compile time grows with L.
    """
    length = h_prev[0].shape[0]
    at = lambda tree, j: tmap(lambda a: a[j], tree)
    zs, vjps = [], []
    for j in range(length):
        _, vjp_j, z_j = vjp(path, at(h_prev, j), at(xe, j), consts, has_aux=True)
        zs.append(z_j)
        vjps.append(vjp_j)

    def vjp_all(ct_out):
        grads = [vjp_j(at(ct_out, j)) for j, vjp_j in enumerate(vjps)]
        ct_xe = _stacked([g[1] for g in grads]) if jax.tree.leaves(xe) else xe
        return _stacked([g[0] for g in grads]), ct_xe, _summed([g[2] for g in grads])

    return _stacked(zs), vjp_all


def _stacked(trees: list) -> PyTree:
    """The layers' trees stacked leaf by leaf on a new leading axis (``float0`` stays ``float0``)."""

    def one(*a):
        if getattr(a[0], "dtype", None) == jax.dtypes.float0:  # integer inputs: no cotangent
            return np.zeros((len(a),) + a[0].shape, jax.dtypes.float0)
        return jnp.stack(a)

    return tmap(one, *trees)


def _summed(trees: list) -> PyTree:
    """The layers' trees summed leaf by leaf (the shared inputs' cotangent; ``float0`` stays)."""
    total = lambda *a: a[0] if getattr(a[0], "dtype", None) == jax.dtypes.float0 else sum(a[1:], a[0])
    return tmap(total, *trees)


# ------------------------------------------------------------------- linearized in the forward


@dataclasses.dataclass(eq=False)
class ForwardLinearization:
    """Each layer's linearization, computed by the forward step that evaluates the layer.

    Backprop's forward computes each step's residuals (JAX's partial evaluation of a scan's step);
    so does a stack's forward here: a per-step function gives the values the linearization of the
    block path keeps (:func:`jax.linearize` of it, stored as :func:`_lean` says), and ``K``. The
    backward then only applies the transposed linearization, all layers at once (or one transpose
    per layer, independent of each other, with ``linearize="unroll"``); no block is
    evaluated again. Of what the linearization keeps, the values that depend on the shared inputs
    alone (a weight, its transpose) are computed once, before the steps, and the step's own inputs
    (the carry, the per-step inputs) are read where the forward keeps them anyway: neither is
    stored once per step.

    Attributes:
      closed: ``(h, x, s, consts) -> [the linearization's values..., K...]`` for one step.
      tree: the structure of the linearized function (:func:`jax.linearize`'s), over those values.
      sources: per value of the linearization, ``("step", i)`` (computed by every step, the
        ``i``-th of :attr:`step_outs`), ``("input", i)`` (the ``i``-th input of ``closed``) or
        ``("hoisted", i)`` (the ``i``-th of :attr:`hoisted_outs`).
      step_outs, hoisted_outs: the outputs of ``closed`` computed per step and once.
      k_outs: the outputs giving ``K`` per differentiated carry leaf (none where ``K = 1``).
      counts: how many of ``closed``'s inputs are ``h``, ``x``, ``s`` and ``consts``.
      k_eqns: the elementwise equations that give ``K`` from the steps' values and inputs, where
        that is all it takes (``K`` is then computed in the backward, not kept per step).
    """

    closed: Any
    tree: Any
    sources: list
    step_outs: list
    hoisted_outs: list
    k_outs: list
    counts: tuple
    k_eqns: tuple | None = None
    unroll: bool = False

    @classmethod
    def build(cls, stack: Stack, options: Options, h, xe, consts, *, read_once: bool) -> ForwardLinearization | None:
        """The plan for ``stack`` from one step's inputs ``(h, xe)`` and ``consts``, or ``None``
        where the backward linearizes instead (a checkpointed step, ``save_linearization=False``)."""
        if recomputes(stack, options):
            return None
        x, s = xe
        counts = (len(h), len(x), len(s), len(consts))
        whole = read_once or _holds_complex(stack.path, h, xe, consts)
        path = stack.path if whole else _lean(stack.path)
        holder = {}

        def flat(*args):
            h, x, s, c = _unflatten(args, counts)
            _, f_jvp, z = jax.linearize(lambda h, xe, c: path(h, xe, c), h, (x, s), c, has_aux=True)
            leaves, holder["tree"] = jax.tree.flatten(f_jvp)
            ks = []
            if not stack.k_is_one:
                _, ks = jax.jvp(lambda h: stack.residual(h, z), (h,), (tmap(jnp.ones_like, h),))
            return [*leaves, *ks]

        # A custom_vjp in the block (a nested stack, the user's rule) has no forward-mode rule: its
        # linearization can be transposed, not evaluated; such blocks are linearized in the backward.
        if _jaxpr.holds(jax.make_jaxpr(stack.path)(h, xe, consts).jaxpr, primitives.is_custom_vjp):
            return None
        closed = jax.make_jaxpr(flat)(*h, *x, *s, *consts)
        jaxpr = closed.jaxpr
        n_lin = holder["tree"].num_leaves
        producer = {v: e for e in jaxpr.eqns for v in e.outvars}

        def root(v):  # the value itself, through roundings to its own precision and stop_gradients
            while isinstance(v, core.Var) and v in producer and primitives.passes_value(producer[v]):
                v = producer[v].invars[0]
            return v

        per_step = set(jaxpr.invars[: counts[0] + counts[1] + counts[2]])
        sources, step_outs, hoisted_outs = [], [], []
        for out in map(root, jaxpr.outvars[:n_lin]):
            if isinstance(out, core.Var) and out in jaxpr.invars:  # read where the forward keeps it
                sources.append(("input", jaxpr.invars.index(out)))
            elif any(a in per_step for e in _jaxpr.needed(jaxpr.eqns, [out]) for a in e.invars if isinstance(a, core.Var)):
                if out not in step_outs:
                    step_outs.append(out)
                sources.append(("step", step_outs.index(out)))
            else:  # computed from the shared inputs alone
                if out not in hoisted_outs:
                    hoisted_outs.append(out)
                sources.append(("hoisted", hoisted_outs.index(out)))
        k_outs = list(jaxpr.outvars[n_lin:])
        # K from what the steps keep anyway, if that takes elementwise arithmetic only (a GRU's
        # 1 - u from its gate u): computed in the backward, fused where it is read, not stored.
        known = set(jaxpr.invars) | set(step_outs)
        k_eqns = _needed_from(jaxpr.eqns, k_outs, known)
        cheap = all(primitives.is_recomputed(e.primitive) or primitives.passes_value(e) for e in k_eqns)
        return cls(
            closed, holder["tree"], sources, step_outs, hoisted_outs, k_outs, counts,
            k_eqns=tuple(k_eqns) if cheap else None, unroll=stack.options.linearize == "unroll",
        )

    def hoisted(self, consts) -> list:
        """The values of the linearization computed from the shared inputs alone (once)."""
        if not self.hoisted_outs:
            return []
        env = _jaxpr.closed_env(self.closed, [None] * sum(self.counts[:3]) + list(consts))
        return _jaxpr.evaluate(self.closed.jaxpr.eqns, env, self.hoisted_outs, eval_eqn=_unrounded)

    def step(self, h, xe, consts) -> list:
        """One step's values: the linearization's (computed per step), then ``K`` where it is kept."""
        targets = [*self.step_outs, *(self.k_outs if self.k_eqns is None else [])]
        if not targets:
            return []
        env = _jaxpr.closed_env(self.closed, [*h, *xe[0], *xe[1], *consts])
        with jax.named_scope("linearization"):
            return _jaxpr.evaluate(self.closed.jaxpr.eqns, env, targets, eval_eqn=_unrounded)

    def linearization(self, h_prev, xe, consts, values) -> Linearization:
        """Every layer's linearization from the steps' values (stacked) and the hoisted ones:
        the transposed linear map of all layers at once, the shared inputs' tangent broadcast, so
        their cotangent is one sum over the layers (inside the transposed ops)."""
        stacked, hoisted = values
        n = len(self.step_outs)
        per_step, k_diag = list(stacked[:n]), list(stacked[n:])
        x, s = xe
        if self.k_outs and self.k_eqns is not None:

            def k_of(vals, h_j, x_j, s_j):
                env = _jaxpr.closed_env(self.closed, [*h_j, *x_j, *s_j, *consts])
                env.update(zip(self.step_outs, vals))
                return _jaxpr.evaluate(self.k_eqns, env, self.k_outs, eval_eqn=_unrounded)

            k_diag = jax.vmap(k_of)(per_step, h_prev, x, s)
        fx = [i for i, a in enumerate(x) if _jaxpr.is_float(a)]  # what has a tangent
        fc = [i for i, a in enumerate(consts) if _jaxpr.is_float(a)]

        def tangents(values, which, given):
            out = [_zero_tangent(v) for v in values]
            for i, t in zip(which, given):
                out[i] = t
            return out

        def layer(vals, h_j, x_j, s_j):
            inputs = [*h_j, *x_j, *s_j, *consts]
            leaves = [
                vals[i] if kind == "step" else hoisted[i] if kind == "hoisted" else inputs[i]
                for kind, i in self.sources
            ]
            return jax.tree.unflatten(self.tree, leaves)

        def apply(vals, h_j, x_j, s_j, dh_j, dx_j, dc):
            dxe = (tangents(x_j, fx, dx_j), [_zero_tangent(v) for v in s_j])
            return layer(vals, h_j, x_j, s_j)(dh_j, dxe, tangents(consts, fc, dc))

        primals = (h_prev, [x[i] for i in fx], [consts[i] for i in fc])
        if self.unroll:
            transposed = _transposed_layers(apply, (per_step, h_prev, x, s), primals)
        else:
            tangent_map = lambda dh, dx, dc: jax.vmap(apply, in_axes=(0,) * 6 + (None,))(per_step, h_prev, x, s, dh, dx, dc)
            transposed = _transposed(tangent_map, primals)

        def vjp(after, ct_block):
            ct_h, ct_fx, ct_fc = transposed((after, ct_block))
            ct_x = [np.zeros(a.shape, jax.dtypes.float0) for a in x]
            for i, ct in zip(fx, ct_fx):
                ct_x[i] = ct
            ct_c = [np.zeros(jnp.shape(a), jax.dtypes.float0) for a in consts]
            for i, ct in zip(fc, ct_fc):
                ct_c[i] = ct
            return ct_h, (ct_x, None), tuple(ct_c)

        return Linearization(None, vjp, k_diag if self.k_outs else None)


def _transposed(tangent_map, primals):
    """The transpose of the linear ``tangent_map`` at ``primals`` (their shapes), as a function of
    the cotangent of its output.

    A linear map JAX cannot transpose directly (a ``vmap`` of a ``cond`` with a per-layer index wraps
    operands in ``stop_gradient``, which has no transpose rule) is transposed as its VJP at zero
    tangents instead; which of the two works is decided on the first call and kept for the sweeps
    after it.
    """
    chosen: list = [jax.linear_transpose(tangent_map, *primals)]

    def transposed(ct):
        try:
            return chosen[0](ct)
        except NotImplementedError:
            chosen[0] = jax.vjp(tangent_map, *tmap(jnp.zeros_like, primals))[1]
            return chosen[0](ct)

    return transposed


def _transposed_layers(apply, per_layer, primals):
    """:func:`_transposed` for ``linearize="unroll"``: one transpose per layer, independent of each
    other, instead of one of the vmapped map (for ops XLA batches poorly, such as convolutions with
    per-layer kernels on a CPU). The layers' cotangents of the shared inputs are summed."""
    dh, dx, dc = primals
    length = dh[0].shape[0]
    at = lambda tree, j: tmap(lambda a: a[j], tree)
    layers = [
        _transposed(functools.partial(apply, *at(per_layer, j)), (at(dh, j), at(dx, j), dc))
        for j in range(length)
    ]

    def transposed(ct):
        grads = [t(at(ct, j)) for j, t in enumerate(layers)]
        return _stacked([g[0] for g in grads]), _stacked([g[1] for g in grads]), _summed([g[2] for g in grads])

    return transposed


def _needed_from(eqns, targets, known) -> list:
    """The equations, in order, that compute ``targets`` from the values in ``known``."""
    want = {a for a in targets if isinstance(a, core.Var) and a not in known}
    keep = []
    for eqn in reversed(eqns):
        if any(v in want for v in eqn.outvars):
            keep.append(eqn)
            want.update(a for a in eqn.invars if isinstance(a, core.Var) and a not in known)
    return keep[::-1]


def _zero_tangent(value):
    """The zero tangent of a value (``float0`` for integers, keys and booleans)."""
    if _jaxpr.is_float(value):
        return jnp.zeros(jnp.shape(value), jnp.result_type(value))
    return np.zeros(jnp.shape(value), jax.dtypes.float0)


def _unflatten(args, counts):
    nh, nx, ns, _ = counts
    return list(args[:nh]), list(args[nh : nh + nx]), list(args[nh + nx : nh + nx + ns]), list(args[nh + nx + ns :])
