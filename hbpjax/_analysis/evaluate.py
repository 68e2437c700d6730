"""Evaluating a plan: one loop over a program's nodes, one rule per node kind.

As JAX's own interpreters keep one rule per primitive in a table, :data:`RULES` keeps one per kind
of :mod:`plan <hbpjax._analysis.plan>` node. Kept equations are bound as traced, so values are
those of the user's function, bit for bit; converted scans and chains run as
:func:`hbpjax._backward.differentiate` stacks, whose forward evaluates the user's own step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
from jax.extend import core

from .._backward import layers
from .._backward.differentiate import differentiate
from .._backward.placements import OneDevice
from .._front.options import Options
from . import primitives
from .forward import scan_forward
from .jaxprs import bind, read
from .plan import ChainNode, Container, Converted, Exact, LayerParallel, Marked, Node, Program


class Evaluator:
    """Runs programs of a plan under a transform's options.

    Attributes:
      options: the transform's options (``iterations``, ``layer_axis``, ...).
      slots: ``None``, or one ``float32[2]`` input per reporting stack, whose cotangent is that
        stack's sweep report (:mod:`hbpjax._front.report`).
    """

    def __init__(self, options: Options, slots=None):
        self.options = options
        self.slots = slots

    def run(self, program: Program, args: Sequence) -> list:
        """The values of ``program.outvars`` given the jaxpr's inputs ``args``."""
        env = dict(zip(program.jaxpr.constvars, program.consts))
        env.update(zip(program.jaxpr.invars, args))
        for node in program.items:
            outs = RULES[type(node)](self, node, [read(env, a) for a in node.inputs])
            env.update(zip(node.outputs, outs))
        return [read(env, a) for a in program.outvars]

    def slot(self, index: int | None):
        """The report slot of a stack (``None`` where it does not report)."""
        return None if index is None or self.slots is None else self.slots[index]


def _exact(ev: Evaluator, node: Exact, invals: list) -> list:
    return bind(node.eqn, invals)


def _contents(ev: Evaluator, node: Marked | LayerParallel, invals: list) -> list:
    (program,) = node.programs
    return ev.run(program, invals)


def _container(ev: Evaluator, node: Container, invals: list) -> list:
    runners = [functools.partial(ev.run, program) for program in node.programs]
    return by_contents(node.eqn, runners, invals)


def _converted(ev: Evaluator, node: Converted, invals: list) -> list:
    """A scan as a Highway-BP stack (layer-parallel where the transform asks and its inputs are
    sharded so); under exact backprop only layer-parallel stacks run differently."""
    init, xs, consts = _scan_operands(node.eqn, invals)
    parallel = _layer_parallel(ev.options, node.stack, init, xs, consts, micro=node.micro)
    if parallel is not None:
        return parallel
    if not ev.options.highway:
        return bind(node.eqn, invals)
    forward = functools.partial(scan_forward, node.stack)
    final, ys = differentiate(
        node.stack, init, xs, consts, options=ev.options, forward=forward, placement=OneDevice, slot=ev.slot(node.slot)
    )
    return [*final, *ys]


def _chain(ev: Evaluator, node: ChainNode, invals: list) -> list:
    """A chain as a Highway-BP stack: ``[h_L, *every layer's outputs]``."""
    chain, stack = node.chain, node.stack
    n_shared, n_layer = len(chain.shared), len(chain.per_layer[0])
    init = [jax.numpy.asarray(invals[0], getattr(chain.init.aval, "dtype", None))]
    consts = tuple(invals[1 : 1 + n_shared])
    flat = invals[1 + n_shared :]
    xs = [flat[g * n_layer : (g + 1) * n_layer] for g in range(chain.length)]
    forward = functools.partial(chain.forward, stack)
    final, ys = differentiate(
        stack, init, xs, consts, options=ev.options, forward=forward, placement=OneDevice, slot=ev.slot(node.slot)
    )
    per_layer = [[y[g] for y in ys] for g in range(chain.length)]
    return [final[0], *(v for outs in per_layer for v in outs)]


#: The rule of each node kind.
RULES: dict[type[Node], Callable[[Evaluator, Node, list], list]] = {
    Exact: _exact,  # type: ignore[dict-item]
    Converted: _converted,  # type: ignore[dict-item]
    ChainNode: _chain,  # type: ignore[dict-item]
    Marked: _contents,  # type: ignore[dict-item]
    LayerParallel: _contents,  # type: ignore[dict-item]
    Container: _container,  # type: ignore[dict-item]
}


def _scan_operands(eqn: core.JaxprEqn, invals: list) -> tuple[list, list, tuple]:
    """``(init, xs, consts)`` of a scan equation; literal operands (a Python float as the initial
    carry) become arrays of their type."""
    invals = [
        jax.numpy.asarray(v, getattr(a.aval, "dtype", None)) if isinstance(a, core.Literal) else v
        for a, v in zip(eqn.invars, invals)
    ]
    num_consts, num_carry, _ = primitives.scan_layout(eqn)
    return list(invals[num_consts : num_consts + num_carry]), list(invals[num_consts + num_carry :]), tuple(invals[:num_consts])


def _layer_parallel(options: Options, stack, init, xs, consts, *, micro=None) -> list | None:
    """The outputs of ``stack`` run layer-parallel, if the transform has a ``layer_axis`` and the
    stack's per-layer inputs are sharded over it; else ``None``. ``micro``: the stack traced on one
    microbatch (with ``options.microbatches``)."""
    axis = options.layer_axis
    if axis is None or stack.reverse:  # the pipeline runs the layers in order
        return None
    mesh, size = layers.resolve(axis, options.mesh, None, name=options.name, xs=xs)
    if not layers.sharded_over(xs, axis, mesh):
        return None
    layers.check_length(axis, size, stack.length, name=options.name)
    final, ys = layers.found_stack(stack, init, xs, consts, options=options, axis=axis, mesh=mesh, size=size, micro=micro)
    return [*final, *ys]


# ------------------------------------------------------------------- evaluation by contents

Runner = Callable[[Sequence], list]


def by_contents(eqn: core.JaxprEqn, runners: Sequence[Runner], invals: list) -> list:
    """A scan, ``cond``, ``jit``, checkpoint or plain call evaluated by its contents, each inner
    program (:func:`hbpjax._analysis.primitives.inner_programs`) by its runner, wrapped as it was: the same scan (differentiated
    by JAX), the same ``cond``, the same ``jax.jit`` name, the same checkpoint policy."""
    if primitives.is_scan(eqn):
        return _scan_by(eqn, runners[0], invals)
    if primitives.is_cond(eqn):
        fns = [lambda *ops, run=run: run(ops) for run in runners]
        return list(jax.lax.switch(invals[0], fns, *invals[1:]))
    (run,) = runners
    kind = primitives.contents(eqn)
    if kind == primitives.JIT:
        return list(jax.jit(_named(run, primitives.call_name(eqn)))(*invals))
    if kind == primitives.REMAT:
        policy, prevent_cse = eqn.params.get("policy"), eqn.params.get("prevent_cse", True)
        return list(jax.checkpoint(lambda *a: run(a), policy=policy, prevent_cse=prevent_cse)(*invals))
    return run(invals)


def _scan_by(eqn: core.JaxprEqn, run: Runner, invals: list) -> list:
    num_consts, num_carry, _ = primitives.scan_layout(eqn)
    consts, init, xs = invals[:num_consts], invals[num_consts : num_consts + num_carry], invals[num_consts + num_carry :]

    def step(carry, x):
        out = run([*consts, *carry, *x])
        return out[:num_carry], out[num_carry:]

    params = eqn.params
    final, ys = jax.lax.scan(step, init, xs, length=params["length"], reverse=params["reverse"], unroll=params["unroll"])
    return [*final, *ys]


def _named(fn, label):
    """``fn`` (a function of one sequence of arguments) as a function of positional arguments,
    named ``label`` (the name a ``jax.jit`` of it shows in jaxprs)."""

    def named(*args):
        return fn(args)

    named.__name__ = named.__qualname__ = str(label)
    return named
