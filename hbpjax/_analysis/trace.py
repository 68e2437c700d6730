"""Tracing a function to the jaxpr the analysis reads: over the array leaves of its arguments."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core


def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.core.Tracer, jax.ShapeDtypeStruct))


@dataclasses.dataclass
class Traced:
    """``fun`` traced on some arguments: its jaxpr over the array leaves of ``(args, kwargs)``."""

    closed: core.ClosedJaxpr
    in_tree: Any
    dynamic: list[int]  # positions of the leaves that are the jaxpr's inputs
    out_tree: Any
    out_static: dict  # output leaves that are not arrays (Python values in aux), by position

    def inputs(self, args: tuple, kwargs: dict) -> list:
        """The jaxpr's inputs from arguments laid out as the traced ones."""
        leaves, in_tree = jax.tree.flatten((args, kwargs))
        if in_tree != self.in_tree:
            raise ValueError(f"hbpjax: arguments changed between tracing and evaluation: {in_tree} vs {self.in_tree}")
        return [leaves[i] for i in self.dynamic]

    def unflatten(self, outs: Sequence):
        dynamic, leaves = iter(outs), []
        for i in range(self.out_tree.num_leaves):
            leaves.append(self.out_static[i] if i in self.out_static else next(dynamic))
        return jax.tree.unflatten(self.out_tree, leaves)


def trace(
    fun: Callable, args: tuple, kwargs: dict, *, differentiated: Sequence[int] = (), unshard: str | None = None
) -> Traced:
    """Traces ``fun(*args, **kwargs)`` to a jaxpr over the array leaves of the arguments and every
    leaf of the positional arguments in ``differentiated`` (Python numbers there are traced, as
    ``jax.grad`` traces them); other non-array leaves are baked into the jaxpr.

    With ``unshard`` (a transform's ``layer_axis``), the arguments are traced as if that Explicit
    mesh axis shards none of them: JAX refuses to trace a scan over inputs sharded along their
    leading axis, and such scans are exactly the ones evaluated layer-parallel."""
    leaves, in_tree = jax.tree.flatten((args, kwargs))
    traced_args = {a % len(args) for a in differentiated} if args else set()
    starts = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in args])
    forced = {i for a in traced_args for i in range(starts[a], starts[a + 1])}
    dynamic = [i for i, leaf in enumerate(leaves) if i in forced or _is_dynamic(leaf)]
    found = {}

    def flat_fun(*values):
        filled = list(leaves)
        for i, v in zip(dynamic, values):
            filled[i] = v
        a, kw = jax.tree.unflatten(in_tree, filled)
        out_leaves, out_tree = jax.tree.flatten(fun(*a, **kw))
        found["tree"] = out_tree
        found["static"] = {i: x for i, x in enumerate(out_leaves) if not _is_dynamic(x)}
        return [x for i, x in enumerate(out_leaves) if i not in found["static"]]

    values = [leaves[i] for i in dynamic]
    if unshard is not None:
        values = [_without_axis(v, unshard) for v in values]
    closed = jax.make_jaxpr(flat_fun)(*values)
    return Traced(closed, in_tree, dynamic, found["tree"], found["static"])


def _without_axis(value, axis: str):
    """``value``'s type with ``axis`` taken out of its sharding (the value itself if its type has
    no mesh or does not use ``axis``)."""
    aval: Any = jax.typeof(value)
    sharding = getattr(aval, "sharding", None)
    if sharding is None or getattr(sharding, "mesh", None) is None or sharding.mesh.empty:
        return value
    uses = lambda s: s == axis or (isinstance(s, tuple) and axis in s)
    if not any(uses(s) for s in sharding.spec):
        return value
    drop = lambda s: None if s == axis else tuple(a for a in s if a != axis) or None if isinstance(s, tuple) else s
    spec = jax.sharding.PartitionSpec(*(drop(s) for s in sharding.spec))
    return jax.ShapeDtypeStruct(
        aval.shape, aval.dtype, sharding=jax.sharding.NamedSharding(sharding.mesh, spec), weak_type=aval.weak_type
    )


def microbatch_of(tree, count: int, *, name: str, where: str):
    """The first of ``count`` microbatches of every array in ``tree``: its first ``1/count`` of rows
    along axis 0 (for tracing at a microbatch's shapes; rank-0 leaves and non-arrays stay)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves:
        if not _is_dynamic(leaf) or isinstance(leaf, jax.ShapeDtypeStruct) or np.ndim(leaf) == 0:
            out.append(leaf)
            continue
        if leaf.shape[0] % count:
            raise ValueError(
                f"{name}: microbatches={count} splits the leading (batch) axis of every array of {where}; "
                f"{jax.tree_util.keystr(path) or 'it'} has shape {tuple(leaf.shape)}. Use a batch size divisible "
                f"by {count}."
            )
        out.append(leaf[: leaf.shape[0] // count])
    return jax.tree_util.tree_unflatten(treedef, out)
