"""The one description of a residual stack, and the one custom VJP built from it.

A :class:`Stack` says everything the forward, the custom VJP and the Highway-BP backward need to
know about a stack of ``L`` steps, whoever built it (:func:`hbpjax.residual_scan`, or the automatic
conversion of a ``lax.scan`` found in a user's function):

* the forward step on the *whole* carry, ``carry_i, y_i = step(carry_{i-1}, x_i, consts)``, whose
  values the forward computes exactly as written;
* the residual split on the *differentiated* carry leaves ``h`` (every floating-point leaf):
  ``z_i, yb_i = block(h_{i-1}, (x_i, s_{i-1}), consts)`` and ``h_i = residual(h_{i-1}, z_i)``, with
  ``residual`` elementwise in ``h``. ``s`` are the other carry leaves (integer counters, PRNG keys):
  state the forward computes and the block reads as per-step inputs, never differentiated;
* where the cotangent of each per-step output ``y_i`` goes: into a carry (``y_i`` *is* a new carry
  leaf, like the carries :func:`hbpjax.residual_scan` returns), into the block (``y_i`` is any other
  function of ``(h_{i-1}, x_i)``, computed by ``block`` as ``yb``), or nowhere (non-differentiable
  outputs, aux state);
* the options: length, direction, forward unrolling, and the stack's own
  :class:`~hbpjax._options.StackOptions` (the backward-only ``gamma``, how the backward linearizes
  the layers).

:func:`hbpjax._backward.differentiate` turns a stack and a forward function into the
``jax.custom_vjp`` whose backward is Highway-BP, on one device or over a chain of devices.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
from jax import lax
from jax.extend import core

from .._front.options import StackOptions
from . import hoist as _hoist
from . import jaxprs as _jaxpr
from . import marks as _marks
from . import primitives
from . import split as _split
from .jaxprs import is_float

_DEFAULT_OPTIONS = StackOptions()

PyTree = Any
tmap = jax.tree.map

CARRY = "carry"  # y_route tag: the per-step output is a (differentiated) carry leaf
BLOCK = "block"  # y_route tag: the per-step output is computed by the block


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stack(abc.ABC):
    """A residual stack as the forward and the backward see it (see the module docstring).

    Attributes:
      length: the number of steps ``L``.
      num_carry: the number of carry leaves (flat).
      diff: positions, in the flat list of carry leaves, of the differentiated leaves ``h``.
      y_route: per per-step output leaf (flattened), ``(CARRY, p)`` (its cotangent joins that of
        differentiated carry leaf ``p``), ``(BLOCK, m)`` (the block's ``m``-th extra output) or
        ``None`` (no cotangent). Leaves past the end of the tuple have ``None``.
      options: the stack's backward-only ``gamma`` and how it is linearized (checked already).
      unroll: forward scan unrolling.
      reverse: the forward runs from the last step to the first (``lax.scan(reverse=True)``).
      block_reads_carry: whether ``block`` depends on ``h`` (``J != 0``). Only then does the
        backward move any ``|K| > 1`` from the prefix scan into the sweeps; a block that ignores
        the carry (a linear diagonal recurrence) keeps ``k = 0`` exact whatever ``K`` is.
      k_within_one: whether ``|K| <= 1`` is known (from the split: ``h + z``, gates from a sigmoid,
        ReLU masks), so the backward needs no clip, and stores no raw ``K``, for it.
      k_is_one: whether ``K = 1`` exactly (every differentiated leaf's residual is ``h + ...``): the
        prefix scan is then a reverse cumulative sum and ``K`` is never computed.
      remat: the checkpoint the user wrapped each step in (``nnx.remat``, ``jax.checkpoint``),
        kept around the block: the backward recomputes what its policy does not save, a group of
        layers at a time (``None``: no checkpoint).
    """

    length: int
    num_carry: int
    diff: tuple[int, ...]
    y_route: tuple[tuple[str, int] | None, ...] = ()
    options: StackOptions = dataclasses.field(default_factory=StackOptions)
    unroll: int | bool = 1
    reverse: bool = False
    block_reads_carry: bool = True
    k_within_one: bool = False
    k_is_one: bool = False
    remat: _split.Remat | None = None

    @property
    def state(self) -> tuple[int, ...]:
        """Positions of the carry leaves that are not differentiated."""
        return tuple(i for i in range(self.num_carry) if i not in self.diff)

    @property
    def block_outputs(self) -> int:
        """How many extra per-step outputs ``yb`` the block computes."""
        return sum(1 for r in self.y_route if r is not None and r[0] == BLOCK)

    @abc.abstractmethod
    def step(self, carry: list, x: PyTree, consts: tuple) -> tuple[list, PyTree]:
        """One forward step on the whole flat carry: ``(new carry leaves, per-step outputs)``."""

    @abc.abstractmethod
    def block(self, h: list, xe: tuple[PyTree, list], consts: tuple) -> tuple[PyTree, list]:
        """``(z, yb)`` from the differentiated leaves ``h``, ``xe = (x, s)`` and the shared ``consts``."""

    @abc.abstractmethod
    def residual(self, h: list, z: PyTree) -> list:
        """The new differentiated leaves, elementwise in ``h``."""

    def step_inputs(self, init: list, xs: PyTree) -> tuple[list, tuple]:
        """``(h, xe)`` of the first step, from the stack's initial carry and per-layer inputs."""
        x = [a[0] for a in jax.tree.leaves(xs)]
        return [init[i] for i in self.diff], (x, [init[i] for i in self.state])

    def layer_inputs(self, xs: PyTree) -> PyTree:
        """The per-layer inputs as the backward reads them, stacked on a leading layer axis (a
        scan's ``xs`` are already)."""
        return xs

    def layer_cotangents(self, ct_xs: PyTree) -> PyTree:
        """The cotangents of the per-layer inputs, laid out as :meth:`layer_inputs` received them."""
        return ct_xs

    def path(self, h: list, xe, consts: tuple):
        """The block path of a layer: ``((new leaves, yb), z)`` whose Jacobian in ``h`` is ``J``.

        The block, then the residual with its own ``h`` held fixed: one VJP of it takes the
        cotangent of the layer's output to ``J^T`` of it (``K``, the residual's own dependence on
        ``h``, is the prefix scan's). ``z`` is returned as an auxiliary value, for ``K``.
        """
        z, yb = self.block(h, xe, consts)
        return (self.residual([lax.stop_gradient(a) for a in h], z), yb), z


def scan_steps(stack: Stack, init: list, xs: PyTree, consts: tuple, *, length: int | None = None, lin=None):
    """``(final carry, per-step outputs, saved, linearization)`` by ``lax.scan`` over ``stack.step``.

    ``saved`` holds every carry leaf as it *entered* each step (``h_0 .. h_{L-1}``, stacked): what the
    backward linearizes the layers at, with no shifted copy to make. ``lin`` (a
    :class:`hbpjax._linearize.ForwardLinearization`) has every step also compute its layer's
    linearization: ``linearization`` is ``(its per-step values, stacked; its hoisted values)``, or
    ``None`` without ``lin``. ``length`` overrides ``stack.length`` (a chunk of a layer-parallel stack).

    What the step computes from its per-step inputs alone (an RNN cell's input matmul) is computed
    for all steps before the loop (:mod:`hbpjax._hoist`); with ``lin``, each computation the step
    and its linearization share is evaluated once (:func:`hbpjax._analysis.dedup.traced_once`).
    """
    hoisted = lin.hoisted(consts) if lin is not None else []

    def step_and_values(carry, x, consts):
        new, ys = stack.step(carry, x, consts)
        values = [] if lin is None else lin.step([carry[i] for i in stack.diff], (x, [carry[i] for i in stack.state]), consts)
        return new, ys, values

    one_x = tmap(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    split = _hoist.split_step(step_and_values, init, one_x, consts, once=lin is not None)
    consts_leaves = jax.tree.leaves(consts)
    pre = split.before(jax.tree.leaves(xs), consts_leaves)
    n_carry = len(init)

    def body(carry, inputs):
        x, pre_j = inputs
        out = split.step(carry, x, pre_j, consts_leaves)
        return out[:n_carry], (out[n_carry:], carry)

    final, (outs, saved) = lax.scan(
        body, init, (jax.tree.leaves(xs), pre), length=stack.length if length is None else length,
        reverse=stack.reverse, unroll=stack.unroll,
    )
    _, ys, values = jax.tree.unflatten(split.tree, [*final, *split.outputs(outs, pre)])
    return list(final), ys, saved, None if lin is None else (values, hoisted)


scan_forward = scan_steps  # the forward of a single-device stack: (final, ys, saved, linearization)


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
        (:func:`hbpjax._split.read_through`); the block and the residual evaluate it.
      rule: the step's new carry comes out of a custom derivative rule (``custom_vjp``,
        ``custom_jvp``) that ``flat`` reads through: the split finds ``K`` in its primal, and the
        block path is the whole step (:meth:`rule_step`, differentiated by the user's rule) minus
        the residual path, so ``K + J`` is the rule's Jacobian.
      num_consts: how many of the body's inputs are shared values.
      split: the residual split of ``flat`` for the differentiated carry leaves.
      block_ys: the per-step outputs the block computes (``(BLOCK, m)`` routes), in order.
      eval_eqn: how the block evaluates an equation (the automatic stacks rewrite nested scans);
        marked checkpoints are evaluated by their contents either way.
    """

    body: Any
    flat: Any
    num_consts: int
    split: Any
    rule: bool = False
    block_ys: tuple = ()
    eval_eqn: Any = None

    def step(self, carry, x, consts):
        env = _jaxpr.closed_env(self.body, [*consts, *carry, *x])
        out = _jaxpr.run(self.body.jaxpr, env, eval_eqn=_marks.inline())
        return out[: len(carry)], out[len(carry) :]

    def block(self, h, xe, consts):
        x, s = xe
        carry = self._carry(h, s)
        targets = [*self.split.z, *self.block_ys]
        eval_eqn = _marks.inline(self.eval_eqn or _jaxpr.bind)

        def evaluate(args):
            env = _jaxpr.closed_env(self.flat, args)
            return _jaxpr.evaluate(self.flat.jaxpr.eqns, env, targets, eval_eqn=eval_eqn)

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
    eval_eqn=None,
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
    found = _split.split(jaxpr, [carry_in[i] for i in diff], [carry_out[i] for i in diff], opaque=opaque)
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
    reads = _jaxpr.depends_on(jaxpr.eqns, [carry_in[i] for i in diff], [*found.z, *block_ys])
    stack = (kind or ScanStack)(
        length=length, num_carry=num_carry, diff=diff, y_route=tuple(routes), options=options,
        unroll=unroll, reverse=reverse, block_reads_carry=reads,
        k_within_one=all(b is not None and b <= 1.0 for b in found.k_bounds),
        k_is_one=bool(found.kinds) and all(kind == _split.IDENTITY for kind in found.kinds), body=body,
        flat=flat, remat=remat, rule=rule, num_consts=num_consts, split=found, block_ys=tuple(block_ys),
        eval_eqn=eval_eqn,
    )
    return found, stack


def _from_stop_gradient(jaxpr, var) -> bool:
    """Whether ``var`` is the output of a ``stop_gradient`` (its cotangent is zero anyway)."""
    return any(var in eqn.outvars and primitives.is_stop_gradient(eqn) for eqn in jaxpr.eqns)
