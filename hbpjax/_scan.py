"""``residual_scan``: a ``lax.scan`` over a residual stack whose backward can run as Highway-BP.

Forward: ``z_i = block(h_{i-1}, x_i)``, ``h_i = residual(h_{i-1}, z_i)`` for ``i = 1..L``.

Under plain ``jax.grad`` (no :func:`hbpjax.highway_grad` active, or ``iterations=None``) this *is*
``lax.scan``: forward mode, higher order and everything else JAX does with a scan apply unchanged.

Under ``highway_grad(..., iterations=k)`` it is a ``jax.custom_vjp`` whose backward is Highway-BP
(:mod:`hbpjax._backward`): every layer linearized once in parallel, then ``k`` sweeps of "all layers'
VJPs at once, then one prefix scan". Nothing in this backward loops over the layers; its sequential
depth is about ``(k+1)(1+log2 L)``.

With ``layer_axis`` the layers are split in contiguous chunks over a mesh axis
(:mod:`hbpjax._layers`).
"""

from __future__ import annotations

import functools
import numbers
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from . import _context, _layers
from ._backward import highway_backward
from ._util import describe
from .residual import additive

PyTree = Any

_NAME = "hbpjax.residual_scan"


def residual_scan(
    block: Callable[[PyTree, PyTree], PyTree],
    init: PyTree,
    xs: PyTree = None,
    *,
    residual: Callable[[PyTree, PyTree], PyTree] = additive,
    gamma: float = 0.0,
    length: int | None = None,
    unroll: int | bool = 1,
    has_aux: bool = False,
    layer_axis: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    linearize: str = "vmap",
) -> tuple[PyTree, PyTree] | tuple[PyTree, PyTree, PyTree]:
    """Runs a residual stack ``h_i = residual(h_{i-1}, block(h_{i-1}, x_i))`` over ``L`` steps.

    This is ``lax.scan`` for residual networks and RNNs. Under ``jax.grad`` it is exactly
    ``lax.scan``; under :func:`hbpjax.highway_grad` its backward becomes Highway-BP: a few parallel
    sweeps instead of ``L`` dependent steps.

    Args:
      block: ``block(carry, x) -> z``, any JAX function. It may close over arrays (RNN weights,
        shared parameters): those are shared by all steps and receive their gradient too.
      init: the initial carry ``h_0``, a pytree of floating-point arrays.
      xs: what changes per step, stacked on a leading axis of length ``L``: per-layer parameters,
        per-step inputs, per-layer random keys, or a pytree of them. ``None`` when nothing does
        (then pass ``length``).
      residual: ``r(h, z) -> h_new``, elementwise in ``h`` (its carry Jacobian must be diagonal).
        One of :func:`hbpjax.residual.additive` (default), :func:`~hbpjax.residual.gated`,
        :func:`~hbpjax.residual.relu`, or your own function.
      gamma: backward-only split of the residual Jacobian, ``K' = (1 - gamma) K`` and
        ``J' = J + gamma K``. The forward is unchanged and ``iterations >= L`` stays exact.
        ``0`` is plain Highway-BP; about ``0.2`` helps pre-LN Transformers, ``0.8`` post-LN ones;
        ``1`` is fixed-point (Jacobi) iteration.
      length: number of steps ``L``; required when ``xs`` is ``None``, otherwise checked against it.
      unroll: forwarded to ``lax.scan`` (how many forward steps to unroll per loop iteration).
      has_aux: if True, ``block`` returns ``(z, aux)`` and the per-step ``aux`` values are returned
        stacked. ``aux`` is state, not a differentiable output: it is wrapped in
        ``lax.stop_gradient`` (use it for updated BatchNorm statistics, RNG counters, metrics).
      layer_axis: name of a mesh axis to split the ``L`` layers over, in contiguous chunks (layer
        parallelism). Each device keeps its chunk's ``xs`` and saved carries; the forward passes the
        carry from device to device; the highway backward sweeps locally with O(1) collective rounds
        per sweep. ``L`` must be a multiple of the axis size. ``carries`` come back sharded over the
        axis. Other mesh axes (a data axis) stay automatic. With ``Explicit`` mesh axes, arrays the
        block closes over must not carry an explicit sharding (JAX does not let a manual region
        trace with them): use ``Auto`` axes, or pass per-layer values through ``xs``.
      mesh: the mesh for ``layer_axis``; defaults to the one set with ``jax.set_mesh``.
      linearize: how the highway backward linearizes the layers, all at once: ``"vmap"`` (one
        ``jax.vjp`` of ``vmap(block)``; the default) or ``"unroll"`` (one ``jax.vjp`` per layer,
        still independent of each other). ``"unroll"`` suits short stacks of ops that XLA batches
        poorly (convolutions with per-layer kernels on a CPU); compile time grows with ``L``.

    Returns:
      ``(final_carry, carries)``: ``h_L`` and ``h_1..h_L`` stacked on a leading axis of length ``L``;
      ``(final_carry, carries, aux)`` with ``has_aux=True``.

    Example:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> W = 0.1 * jnp.ones((8, 3, 3))               # 8 layers of 3x3 weights
      >>> def loss(W, h0):
      ...     block = lambda h, w: jnp.tanh(h @ w)
      ...     h, _ = hbpjax.residual_scan(block, h0, W)
      ...     return jnp.sum(h ** 2)
      >>> exact = jax.grad(loss)(W, jnp.ones(3))
      >>> approx = hbpjax.highway_grad(loss, iterations=8)(W, jnp.ones(3))
      >>> bool(jnp.allclose(exact, approx, rtol=1e-5))
      True
    """
    if not callable(block):
        raise TypeError(f"{_NAME}: `block` must be callable as block(carry, x) -> z; got {block!r}.")
    if not callable(residual):
        raise TypeError(
            f"{_NAME}: `residual` must be callable as residual(h, z) -> h_new (for instance "
            f"hbpjax.residual.additive); got {residual!r}."
        )
    gamma = _check_gamma(gamma)
    length = _scan_length(xs, length)
    if linearize not in ("vmap", "unroll"):
        raise ValueError(f"{_NAME}: `linearize` must be 'vmap' or 'unroll'; got {linearize!r}.")

    split = functools.partial(_split_aux, has_aux)

    def step(h, x):
        z, aux = split(block(h, x))
        h_new = _apply_residual(residual, h, z)
        return h_new, (h_new, aux)

    settings = _context.current()
    if layer_axis is not None:
        mesh, size = _layers.resolve(layer_axis, mesh, length)
        if settings is not None and settings.iterations is not None:
            _check_float_carry(init)
        final, carries, aux = _layers.layer_parallel_scan(
            block, split, residual, gamma, settings, length, unroll, init, xs, layer_axis, mesh, size, _apply_residual,
            linearize,
        )
    elif settings is None or settings.iterations is None or length == 0:
        final, (carries, aux) = lax.scan(step, init, xs, length=length, unroll=unroll)
    else:
        _check_float_carry(init)
        final, carries, aux = _highway_scan(block, split, residual, gamma, settings, length, unroll, init, xs, linearize)
    if has_aux:
        return final, carries, lax.stop_gradient(aux)
    return final, carries


def _split_aux(has_aux, out):
    """``(z, aux)`` from a block's output (``aux`` is ``None`` without ``has_aux``)."""
    if not has_aux:
        return out, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(
            f"{_NAME}: with has_aux=True `block` must return a pair (z, aux); got {describe(out)}."
        )
    return out[0], out[1]


def _highway_scan(block, split, residual, gamma, settings, length, unroll, init, xs, linearize):
    """The ``custom_vjp`` form of the scan, with the Highway-BP backward."""
    x0 = jax.tree.map(lambda a: a[0], xs)
    # Values `block` closes over may be tracers of an outer jax.grad / jit: hoist them into
    # explicit inputs so the custom_vjp returns their cotangents instead of dropping them.
    converted, consts = jax.closure_convert(block, init, x0)
    consts = tuple(consts)

    def forward(init, xs, consts):
        def step(h, x):
            z, aux = split(converted(h, x, *consts))
            h_new = _apply_residual(residual, h, z)
            return h_new, (h_new, aux)

        final, (carries, aux) = lax.scan(step, init, xs, length=length, unroll=unroll)
        return final, carries, aux

    run = jax.custom_vjp(forward)

    def fwd(init, xs, consts):
        final, carries, aux = forward(init, xs, consts)
        return (final, carries, aux), (init, carries, xs, consts)

    def bwd(res, cts):
        init, carries, xs, consts = res
        ct_final, ct_carries, _ = cts  # aux is stop_gradient-ed by the caller: no cotangent
        block_z = lambda h, x, *c: split(converted(h, x, *c))[0]
        return highway_backward(
            block_z, residual, gamma, settings, init, carries, xs, consts, ct_final, ct_carries, linearize=linearize
        )

    run.defvjp(fwd, bwd)
    return run(init, xs, consts)


# --------------------------------------------------------------------------- validation


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(
            f"{_NAME}: `gamma` must be a Python float in [0, 1] (a static setting of the "
            f"backward); got {gamma!r} of type {type(gamma).__name__}."
        )
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(
            f"{_NAME}: `gamma` must be in [0, 1] (0: Highway-BP, 0.2: pre-LN Transformers, "
            f"0.8: post-LN, 1: fixed-point iteration); got {gamma}."
        )
    return gamma


def _scan_length(xs, length) -> int:
    """The number of steps, checked against every leaf of ``xs``."""
    if length is not None:
        try:
            if isinstance(length, bool):
                raise TypeError
            length = operator.index(length)
        except TypeError:
            raise TypeError(
                f"{_NAME}: `length` must be an int or None; got {length!r} of type "
                f"{type(length).__name__}."
            ) from None
        if length < 0:
            raise ValueError(f"{_NAME}: `length` must be >= 0; got {length}.")
    leaves, _ = jax.tree_util.tree_flatten_with_path(xs)
    if not leaves:
        if length is None:
            raise ValueError(
                f"{_NAME}: got xs={xs!r} with no arrays, so the number of steps is unknown; "
                "pass `length=L`."
            )
        return length
    sizes = []
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape:
            raise ValueError(
                f"{_NAME}: every leaf of `xs` needs a leading step axis; xs{jax.tree_util.keystr(path)} "
                f"is a scalar. Stack per-step values on axis 0, or close over shared ones in `block`."
            )
        sizes.append((jax.tree_util.keystr(path), shape[0]))
    lengths = {n for _, n in sizes}
    if len(lengths) > 1:
        listing = ", ".join(f"xs{p or ''}: {n}" for p, n in sizes)
        raise ValueError(
            f"{_NAME}: all leaves of `xs` must share the leading (step) axis length; got {listing}."
        )
    (found,) = lengths
    if length is not None and length != found:
        raise ValueError(
            f"{_NAME}: `length={length}` disagrees with the leading axis of `xs` ({found})."
        )
    return found


def _apply_residual(residual, h, z):
    """``residual(h, z)`` with the checks that make a misfit block a clear error at trace time."""
    check = getattr(residual, "check", None)
    if check is not None:
        try:
            check(h, z)
        except ValueError as err:
            raise ValueError(f"{_NAME}: {err}") from None
    h_new = residual(h, z)
    name = getattr(residual, "__name__", repr(residual))
    h_tree, new_tree = jax.tree.structure(h), jax.tree.structure(h_new)
    if h_tree != new_tree:
        raise ValueError(
            f"{_NAME}: residual {name}(h, z) must return a carry with the structure of `init` "
            f"({h_tree}); got {new_tree}. Check what `block` returns."
        )
    for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(h_new)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"{_NAME}: residual {name}(h, z) changed a carry shape from {jnp.shape(a)} to "
                f"{jnp.shape(b)}; the block output z must fit the carry."
            )
        if jnp.result_type(a) != jnp.result_type(b):
            raise TypeError(
                f"{_NAME}: residual {name}(h, z) changed a carry dtype from "
                f"{jnp.result_type(a)} to {jnp.result_type(b)}; make `block` return the carry's "
                "dtype (or cast `init`)."
            )
    return h_new


def _check_float_carry(init) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{_NAME}: under hbpjax.highway_grad every carry leaf must be floating point; "
                f"init{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}. Pass "
                "non-differentiable per-step values through `xs` instead."
            )
