"""Step 1 of the Highway-BP backward: every layer linearized once, all layers at once.

What is linearized is each layer's *block path* (:meth:`hbpjax._backward.stack.Stack.path`): the block,
then the residual with its own carry held fixed. One VJP of it takes the cotangents of all layers'
outputs to the block's term ``J^T y`` and to the cotangents of the layers' inputs (per-layer ``xs``
mapped, shared values broadcast, so shared weights get one summed gradient instead of a ``(L, ...)``
stack). The residual's part of ``J^T y`` (``y * h`` for a gated residual) is computed inside the
VJP, where XLA fuses it into the ops that read it: passed in as the cotangent of ``z`` it would go
through the optimization barrier that ``jax.checkpoint``'s VJP puts on its cotangents, a
carry-sized buffer in every sweep.

How the linearization is kept between the sweeps that read it:

* ``vmap`` (default): one ``jax.vjp`` of the vmapped block path. Read by more than one VJP, it
  stores only what is costly to recompute (:func:`hbpjax._analysis.primitives.is_recomputed` says what is not); read once it
  is kept whole (nothing to save, no work to redo); blocks that compute complex values are kept
  whole (``jax.checkpoint`` cannot store them).
* ``unroll``: one transpose per layer (one ``jax.vjp`` per layer where the backward linearizes),
  still independent of each other (for ops that XLA batches poorly, such as convolutions with
  per-layer kernels on a CPU, and on a CPU, where per-layer matmuls run faster than batched ones).
* ``save_linearization=False``, and steps the user wrapped in a checkpoint whose forward cannot
  linearize them (a nested stack in the block): nothing kept; each VJP recomputes the layers in
  groups (within a group, the checkpoint's policy decides what is stored between its forward and
  its backward). Other checkpointed steps keep what their policy saves, from the forward
  (:mod:`hbpjax._backward.forward_linearization`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._analysis import jaxprs as _jaxpr
from .._analysis import primitives
from .._front.options import Options
from .stack import Stack

PyTree = Any
tmap = jax.tree.map


@dataclasses.dataclass(frozen=True)
class Linearization:
    """Every layer's block path, linearized.

    Attributes:
      z_of: computes the block's values of every layer (what the residual reads; ``K`` comes from
        them) when called, or ``None`` where the forward computed ``K`` itself. A function, so that
        a stack that never needs ``z`` (``K = 1``) never computes it.
      vjp: ``vjp(after, ct_block) -> (ct_h, ct_xe, ct_consts)``: the cotangents of every layer's
        inputs, given those of its output (``after[j]``) and of its per-step block outputs.
      k_diag: ``K`` of every layer, where the forward computed it (else ``None``).
    """

    z_of: Callable[[], PyTree] | None
    vjp: Callable
    k_diag: list | None = None


def linearize(stack: Stack, options: Options, h_prev, xe, consts, *, read_once: bool) -> Linearization:
    """Linearizes all layers of ``stack`` at their inputs ``(h_prev, xe)`` and the shared ``consts``.

    Args:
      stack: the stack.
      options: the transform's options (``save_linearization``).
      h_prev: the differentiated carry leaves entering every layer, stacked.
      xe: ``(xs, state leaves entering every layer)``.
      consts: the values shared by all layers.
      read_once: the linearization is read by one VJP only (no sweeps, no per-step block outputs).
    """
    try:
        return _linearize(stack, options, h_prev, xe, consts, read_once=read_once, unroll=stack.options.linearize == "unroll")
    except NotImplementedError as err:  # a primitive with no batching rule (pure_callback without vmap_method)
        if stack.options.linearize == "unroll":
            raise
        length = h_prev[0].shape[0]
        if length > UNROLL_AT_MOST:
            raise Unbatchable(str(err)) from err
        warnings.warn(
            f"hbpjax: a block of {length} layers holds an operation that cannot be vmapped ({_first_line(err)}); "
            "its layers are linearized one by one instead (linearize='unroll'), still in parallel.",
            UnbatchableWarning,
            stacklevel=2,
        )
        return _linearize(stack, options, h_prev, xe, consts, read_once=read_once, unroll=True)


#: A stack whose block cannot be vmapped is linearized layer by layer up to this many layers (the
#: program grows with the layers); a longer one runs exact backprop.
UNROLL_AT_MOST = 64


class UnbatchableWarning(UserWarning):
    """A block holds an operation JAX cannot vmap: its stack is linearized layer by layer, or runs
    exact backprop.

    Highway-BP applies all layers' transposes at once (a ``vmap`` of the block's linearization). A
    ``jax.pure_callback`` without ``vmap_method`` (or a custom primitive without a batching rule) on
    the block's differentiated path cannot be batched; the stack then takes the route that still
    works and says so with this warning (once per trace).

    Examples:
      >>> import warnings, hbpjax
      >>> warnings.simplefilter("ignore", hbpjax.UnbatchableWarning)   # to silence it
    """


class Unbatchable(Exception):
    """The block cannot be vmapped and the stack is too long to linearize layer by layer."""


def _first_line(err) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _linearize(stack, options, h_prev, xe, consts, *, read_once, unroll) -> Linearization:
    path = stack.path
    if unroll:
        whole = read_once or holds_complex(path, *(tmap(lambda a: a[0], t) for t in (h_prev, xe)), consts)
        block, vjp_of = (path, jax.vjp) if whole else (lean(path), vjp_unrounded)
        z, vjp = _unrolled(block, h_prev, xe, consts, vjp=vjp_of)
        z_of = lambda: z
    elif recomputes(stack, options):
        z_of, vjp = _in_groups(path, h_prev, xe, consts, groups=groups(stack, options, h_prev[0].shape[0]))
    else:
        whole = read_once or holds_complex(jax.vmap(path, in_axes=(0, 0, None)), h_prev, xe, consts)
        block, vjp_of = (path, jax.vjp) if whole else (lean(path), vjp_unrounded)
        _, vjp, z = vjp_of(jax.vmap(block, in_axes=(0, 0, None)), h_prev, xe, consts, has_aux=True)
        z_of = lambda: z
    return Linearization(z_of, lambda after, ct_block: vjp((after, ct_block)))


def recomputes(stack: Stack, options: Options) -> bool:
    """Whether every VJP recomputes the layers' linearization, a group of layers at a time: when
    asked to save memory (``save_linearization=False``), and for a step the user wrapped in a
    checkpoint (so the backward stays within the memory the checkpoint is for)."""
    return not options.save_linearization or stack.remat is not None


def _saved(prim, *avals, **params) -> bool:
    """The ``jax.checkpoint`` policy of the layers' linearization: store what is costly to
    recompute (matmuls, transcendentals, reductions, comparisons, ...), not elementwise arithmetic."""
    return not primitives.is_recomputed(prim)


def lean(block):
    """``block`` whose linearization (``jax.vjp``) stores only the values :func:`_saved` keeps.

    A VJP recomputes the rest from them, fused into the ops that read it. Left to JAX's own rules,
    the linearization of a GRU cell stores ``u``, ``u (1 - u)``, ``c`` and ``1 - c**2`` (four
    carry-sized stacks, kept through all sweeps); this way only ``u`` and ``c``.
    """
    return jax.checkpoint(block, policy=_saved)


def holds_complex(fun, *args) -> bool:
    """Whether ``fun`` computes any complex value, or is given one.

    ``jax.checkpoint`` rounds the values it stores with ``reduce_precision``, which JAX does not
    accept for complex dtypes: such blocks are linearized whole, without :func:`lean`.
    """
    if any(jnp.iscomplexobj(a) for a in jax.tree.leaves(args)):
        return True
    return _jaxpr.computes_complex(jax.make_jaxpr(fun)(*args).jaxpr)


def vjp_unrounded(fun, *args, has_aux=False):
    """``jax.vjp(fun, *args, has_aux=has_aux)`` for a ``fun`` under :func:`lean`, without the
    no-op roundings ``jax.checkpoint`` puts on the values it stores.

    ``jax.checkpoint`` passes every stored value through ``reduce_precision`` to its own dtype's
    precision (against excess precision in fused bfloat16 code). XLA may keep such a rounding as a
    buffer of its own beside the value, which the forward's other readers (``K``, the plan) still
    read: a second copy of every stored stack through all sweeps. For float32 and float64 the
    rounding changes no value, so the linearization is traced once and evaluated without it,
    equation by equation; other dtypes keep it.
    """
    structure = []

    def flat(*args):
        # The VJP function is a pytree: its leaves are the stored values.
        leaves, tree = jax.tree.flatten(jax.vjp(fun, *args, has_aux=has_aux))
        structure.append(tree)
        return leaves

    closed = jax.make_jaxpr(flat)(*args)
    with jax.named_scope("linearization"):  # profiles and HLO dumps name its ops
        leaves = _jaxpr.run(closed.jaxpr, _jaxpr.closed_env(closed, jax.tree.leaves(args)), eval_eqn=unrounded)
    return jax.tree.unflatten(structure[0], leaves)


def unrounded(eqn, invals) -> list:
    """Evaluates ``eqn``, passing the value through where it is a ``reduce_precision`` of float32 /
    float64 to their own precision."""
    if primitives.rounds_to_own_precision(eqn):
        return [invals[0]]
    return _jaxpr.bind(eqn, invals)


#: ``save_linearization=False`` recomputes the layers in this many consecutive groups.
GROUPS = 8


def group_size(length: int, at_most: int) -> int:
    """The largest number of consecutive layers, at most ``at_most``, that splits ``length`` evenly."""
    return max(d for d in range(1, min(at_most, length) + 1) if length % d == 0)


def layers_at_once(stack: Stack, options: Options) -> int | None:
    """How many layers a recomputing VJP takes at a time: ``options.recompute_layers``; by default
    one for a checkpointed step (as backprop's backward), ``None`` otherwise (:data:`GROUPS` groups)."""
    if options.recompute_layers is None and stack.remat is not None:
        return 1
    return options.recompute_layers


def groups(stack: Stack, options: Options, length: int) -> int:
    """How many consecutive groups a recomputing VJP of ``length`` layers runs in
    (:func:`layers_at_once` layers each, or :data:`GROUPS` groups)."""
    at_once = layers_at_once(stack, options)
    return group_size(length, GROUPS) if at_once is None else length // group_size(length, at_once)


def grouped_vjp(vjp_of_group: Callable, ct, inputs, *, size: int):
    """The cotangents of every layer's inputs from ``vjp_of_group(i, ct_of_group)``, the VJP of the
    ``i``-th group of ``size`` consecutive layers, the groups one after the other in a loop (only one
    group's recomputed values alive at a time).

    ``ct = (ct_out, ct_block)`` are stacked over the layers; ``inputs = (h, per_layer, shared)``
    give the cotangents' shapes (a cotangent has its input's shape; integer inputs get ``float0``).
    The loop reads each group where it lies (taken as the loop's per-step inputs, the stacks would
    be copied into it first) and writes each group's cotangent over the one it read: the cotangents
    of the layers' outputs become those of their inputs in the same buffer.
    """
    ct_out, ct_block = ct
    _, per_layer, shared = inputs
    take = lambda tree, i: tmap(lambda a: lax.dynamic_slice_in_dim(a, i * size, size), tree)
    float0 = lambda a: not (jnp.issubdtype(a.dtype, jnp.inexact))  # no cotangent to gather
    zeros = lambda a: np.zeros(a.shape, jax.dtypes.float0) if float0(a) else jnp.zeros(a.shape, a.dtype)
    put = lambda i: lambda a, g: a if a.dtype == jax.dtypes.float0 else lax.dynamic_update_slice_in_dim(a, g, i * size, 0)
    add = lambda a, g: a if a.dtype == jax.dtypes.float0 else a + g

    def one(i, state):
        buf, ct_layer, ct_shared = state
        g_h, g_layer, g_shared = vjp_of_group(i, (take(buf, i), take(ct_block, i)))
        return tmap(put(i), buf, g_h), tmap(put(i), ct_layer, g_layer), tmap(add, ct_shared, g_shared)

    length = jax.tree.leaves(ct_out)[0].shape[0]
    return lax.fori_loop(0, length // size, one, (ct_out, tmap(zeros, per_layer), tmap(zeros, shared)))


def _in_groups(path, h_prev, xe, consts, *, groups: int):
    """A function computing ``z`` of every layer (one more forward of the layers, in groups: called
    only where ``K`` needs it) and a VJP of ``path`` that recomputes each layer's linearization when
    called, in ``groups`` consecutive groups of layers (:func:`grouped_vjp`).

    The price is one more forward of every layer per sweep and a sequential depth of ``groups`` per
    sweep. (Recomputing all layers at once would save nothing: XLA would hoist the recomputation out
    of the loop over sweeps.)
    """
    length = h_prev[0].shape[0]
    all_paths = jax.vmap(path, in_axes=(0, 0, None))  # of one layer too: its own path measured slower, and more memory
    size = length // groups
    group = lambda tree, i: tmap(lambda a: lax.dynamic_slice_in_dim(a, i * size, size), tree)
    jax.eval_shape(all_paths, *group((h_prev, xe), 0), consts)  # a block JAX cannot vmap fails here, not in a sweep
    ungrouped = lambda tree: tmap(lambda a: a.reshape((length,) + a.shape[2:]), tree)
    z_of = lambda: ungrouped(lax.map(lambda i: all_paths(*group((h_prev, xe), i), consts)[1], jnp.arange(groups)))
    vjp_of_group = lambda i, ct: jax.vjp(all_paths, *group((h_prev, xe), i), consts, has_aux=True)[1](ct)
    return z_of, lambda ct: grouped_vjp(vjp_of_group, ct, (h_prev, xe, consts), size=size)


def _unrolled(path, h_prev, xe, consts, *, vjp=jax.vjp):
    """``z`` of every layer and a VJP of ``path`` from one ``vjp`` per layer instead of one of
    ``vmap(path)``: L independent linearizations.

    Nothing chains them, so the backward stays parallel; XLA sees L separate ops instead of one
    batched op, and compile time grows with L.
    """
    length = h_prev[0].shape[0]
    at = lambda tree, j: tmap(lambda a: a[j], tree)
    zs, vjps = [], []
    for j in range(length):
        _, vjp_j, z_j = vjp(path, at(h_prev, j), at(xe, j), consts, has_aux=True)
        zs.append(z_j)
        vjps.append(vjp_j)

    def vjp_all(ct_out):
        grads = [vjp_j(at(ct_out, j)) for j, vjp_j in enumerate(vjps)]
        ct_xe = stacked([g[1] for g in grads]) if jax.tree.leaves(xe) else xe
        return stacked([g[0] for g in grads]), ct_xe, summed([g[2] for g in grads])

    return stacked(zs), vjp_all


def stacked(trees: list) -> PyTree:
    """The layers' trees stacked leaf by leaf on a new leading axis (``float0`` stays ``float0``)."""

    def one(*a):
        if getattr(a[0], "dtype", None) == jax.dtypes.float0:  # integer inputs: no cotangent
            return np.zeros((len(a),) + a[0].shape, jax.dtypes.float0)
        return jnp.stack(a)

    return tmap(one, *trees)


def summed(trees: list) -> PyTree:
    """The layers' trees summed leaf by leaf (the shared inputs' cotangent; ``float0`` stays)."""
    total = lambda *a: a[0] if getattr(a[0], "dtype", None) == jax.dtypes.float0 else sum(a[1:], a[0])
    return tmap(total, *trees)
