"""The adapter protocol for Flax NNX modules (see :mod:`hbpjax._front.adapters`): what
:func:`hbpjax.nnx.value_and_grad` and :func:`hbpjax.nnx.grad` differentiate, and how a function of
modules, which it may mutate, is traced and planned. Loaded with :mod:`hbpjax.nnx` (it needs Flax)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx as _nnx

from .._analysis import conversion as _conversion
from . import adapters as _adapters
from .options import describe
from .transform import ValueAndGrad


class _GraphConversion:
    """:class:`hbpjax._analysis.conversion.Conversion` for a function of NNX modules, which it may mutate.

    The modules are split into a graph definition and a state; the pure function of the state that
    merges them, calls ``f`` and returns the new state is traced once and evaluated with its stacks
    converted; the new state (updated BatchNorm statistics, RNG counters) is written back to the
    modules ``f`` is evaluated with.
    """

    def __init__(self, f: Callable, options, args: tuple, kwargs: dict, argnums=0):
        self.f, self.options, self.argnums = f, options, argnums
        self.graphdef, state = _nnx.split((args, kwargs))
        small: tuple | None = None
        if options.microbatches is not None:  # the batch: the arguments that are not modules
            small_args, small_kwargs = _first_microbatch(args, kwargs, argnums, options)
            small_graphdef, small_state = _nnx.split((small_args, small_kwargs))
            small = (functools.partial(self._pure, graphdef=small_graphdef), (small_state,), {})
        # Every leaf of the state is traced, as nnx.value_and_grad passes all of it through JAX.
        self.conversion = _conversion.Conversion(self._pure, options, (state,), {}, differentiated=(0,), small=small)
        self.stacks = self.conversion.stacks

    def _pure(self, state, graphdef=None):
        merged_args, merged_kwargs = _nnx.merge(self.graphdef if graphdef is None else graphdef, state)
        out = self.f(*merged_args, **merged_kwargs)
        return out, _nnx.state((merged_args, merged_kwargs), _nnx.Variable)

    def evaluate(self, slots, *args, **kwargs):
        graphdef, state = _nnx.split((args, kwargs))
        conversion = self.conversion
        if graphdef != self.graphdef:  # not the graph it was traced with: trace this one
            conversion = _GraphConversion(self.f, self.options, args, kwargs, self.argnums).conversion
        out, new_state = conversion.evaluate(slots, state)
        self.last = conversion
        _nnx.update((args, kwargs), new_state)
        return out

    def warn(self, stacklevel: int = 2) -> None:
        """:meth:`hbpjax._analysis.conversion.Conversion.warn` of the last evaluation."""
        getattr(self, "last", self.conversion).warn(stacklevel + 1)


class Adapter(_adapters.Adapter):
    """How :func:`value_and_grad` reaches NNX modules (the adapter protocol of
    :mod:`hbpjax._front.adapters`): ``argnums`` may be ``nnx.DiffState``s, the differentiated
    arguments are modules or states, ``nnx.value_and_grad`` differentiates (``graph`` and
    ``graph_updates`` as given), and the modules split into a graph definition and a state."""

    def __init__(self, graph: bool | None = None, graph_updates: bool | None = None):
        self.graph, self.graph_updates = graph, graph_updates

    def normalize(self, name, argnums):
        plain = [a for a in _diff_argnums(argnums) if not isinstance(a, _nnx.DiffState)]
        _adapters.normalize_argnums(name, tuple(plain))
        return argnums

    def check(self, name, argnums, args, *, allow_int, holomorphic) -> None:
        for a in _diff_argnums(argnums):
            if not -len(args) <= a < len(args):
                raise TypeError(
                    f"{name}: differentiating with respect to argnums={a} requires at least "
                    f"{max(a + 1, -a)} positional arguments, but got only {len(args)}."
                )
            if not isinstance(args[a], (_nnx.Module, _nnx.State)):
                raise TypeError(
                    f"{name}: argument {a} must be an nnx.Module or an nnx.State (the model whose "
                    f"nnx.Param gradients you want); got {describe(args[a])}. For plain pytrees of "
                    "arrays use hbpjax.highway_value_and_grad."
                )

    def jax_transform(self, fun, argnums, *, has_aux, holomorphic, allow_int):
        return _nnx.value_and_grad(
            fun, argnums=argnums, has_aux=has_aux, holomorphic=holomorphic, allow_int=allow_int,
            graph=self.graph, graph_updates=self.graph_updates,
        )

    def conversion(self, fun, options, args, kwargs, argnums):
        return _GraphConversion(fun, options, args, kwargs, argnums)

    def arrays(self, args, kwargs):
        graphdef, state = _nnx.split((args, kwargs))
        return state, lambda state: _nnx.merge(graphdef, state)

    def value_and_grad(self, fun, argnums, has_aux, *, options):
        return ValueAndGrad(fun, argnums, has_aux, options=options, adapter=self)


def _diff_argnums(argnums) -> tuple[int, ...]:
    nums = argnums if isinstance(argnums, (tuple, list)) else (argnums,)
    return tuple(a.argnum if isinstance(a, _nnx.DiffState) else a for a in nums)



def _first_microbatch(args: tuple, kwargs: dict, argnums, options):
    """``(args, kwargs)`` with every argument that is not differentiated and holds no module or
    ``nnx.State`` (the batch) cut to its first microbatch along its leading axis."""
    diff = {a % len(args) for a in _diff_argnums(argnums)} if args else set()
    graph = (_nnx.Module, _nnx.State, _nnx.Variable)
    holds_graph = lambda a: any(isinstance(x, graph) for x in jax.tree.leaves(a, is_leaf=lambda x: isinstance(x, graph)))
    keep = lambda key, a: key in diff or holds_graph(a)
    return _conversion.first_microbatch(args, kwargs, keep, options, batch="not a module")
