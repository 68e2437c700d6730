"""A scan step's work on its per-step inputs alone, done for all steps at once before the loop.

An RNN cell reads its input through a matmul before anything meets the carry (``x_t @ W_i`` in
Flax's ``GRUCell`` and ``LSTMCell``, both computed per step). Left in the loop, that matmul is one
more small kernel in each of the ``T`` sequential steps; taken out, it is one matmul over all steps,
outside the sequential chain, and the loop reads its result as a per-step input. JAX's own scan
and XLA leave it in the loop: the value is not loop-invariant, only independent of the carry.

:func:`hoisted_step` traces a stack's forward step once and divides its equations: those that
compute a costly value (:func:`hbpjax._analysis.primitives.is_costly`) from the per-step inputs and the shared values alone, with
what they need, are evaluated under ``jax.vmap`` over all steps (:meth:`HoistedStep.before`); the
loop evaluates the rest (:meth:`HoistedStep.step`). A per-step output that is such a value is taken
from the stacked result directly (:meth:`HoistedStep.outputs`), not copied out of the loop. The
values are the same computations on the same operands (a batched matmul may round differently in
the last bit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core

from . import dedup, primitives
from . import jaxprs as _jaxpr


@dataclasses.dataclass(frozen=True, eq=False)
class HoistedStep:
    """A traced step ``fun(carry, x, consts) -> outputs`` divided into the part evaluated for all
    steps before the loop and the part the loop evaluates.

    Attributes:
      closed: the step's trace: inputs ``[*carry leaves, *x leaves, *consts leaves]``.
      tree: the structure of the step's outputs.
      counts: how many of the inputs are carry, ``x`` and ``consts`` leaves.
      before_eqns: the equations evaluated for all steps at once (with the shared-only ones they read).
      frontier: their values the loop (or the outputs) read: stacked over the steps by :meth:`before`.
      loop: the step's jaxpr with only the equations the loop evaluates, in order (effects included).
    """

    closed: core.ClosedJaxpr
    tree: Any
    counts: tuple
    before_eqns: tuple
    frontier: tuple
    loop: core.Jaxpr

    def _env(self, carry, x, consts) -> dict:
        args = [*(carry if carry is not None else [None] * self.counts[0]), *x, *consts]
        return _jaxpr.closed_env(self.closed, args)

    def before(self, xs: list, consts: list) -> list:
        """The frontier values of every step, stacked: ``xs`` are the per-step inputs' leaves."""
        if not self.frontier:
            return []

        def one(x):
            return _jaxpr.evaluate(self.before_eqns, self._env(None, x, consts), self.frontier)

        return jax.vmap(one)(xs)

    def step(self, carry: list, x: list, pre: list, consts: list) -> list:
        """One step's output leaves, given its frontier values ``pre``; ``None`` for an output that
        is a frontier value itself (:meth:`outputs` fills it in from the stacked values)."""
        env = self._env(carry, x, consts)
        env.update(zip(self.frontier, pre))
        direct = set(self.frontier)
        outs = _jaxpr.run(self.loop, env)
        return [
            None if i >= self.counts[0] and isinstance(v, core.Var) and v in direct else out
            for i, (v, out) in enumerate(zip(self.loop.outvars, outs))
        ]

    def outputs(self, stacked: list, pre: list) -> list:
        """The per-step output leaves (after the carry's), stacked, with the frontier values the
        loop left out (``None``) taken from ``pre``."""
        where = dict(zip(self.frontier, pre))
        outs = self.closed.jaxpr.outvars[self.counts[0]:]
        return [where[v] if a is None else a for v, a in zip(outs, stacked)]


def hoisted_step(fun: Callable, carry: list, x: Any, consts: tuple, *, once: bool) -> HoistedStep:
    """Traces ``fun(carry, x, consts)`` (``carry`` a list of arrays, ``x`` one step's inputs as
    arrays or ``jax.ShapeDtypeStruct``) and divides it (:class:`HoistedStep`).

    Args:
      fun: the step; its outputs are ``(new carry leaves, ...)``, the new carry's first.
      carry, x, consts: example inputs (their shapes and dtypes are what counts).
      once: evaluate each computation the step repeats once (:func:`hbpjax._analysis.dedup.traced_once`):
        for a forward that is not differentiated (it inlines ``custom_jvp`` functions).
    """
    args = (list(carry), x, tuple(consts))
    if once:
        closed, tree = dedup.traced_once_jaxpr(fun, *args)
    else:
        closed, shape = jax.make_jaxpr(fun, return_shape=True)(*args)
        tree = jax.tree.structure(shape)
    counts = (len(carry), len(jax.tree.leaves(x)), len(jax.tree.leaves(args[2])))
    before, frontier, loop = _divide(closed.jaxpr, counts)
    hoisted = HoistedStep(closed, tree, counts, tuple(before), tuple(frontier), closed.jaxpr.replace(eqns=loop))
    if frontier:
        # A primitive without a batching rule (a pure_callback without vmap_method): all in the loop.
        xs = [jax.ShapeDtypeStruct((2, *a.shape), a.dtype) for a in jax.tree.leaves(x)]
        try:
            jax.eval_shape(lambda xs, c: hoisted.before(xs, c), xs, list(args[2]))
        except NotImplementedError:
            return HoistedStep(closed, tree, counts, (), (), closed.jaxpr)
    return hoisted


def _divide(jaxpr: core.Jaxpr, counts: tuple) -> tuple[list, list, list]:
    """``(before, frontier, loop)``: the equations to evaluate for all steps at once, those of
    their values read after them, and the equations left to the loop."""
    n_carry, n_x, _ = counts
    # Values computed without the carry and without effects (nor from values with effects), and
    # which of them read a per-step input.
    free = set(jaxpr.invars[n_carry:]) | set(jaxpr.constvars)
    per_step = set(jaxpr.invars[n_carry : n_carry + n_x])
    candidates = []
    for eqn in jaxpr.eqns:
        reads = [a for a in eqn.invars if isinstance(a, core.Var)]
        if eqn.effects or not all(a in free for a in reads):
            continue
        free.update(eqn.outvars)
        if any(a in per_step for a in reads):
            per_step.update(eqn.outvars)
            if primitives.is_costly(eqn):
                candidates.append(eqn)
    if not candidates:
        return [], [], list(jaxpr.eqns)
    positions = _jaxpr.needed_positions(jaxpr.eqns, [v for e in candidates for v in e.outvars])
    taken = {i for i in positions if any(v in per_step for v in jaxpr.eqns[i].outvars)}
    loop = [e for i, e in enumerate(jaxpr.eqns) if i not in taken]
    read_after = {a for e in loop for a in e.invars if isinstance(a, core.Var)}
    read_after |= {a for a in jaxpr.outvars if isinstance(a, core.Var)}
    frontier = [v for i in positions if i in taken for v in jaxpr.eqns[i].outvars if v in read_after]
    return [jaxpr.eqns[i] for i in positions], frontier, loop
