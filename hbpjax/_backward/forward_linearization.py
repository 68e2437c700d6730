"""Each layer's linearization computed by the forward step that evaluates the layer (as backprop's
forward computes its residuals), so the backward only applies transposes."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

from .._analysis import jaxprs as _jaxpr
from .._analysis import primitives
from .._front.options import Options
from .linearize import (
    Linearization,
    group_size,
    grouped_vjp,
    holds_complex,
    layers_at_once,
    lean,
    recomputes,
    stacked,
    summed,
    unrounded,
)
from .stack import Stack

PyTree = Any
tmap = jax.tree.map


@dataclasses.dataclass(eq=False)
class ForwardLinearization:
    """Each layer's linearization, computed by the forward step that evaluates the layer.

    Backprop's forward computes each step's residuals (JAX's partial evaluation of a scan's step);
    so does a stack's forward here: a per-step function gives the values the linearization of the
    block path keeps (:func:`jax.linearize` of it, stored as :func:`lean` says, or as the policy of
    the checkpoint the user wrapped the step in), and ``K``. The backward then only applies the
    transposed linearization, all layers at once (or one transpose per layer, independent of each
    other, with ``linearize="unroll"``; or, for a checkpointed step, ``recompute_layers`` layers at
    a time, recomputing what the policy did not save); no block is evaluated again otherwise. Of what the linearization keeps, the values that depend on the shared inputs
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
      at_once: for a checkpointed step, how many layers the transposes take at a time (``None``:
        all at once).
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
    at_once: int | None = None

    @classmethod
    def build(cls, stack: Stack, options: Options, h, xe, consts, *, read_once: bool) -> ForwardLinearization | None:
        """The plan for ``stack`` from one step's inputs ``(h, xe)`` and ``consts``, or ``None``
        where the backward linearizes instead (``save_linearization=False``).

        A step the user checkpointed keeps what the checkpoint's policy saves (the matmuls, with
        ``dots_saveable``; nothing but the step's inputs, with ``nothing_saveable``), as backprop's
        forward does; the backward applies the transposes ``recompute_layers`` layers at a time,
        recomputing the rest."""
        if recomputes(stack, options) and stack.remat is None:
            return None
        x, s = xe
        counts = (len(h), len(x), len(s), len(consts))
        whole = read_once or stack.remat is not None or holds_complex(stack.path, h, xe, consts)
        path = stack.path if whole else lean(stack.path)
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
            at_once=None if stack.remat is None else layers_at_once(stack, options),
        )

    def hoisted(self, consts) -> list:
        """The values of the linearization computed from the shared inputs alone (once)."""
        if not self.hoisted_outs:
            return []
        env = _jaxpr.closed_env(self.closed, [None] * sum(self.counts[:3]) + list(consts))
        return _jaxpr.evaluate(self.closed.jaxpr.eqns, env, self.hoisted_outs, eval_eqn=unrounded)

    def step(self, h, xe, consts) -> list:
        """One step's values: the linearization's (computed per step), then ``K`` where it is kept."""
        targets = [*self.step_outs, *(self.k_outs if self.k_eqns is None else [])]
        if not targets:
            return []
        env = _jaxpr.closed_env(self.closed, [*h, *xe[0], *xe[1], *consts])
        with jax.named_scope("linearization"):
            return _jaxpr.evaluate(self.closed.jaxpr.eqns, env, targets, eval_eqn=unrounded)

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
                return _jaxpr.evaluate(self.k_eqns, env, self.k_outs, eval_eqn=unrounded)

            k_diag = jax.vmap(k_of)(per_step, h_prev, x, s)
        fx = [i for i, a in enumerate(x) if _jaxpr.is_float(a)]  # what has a tangent
        fc = [i for i, a in enumerate(consts) if _jaxpr.is_float(a)]

        def tangents(values, which, given):
            out = [_jaxpr.zero_tangent(v) for v in values]
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

        def apply(at_layer, dh_j, dx_j, dc):
            vals, h_j, x_j, s_j = at_layer
            dxe = (tangents(x_j, fx, dx_j), [_jaxpr.zero_tangent(v) for v in s_j])
            return layer(vals, h_j, x_j, s_j)(dh_j, dxe, tangents(consts, fc, dc))

        primals = (h_prev, [x[i] for i in fx], [consts[i] for i in fc])
        if self.unroll:
            transposed = _transposed_layers(apply, (per_step, h_prev, x, s), primals)
        elif self.at_once is not None:
            transposed = _transposed_in_groups(apply, (per_step, h_prev, x, s), primals, self.at_once)
        else:
            tangent_map = lambda dh, dx, dc: jax.vmap(apply, in_axes=(0, 0, 0, None))((per_step, h_prev, x, s), dh, dx, dc)
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


def _transposed_in_groups(apply, per_layer, primals, at_once: int):
    """:func:`_transposed` of the layers a group of at most ``at_once`` at a time, the groups one
    after the other (:func:`~hbpjax._backward.linearize.grouped_vjp`): a checkpointed step's
    transposes recompute what its policy did not save, one group's values alive at a time."""
    dh, dx, dc = primals
    size = group_size(dh[0].shape[0], at_once)
    take = lambda tree, i: tmap(lambda a: lax.dynamic_slice_in_dim(a, i * size, size), tree)

    def of_group(i, ct):
        tangent_map = lambda a, b, c: jax.vmap(apply, in_axes=(0, 0, 0, None))(take(per_layer, i), a, b, c)
        return _transposed(tangent_map, (take(dh, i), take(dx, i), dc))(ct)

    return lambda ct: grouped_vjp(of_group, ct, primals, size=size)


def _transposed_layers(apply, per_layer, primals):
    """:func:`_transposed` for ``linearize="unroll"``: one transpose per layer, independent of each
    other, instead of one of the vmapped map (for ops XLA batches poorly, such as convolutions with
    per-layer kernels on a CPU). The layers' cotangents of the shared inputs are summed."""
    dh, dx, dc = primals
    length = dh[0].shape[0]
    at = lambda tree, j: tmap(lambda a: a[j], tree)
    layers = [
        _transposed(functools.partial(apply, at(per_layer, j)), (at(dh, j), at(dx, j), dc))
        for j in range(length)
    ]

    def transposed(ct):
        grads = [t(at(ct, j)) for j, t in enumerate(layers)]
        return stacked([g[0] for g in grads]), stacked([g[1] for g in grads]), summed([g[2] for g in grads])

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


def _unflatten(args, counts):
    nh, nx, ns, _ = counts
    return list(args[:nh]), list(args[nh : nh + nx]), list(args[nh + nx : nh + nx + ns]), list(args[nh + nx + ns :])
