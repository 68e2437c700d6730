"""The forward of a stack on one device: ``lax.scan`` over its step, each step also computing its
layer's linearization for the backward."""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from .._backward.stack import Stack
from . import hoist as _hoist

PyTree = Any
tmap = jax.tree.map


def scan_steps(stack: Stack, init: list, xs: PyTree, consts: tuple, *, length: int | None = None, lin=None, prepared=None):
    """``(final carry, per-step outputs, saved, linearization)`` by ``lax.scan`` over ``stack.step``.

    ``saved`` holds every carry leaf as it *entered* each step (``h_0 .. h_{L-1}``, stacked): what the
    backward linearizes the layers at, with no shifted copy to make. ``lin`` (a
    :class:`hbpjax._backward.forward_linearization.ForwardLinearization`) has every step also compute its layer's
    linearization: ``linearization`` is ``(its per-step values, stacked; its hoisted values)``, or
    ``None`` without ``lin``. ``length`` overrides ``stack.length`` (a chunk of a layer-parallel stack).

    What the step computes from its per-step inputs alone (an RNN cell's input matmul) is computed
    for all steps before the loop (:mod:`hbpjax._analysis.hoist`); with ``lin``, each computation the step
    and its linearization share is evaluated once (:func:`hbpjax._analysis.dedup.traced_once`).
    ``prepared``: what :func:`prepare_steps` returned for these ``xs`` and ``consts`` (a pipeline
    runs the same layers on many microbatches and computes it once).
    """
    hoisted, step, pre = prepared if prepared is not None else prepare_steps(stack, init, xs, consts, lin=lin)
    consts_leaves = jax.tree.leaves(consts)
    n_carry = len(init)

    def body(carry, inputs):
        x, pre_j = inputs
        out = step.step(carry, x, pre_j, consts_leaves)
        return out[:n_carry], (out[n_carry:], carry)

    final, (outs, saved) = lax.scan(
        body, init, (jax.tree.leaves(xs), pre), length=stack.length if length is None else length,
        reverse=stack.reverse, unroll=stack.unroll,
    )
    _, ys, values = jax.tree.unflatten(step.tree, [*final, *step.outputs(outs, pre)])
    return list(final), ys, saved, None if lin is None else (values, hoisted)


def prepare_steps(stack: Stack, init: list, xs: PyTree, consts: tuple, *, lin=None):
    """``(hoisted values, the step divided, its values before the loop)``: what :func:`scan_steps`
    computes from the per-layer inputs and the shared values alone (``init``: example carry leaves,
    for their shapes)."""
    hoisted = lin.hoisted(consts) if lin is not None else []

    def step_and_values(carry, x, consts):
        new, ys = stack.step(carry, x, consts)
        values = [] if lin is None else lin.step([carry[i] for i in stack.diff], (x, [carry[i] for i in stack.state]), consts)
        return new, ys, values

    one_x = tmap(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    step = _hoist.hoisted_step(step_and_values, init, one_x, consts, once=lin is not None)
    return hoisted, step, step.before(jax.tree.leaves(xs), jax.tree.leaves(consts))


scan_forward = scan_steps  # the forward of a single-device stack: (final, ys, saved, linearization)
