"""Automatic stacks: the residual stacks of any function, found in its jaxpr and converted.

``highway_grad(fun)`` traces ``fun`` once (:mod:`hbpjax._analysis.trace`), plans it once
(:mod:`hbpjax._analysis.planner`) and evaluates the plan under ``jax.value_and_grad``
(:mod:`hbpjax._analysis.evaluate`): every equation is bound as traced, except the scans and chains
the plan converts, which run as Highway-BP stacks whose forward evaluates the user's own steps, so
values are those of ``fun`` and only their backward changes. :func:`find_stacks` traces and plans
the same way and prints the plan's rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from .._front import context
from .._front.options import Options
from .evaluate import Evaluator
from .info import NoStackWarning, Stacks
from .plan import Plan, scans, with_microbatch_stacks
from .planner import Planner
from .trace import microbatch_of, trace


class Conversion:
    """A function traced and planned once on some arguments, evaluated with its stacks converted.

    Attributes:
      options: the transform's options.
      traced: the function's jaxpr over its array arguments.
      plan: the plan of that jaxpr.
      stacks: the converted stacks that give a sweep report (``return_report``), by slot.
    """

    def __init__(self, fun: Callable, options: Options, args: tuple, kwargs: dict, *, differentiated=(), small=None):
        self.options = options
        with context.active(options):
            self.traced = trace(fun, args, kwargs, differentiated=differentiated, unshard=options.layer_axis)
        self.plan = Planner(options).plan(self.traced.closed)
        self.stacks = list(self.plan.reporting)
        if options.microbatches is not None and any(True for _ in scans(self.plan.program)):
            if small is None:  # the batch: the arrays of the arguments that are not differentiated
                diff = {a % len(args) for a in differentiated} if args else set()
                keep = lambda key, _: key in diff
                small = (fun, *first_microbatch(args, kwargs, keep, options, batch="not differentiated"))
            self.plan = self._with_microbatch_stacks(*small, differentiated=differentiated)

    def _with_microbatch_stacks(self, fun, args, kwargs, *, differentiated) -> Plan:
        """:attr:`plan` with every converted scan given its stack traced on one microbatch
        (``options.microbatches``): what a pipelined layer-parallel forward runs."""
        name, count = self.options.name, self.options.microbatches
        try:
            with context.active(self.options):
                small = trace(fun, args, kwargs, differentiated=differentiated, unshard=self.options.layer_axis)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{name}: microbatches={count} traces the function again on 1/{count} of the batch, to find "
                f"each layer's computation on one microbatch; that trace failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0]})."
            ) from None
        full, micro = list(scans(self.plan.program)), list(scans(Planner(self.options).plan(small.closed).program))
        if len(full) != len(micro) or any(a.stack.length != b.stack.length for a, b in zip(full, micro)):
            raise ValueError(
                f"{name}: with microbatches={count} the function, traced on 1/{count} of the batch, runs other "
                f"stacks ({[b.stack.length for b in micro]} layers) than on the whole batch "
                f"({[a.stack.length for a in full]} layers): its structure must not depend on the batch size."
            )
        return with_microbatch_stacks(self.plan, [b.stack for b in micro])

    def evaluate(self, slots, *args, **kwargs):
        """The function's value at ``(args, kwargs)`` (laid out as the traced ones), its stacks
        converted. ``slots`` is ``None`` or a ``float32[len(stacks), 2]`` that the stacks ignore and
        whose cotangent is their sweep report."""
        outs = Evaluator(self.options, slots).run(self.plan.program, self.traced.inputs(args, kwargs))
        return self.traced.unflatten(outs)

    def warn(self, stacklevel: int = 2) -> None:
        """Warns with a :class:`hbpjax.NoStackWarning` if the plan converts nothing, with what
        :func:`find_stacks` says of every scan."""
        if not self.plan.none_converted:
            return
        rows = self.plan.program.rows
        listing = "".join(f"\n  {i.source} ({i.kind}, L={i.length}): {i.reason}" for i in rows[:5])
        listing = listing or (
            " The function runs no scan and no chain of residual blocks: nothing to convert (a "
            "lax.associative_scan is parallel already)."
        )
        warnings.warn(
            NoStackWarning(
                f"{self.options.name}: found no residual stack to convert (scans={self.options.scans!r}), so this "
                f"gradient is plain backprop.{listing}\nhbpjax.find_stacks(fun, *args) lists every scan and why it "
                "was not converted."
            ),
            stacklevel=stacklevel + 1,
        )


def first_microbatch(args: tuple, kwargs: dict, keep: Callable, options: Options, *, batch: str):
    """``(args, kwargs)`` with the arrays of every argument ``keep(position or keyword, value)``
    rejects (the batch, the arguments that are ``batch``) cut to their first microbatch."""
    count, name = int(options.microbatches or 1), options.name
    cut = lambda key, a, where: a if keep(key, a) else microbatch_of(a, count, name=name, where=f"{where} ({batch})")
    small = tuple(cut(i, a, f"argument {i}") for i, a in enumerate(args))
    return small, {k: cut(k, v, f"keyword argument {k!r}") for k, v in kwargs.items()}


def find_stacks(fun: Callable, *args: Any, **kwargs: Any) -> Stacks:
    """The scans of ``fun(*args, **kwargs)`` and what :func:`hbpjax.highway_grad` does with each.

    One :class:`StackInfo` per scan in program order (scans inside ``jit``, ``jax.checkpoint`` and
    other scans included), and one per chain of residual blocks written one after the other (a
    Python loop of layers), converted or not. A stack nested in another's block (a scan in each
    block of a Python loop of layers) is listed once, after the stack whose block holds it. ``print``
    the result for a table.

    Args:
      fun: the function, as you would pass it to ``jax.grad`` (a loss, or a model's forward).
      *args: positional arguments to trace it with (arrays or ``jax.ShapeDtypeStruct``).
      **kwargs: keyword arguments to trace it with.

    Returns:
      A list of :class:`StackInfo` (its ``str`` is a table).

    Raises:
      TypeError: ``fun`` is not callable.

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> def loss(W, x):
      ...     h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)   # residual
      ...     g, _ = jax.lax.scan(lambda g, w: (jnp.tanh(g @ w), None), x, W)       # not
      ...     return jnp.sum(h) + jnp.sum(g)
      >>> stacks = hbpjax.find_stacks(loss, jnp.ones((8, 3, 3)), jnp.ones(3))
      >>> [(s.length, s.residual, s.converted) for s in stacks]
      [(8, ('identity',), True), (8, ('none',), False)]
    """
    if not callable(fun):
        raise TypeError(f"hbpjax.find_stacks: `fun` must be callable; got {fun!r}.")
    options = Options(iterations=0, name="hbpjax.find_stacks")
    with context.active(options):  # residual_scans trace as they do under highway_grad
        traced = trace(fun, args, kwargs)
    return Stacks(Planner(options).plan(traced.closed).program.rows)
