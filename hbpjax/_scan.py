"""``residual_scan``: a ``lax.scan`` over a residual stack whose backward can run as Highway-BP.

Forward: ``z_i = block(h_{i-1}, x_i)``, ``h_i = residual(h_{i-1}, z_i)`` for ``i = 1..L``.

Under plain ``jax.grad`` (no :func:`hbpjax.highway_grad` active, or ``iterations=None``) this *is*
``lax.scan``: forward mode, higher order and everything else JAX does with a scan apply unchanged.

Under ``highway_grad(..., iterations=k)`` it is the custom VJP of :mod:`hbpjax._backward` on a
:class:`ResidualScan` (the stack's description): every layer linearized once in parallel, then
``k`` sweeps of "all layers' VJPs at once, then one prefix scan". Nothing in this backward loops over
the layers; its sequential depth is about ``(k+1)(1+log2 L)``.

With ``layer_axis`` the layers are split in contiguous chunks over a mesh axis
(:mod:`hbpjax._layers`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from . import _context, _layers
from ._backward import Local, differentiate
from ._common import RESIDUAL_SCAN, apply_residual, as_int, check_gamma, check_linearize, split_aux
from ._stack import CARRY, Stack, scan_forward
from .residual import additive

PyTree = Any

_NAME = RESIDUAL_SCAN


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
    gamma = check_gamma(_NAME, gamma)
    check_linearize(_NAME, linearize)
    length = _scan_length(xs, length)
    leaves, carry_tree = jax.tree.flatten(init)
    settings = _context.current()
    highway = settings is not None and settings.iterations is not None

    def stack_for(block_fn):
        return ResidualScan(
            length=length, diff=tuple(range(len(leaves))), carry_in_ys=tuple(range(len(leaves))),
            y_route=tuple((CARRY, p) for p in range(len(leaves))), gamma=gamma, linearize=linearize,
            unroll=unroll, name=_NAME, block_fn=block_fn, residual_fn=residual, has_aux=has_aux,
            carry_tree=carry_tree,
        )

    if layer_axis is not None:
        mesh, size = _layers.resolve(layer_axis, mesh, length)
        if highway:
            _check_float_carry(init)
        final, ys = _layers.layer_parallel_scan(
            block, init, xs, stack_for=stack_for, settings=settings if highway else None, axis=layer_axis,
            mesh=mesh, size=size,
        )
    elif not highway or length == 0:
        stack = stack_for(lambda h, x: block(h, x))
        final, ys, _ = scan_forward(stack, leaves, xs, ())
    else:
        _check_float_carry(init)
        x0 = jax.tree.map(lambda a: a[0], xs)
        # Values `block` closes over may be tracers of an outer jax.grad / jit: hoist them into
        # explicit inputs so the custom_vjp returns their cotangents instead of dropping them.
        converted, consts = jax.closure_convert(block, init, x0)
        stack = stack_for(converted)
        forward = functools.partial(scan_forward, stack)
        final, ys = differentiate(stack, leaves, xs, tuple(consts), settings=settings, forward=forward, chain=Local)
    carries, aux = ys
    final = jax.tree.unflatten(carry_tree, final)
    if has_aux:
        return final, carries, lax.stop_gradient(aux)
    return final, carries


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualScan(Stack):
    """The stack of a :func:`residual_scan` call: the user's ``block`` and ``residual`` on the carry.

    Every carry leaf is differentiated and returned stacked as a per-step output (so its cotangent
    joins the carry's); the per-step ``aux`` gets no cotangent.

    Attributes:
      block_fn: ``block_fn(carry, x, *consts) -> z`` (or ``(z, aux)`` with ``has_aux``).
      residual_fn: ``residual_fn(h, z) -> h_new`` on carry pytrees.
      has_aux: whether ``block_fn`` returns ``(z, aux)``.
      carry_tree: the carry's tree structure.
    """

    block_fn: Callable
    residual_fn: Callable
    has_aux: bool
    carry_tree: Any

    def z(self, carry: PyTree, x: PyTree, consts: tuple) -> tuple[PyTree, PyTree]:
        """The block's ``(z, aux)`` (``aux`` is ``None`` without ``has_aux``)."""
        return split_aux(self.has_aux, self.block_fn(carry, x, *consts))

    def step(self, carry, x, consts):
        h = jax.tree.unflatten(self.carry_tree, carry)
        z, aux = self.z(h, x, consts)
        h_new = apply_residual(self.residual_fn, h, z)
        return jax.tree.leaves(h_new), (h_new, aux)

    def block(self, h, xe, consts):
        x, _ = xe
        return self.z(jax.tree.unflatten(self.carry_tree, h), x, consts)[0], []

    def residual(self, h, z):
        return jax.tree.leaves(self.residual_fn(jax.tree.unflatten(self.carry_tree, h), z))


# --------------------------------------------------------------------------- validation


def _scan_length(xs, length) -> int:
    """The number of steps, checked against every leaf of ``xs``."""
    if length is not None:
        try:
            length = as_int(length)
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


def _check_float_carry(init) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{_NAME}: under hbpjax.highway_grad every carry leaf must be floating point; "
                f"init{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}. Pass "
                "non-differentiable per-step values through `xs` instead."
            )
