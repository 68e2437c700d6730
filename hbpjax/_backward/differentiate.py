"""The one ``jax.custom_vjp`` of hbpjax: a stack's forward, with Highway-BP as its backward."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._front.options import Options
from .forward_linearization import ForwardLinearization
from .linearize import Unbatchable, UnbatchableWarning
from .microbatches import Microbatches
from .microbatches import backward as microbatched_backward
from .placements import Placement
from .stack import Stack
from .sweeps import highway_backward

PyTree = Any


def differentiate(
    stack: Stack,
    init: list,
    xs: PyTree,
    consts: tuple,
    *,
    options: Options,
    forward: Callable,
    placement: Callable[[], Placement],
    slot: jax.Array | None = None,
    microbatches: Microbatches | None = None,
):
    """``(final carry, per-step outputs)`` of ``forward``, with Highway-BP as its backward.

    The one ``jax.custom_vjp`` of hbpjax: single-device stacks pass
    :func:`hbpjax._analysis.forward.scan_forward` and :class:`OneDevice`, layer-parallel ones their pipelined
    forward and a :class:`OnMeshAxis`.

    Args:
      stack: the stack's description.
      init, xs, consts: the flat carry leaves, the per-step inputs and the shared values.
      options: the transform's options (iterations, tol, save_linearization).
      forward: ``forward(init, xs, consts, lin=None) -> (final, ys, saved, linearization)``
        (``lin``: a :class:`hbpjax._backward.forward_linearization.ForwardLinearization` the forward steps evaluate).
      placement: ``placement() -> Placement``, called inside the backward (a placement over a mesh axis
        reads its position on the axis there).
      slot: optional ``float32[2]`` input that the stack ignores; its cotangent is the sweep report
        ``[sweeps run, final relative change]`` (how ``return_report=True`` gets it out).
      microbatches: with a pipelined ``forward`` (:func:`hbpjax._backward.microbatches.pipeline`),
        how the batch splits: ``saved`` and the linearization then hold one entry per microbatch,
        and the backward is one microbatch's, vmapped over them (the parameters' cotangents summed).
    """

    # A traced number of sweeps is an input of the custom_vjp (its backward may not close over it).
    k = options.iterations if options.traced else None
    # The forward computes each layer's linearization; what it is made of is known once traced.
    plans: list = []

    def primal(init, xs, consts, k, slot):
        final, ys, _, _ = forward(init, xs, consts)
        return final, ys

    def fwd(init, xs, consts, k, slot):
        read_once = not options.traced and min(options.iterations, stack.length - 1) == 0 and not stack.ys_reach_carry
        one = init if microbatches is None else [a[0] for a in microbatches.split_carry(init)]
        plan = ForwardLinearization.build(stack, options, *stack.step_inputs(one, xs), consts, read_once=read_once)
        plans.append(plan)
        final, ys, saved, lin = forward(init, xs, consts, lin=plan)
        return (final, ys), (init, saved, xs, consts, lin, k)

    def bwd(residuals, cotangents):
        init, saved, xs, consts, lin, k = residuals
        run_options = options if k is None else dataclasses.replace(options, iterations=k)
        try:
            if microbatches is None:
                cts, report = highway_backward(
                    stack, run_options, placement(), (init, saved, xs, consts), cotangents, report=slot is not None,
                    forward_linearization=None if lin is None else (plans[-1], lin),
                )
            else:
                cts, report = microbatched_backward(
                    stack, run_options, placement(), microbatches, (init, saved, xs, consts), cotangents,
                    report=slot is not None, forward_linearization=None if lin is None else (plans[-1], lin),
                )
        except Unbatchable as err:
            warnings.warn(
                f"hbpjax: a block of {stack.length} layers holds an operation that cannot be vmapped "
                f"({str(err).splitlines()[0]}); this stack runs exact backprop.",
                UnbatchableWarning,
                stacklevel=2,
            )
            cts = jax.vjp(lambda i, x, c: forward(i, x, c)[:2], init, xs, consts)[1](cotangents)
            report = jnp.array([0.0, jnp.nan], jnp.float32)
        return (*cts, None, None if slot is None else report.astype(slot_dtype))

    slot_dtype = None if slot is None else slot.dtype

    run = jax.custom_vjp(primal)
    run.defvjp(fwd, bwd)
    return run(init, xs, consts, k, slot)

