"""The stack of a scan whose step is a jaxpr (a ``lax.scan`` found in a user's function, the step of
a :func:`hbpjax.residual_scan`), and how it is built from the step's residual split."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax import lax
from jax.extend import core

from .._backward.stack import BLOCK, CARRY, Stack
from .._front.options import StackOptions
from . import jaxprs as _jaxpr
from . import marks as _marks
from . import primitives
from . import split as _split
from .evaluate import Evaluator
from .jaxprs import is_float

_DEFAULT_OPTIONS = StackOptions()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScanStack(Stack):
    """The stack of a scan whose step is a jaxpr: a ``lax.scan`` found in a user's function, or the
    step of a :func:`hbpjax.residual_scan`.

    The forward evaluates the step's equations exactly as traced; the block evaluates the ones the
    split's cut values and the per-step outputs need; the residual the split's elementwise ones.

    Attributes:
      body: the step as a closed jaxpr: ``(consts, carry, xs) -> (new carry, ys)``; the forward
        evaluates it as it is.
      flat: the same step with the wrappers around its residual path read through
        (:func:`hbpjax._analysis.split.read_through`); the block and the residual evaluate it.
      rule: the step's new carry comes out of a custom derivative rule (``custom_vjp``,
        ``custom_jvp``) that ``flat`` reads through: the split finds ``K`` in its primal, and the
        block path is the whole step (:meth:`rule_step`, differentiated by the user's rule) minus
        the residual path, so ``K + J`` is the rule's Jacobian.
      num_consts: how many of the body's inputs are shared values.
      split: the residual split of ``flat`` for the differentiated carry leaves.
      block_ys: the per-step outputs the block computes (``(BLOCK, m)`` routes), in order.
      block_program: the plan of the block (:meth:`hbpjax._analysis.planner.Planner.program`): the
        values it computes, nested stacks converted; ``None`` evaluates ``flat`` as traced (marked
        checkpoints by their contents).
      transform: the options the block program's nested stacks run under.
    """

    body: Any
    flat: Any
    num_consts: int
    split: Any
    rule: bool = False
    block_ys: tuple = ()
    block_program: Any = None
    transform: Any = None

    def step(self, carry, x, consts):
        env = _jaxpr.closed_env(self.body, [*consts, *carry, *x])
        out = _jaxpr.run(self.body.jaxpr, env, eval_eqn=_marks.inline())
        return out[: len(carry)], out[len(carry) :]

    def block(self, h, xe, consts):
        x, s = xe
        carry = self._carry(h, s)
        targets = [*self.split.z, *self.block_ys]

        def evaluate(args):
            if self.block_program is not None:
                return Evaluator(self.transform).run(self.block_program, args)
            env = _jaxpr.closed_env(self.flat, args)
            return _jaxpr.evaluate(self.flat.jaxpr.eqns, env, targets, eval_eqn=_marks.inline())

        if self.remat is not None:  # what the user's policy does not save is recomputed here too
            evaluate = jax.checkpoint(evaluate, policy=self.remat.policy, prevent_cse=self.remat.prevent_cse)
        values = evaluate([*consts, *carry, *x])
        n = len(self.split.z)
        return values[:n], values[n:]

    def residual(self, h, z):
        return self.split.residual(h, z)

    def path(self, h, xe, consts):
        if not self.rule:
            return super().path(h, xe, consts)
        # The step as written, differentiated by the user's rule, minus the residual path: its
        # Jacobian in h is the rule's minus K (K + J is the rule's Jacobian).
        z, _ = self.block(h, xe, consts)
        new, ys = self.step(self._carry(h, xe[1]), xe[0], consts)
        residual_path = self.residual(h, [lax.stop_gradient(v) for v in z])
        block_ys = [y for y, r in zip(ys, self.y_route) if r is not None and r[0] == BLOCK]
        return ([new[i] - r for i, r in zip(self.diff, residual_path)], block_ys), z

    def _carry(self, h, s) -> list:
        carry = [None] * self.num_carry
        for i, v in zip(self.diff, h):
            carry[i] = v
        for i, v in zip(self.state, s):
            carry[i] = v
        return carry


def scan_stack(
    body,
    *,
    num_consts: int,
    num_carry: int,
    length: int,
    reverse: bool = False,
    unroll: int | bool = 1,
    options: StackOptions = _DEFAULT_OPTIONS,
    opaque=lambda eqn: False,
    kind: type | None = None,
) -> tuple[Any, ScanStack]:
    """``(split, stack)`` for a scan with step ``body``.

    ``split.has_residual_path`` says whether Highway-BP applies; the stack is built either way (its
    forward is the scan's). Every floating-point carry leaf is differentiated; the other leaves (integer counters, PRNG keys)
    are state. A per-step output that is the very value of a new differentiated carry leaf sends
    its cotangent into that carry; any other floating-point output is computed by the block.
    ``kind`` is the :class:`ScanStack` subclass to build (a chain's).
    """
    carry_outs = [i for i, v in enumerate(body.jaxpr.invars[num_consts : num_consts + num_carry]) if is_float(v.aval)]
    flat, remat, rule = _split.read_through(body, carry_outs, keep=_marks.is_block)
    jaxpr = flat.jaxpr
    carry_in = jaxpr.invars[num_consts : num_consts + num_carry]
    carry_out, ys = jaxpr.outvars[:num_carry], jaxpr.outvars[num_carry:]
    diff = tuple(i for i, v in enumerate(carry_in) if is_float(v.aval))
    found = _split.residual_split(jaxpr, [carry_in[i] for i in diff], [carry_out[i] for i in diff], opaque=opaque)
    same = lambda a, b: isinstance(a, core.Var) and a is b
    routes: list[tuple[str, int] | None] = []
    block_ys: list = []
    for y in ys:
        p = next((p for p, i in enumerate(diff) if same(y, carry_out[i])), None)
        if p is not None:
            routes.append((CARRY, p))
        elif isinstance(y, core.Var) and is_float(y.aval) and not _from_stop_gradient(jaxpr, y):
            routes.append((BLOCK, len(block_ys)))
            block_ys.append(y)
        else:
            routes.append(None)
    h_in = [carry_in[i] for i in diff]
    ys_reads = _jaxpr.depends_on(jaxpr.eqns, h_in, block_ys)
    reads = ys_reads or _jaxpr.depends_on(jaxpr.eqns, h_in, found.z)
    stack = (kind or ScanStack)(
        length=length, num_carry=num_carry, diff=diff, y_route=tuple(routes), options=options,
        unroll=unroll, reverse=reverse, block_reads_carry=reads,
        ys_read_carry=ys_reads,
        k_within_one=all(b is not None and b <= 1.0 for b in found.k_bounds),
        k_is_one=bool(found.kinds) and all(kind == _split.IDENTITY for kind in found.kinds), body=body,
        flat=flat, remat=remat, rule=rule, num_consts=num_consts, split=found, block_ys=tuple(block_ys),
    )
    return found, stack


def _from_stop_gradient(jaxpr, var) -> bool:
    """Whether ``var`` is the output of a ``stop_gradient`` (its cotangent is zero anyway)."""
    return any(var in eqn.outvars and primitives.is_stop_gradient(eqn) for eqn in jaxpr.eqns)
