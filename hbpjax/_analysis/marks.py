"""How a :func:`hbpjax.residual_scan` shows itself, with its options, in a traced program.

While a highway transform traces a function, ``residual_scan`` wraps its scan in a
``jax.checkpoint`` whose policy is a :class:`StackMark` holding the stack's
:class:`~hbpjax._front.options.StackOptions`, and its block in one whose policy is :data:`BLOCK`. JAX keeps
a checkpoint's policy object as it is in the ``checkpoint`` equation, through every transformation
(``jvp``, ``vmap``, transposition), so the conversion (:mod:`hbpjax._analysis.conversion`) reads the options as
Python objects straight from the equation and knows which equations are the block (a cut of the
residual split, whatever it computes).

Both policies save every value: a checkpoint that saves everything recomputes nothing, so anything
JAX does with the marked code during the trace (an inner ``jax.grad``, ``jax.jvp``, ``vmap``) is
what it does with the code unmarked. The conversion evaluates marked equations by their contents,
so the program that runs holds no trace of the marks. Outside a highway transform nothing is
marked: ``residual_scan`` is exactly ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from .._front.options import StackOptions
from . import jaxprs as _jaxpr
from . import primitives


class _SaveAll:
    """A ``jax.checkpoint`` policy that saves every value (the checkpoint changes nothing)."""

    def __call__(self, prim, *avals, **params) -> bool:
        return True


@dataclasses.dataclass(frozen=True, eq=False)
class StackMark(_SaveAll):
    """The mark of a ``residual_scan``'s scan: its options, and for a layer-parallel stack (whose
    backward is built while it is traced) the mesh axis and the number of layers.

    Compared by identity: each ``residual_scan`` call makes its own.
    """

    options: StackOptions
    layer_axis: str | None = None
    length: int = 0


class _BlockMark(_SaveAll):
    def __repr__(self) -> str:
        return "hbpjax.block"


#: The mark of a ``residual_scan``'s block.
BLOCK = _BlockMark()


def mark(fun: Callable, policy: _SaveAll) -> Callable:
    """``fun`` traced under a checkpoint carrying ``policy`` (see the module docstring)."""
    return jax.checkpoint(fun, policy=policy, prevent_cse=False)


def policy(eqn):
    """The mark an equation carries (a :class:`StackMark` or :data:`BLOCK`), or ``None``."""
    if primitives.is_checkpoint(eqn):
        found = eqn.params.get("policy")
        if isinstance(found, _SaveAll):
            return found
    return None


def stack_mark(eqn) -> StackMark | None:
    """The :class:`StackMark` of a marked ``residual_scan``, else ``None``."""
    found = policy(eqn)
    return found if isinstance(found, StackMark) else None


def is_block(eqn) -> bool:
    """Whether ``eqn`` is the marked block of a ``residual_scan`` step."""
    return policy(eqn) is BLOCK


def inline(eval_eqn: Callable = _jaxpr.bind) -> Callable:
    """An ``eval_eqn`` (see :func:`hbpjax._analysis.jaxprs.evaluate`) that evaluates marked checkpoints by
    their contents and every other equation with ``eval_eqn``. The marks save everything, so this
    computes what binding them computes, without a checkpoint in the program."""

    def run(eqn, invals):
        if policy(eqn) is None:
            return eval_eqn(eqn, invals)
        inner = eqn.params["jaxpr"]
        jaxpr, consts = getattr(inner, "jaxpr", inner), getattr(inner, "consts", ())
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, invals))
        return _jaxpr.run(jaxpr, env, eval_eqn=run)

    return run
