"""Flax Linen adapters: a residual stack over a block class, an RNN over a cell, and split cells.

With a Linen model the training step keeps ``jax.value_and_grad``'s shape; swap it for
:func:`hbpjax.highway_value_and_grad`::

    (loss, updates), grads = hbpjax.highway_value_and_grad(loss_fn, has_aux=True, iterations=4)(state.params)

Linen submodules cannot be called inside a raw JAX loop, so both modules here hold their layers'
variables themselves and apply the block (or cell) functionally, ``block.apply(variables_l, h)``,
inside :func:`hbpjax.residual_scan`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

try:
    from flax import linen as nn
except ImportError as err:
    raise ImportError(
        f"hbpjax.linen needs Flax ({err}); install it with `pip install 'hbpjax[flax]'`."
    ) from err

from ._front import cells as _cells
from .residual import additive

__all__ = ["GRUCell", "LSTMCell", "ResidualRNN", "ResidualStack"]

_LAYERS = "layers"


class ResidualStack(nn.Module):
    """``num_layers`` copies of a block module run as one residual stack (a lifted scan).

    Every variable collection the block creates (``params``, ``batch_stats``, ...) is stored once,
    stacked on a leading layer axis, under the name ``"layers"``. The ``params`` RNG is split per
    layer at initialisation, and each RNG stream in ``rng_names`` (``dropout`` by default) is split
    per layer at every call. Collections other than ``params`` that the caller marks mutable
    (``apply(..., mutable=["batch_stats"])``) are updated per layer and written back.

    Attributes:
      block: the block's class, or any factory ``block()`` returning a Linen module whose
        ``__call__(h, *args, **kwargs)`` returns ``z`` (e.g. ``functools.partial(Block, width=64)``).
      num_layers: number of layers ``L >= 1``.
      residual: residual combine ``r(h, z)`` (default :func:`hbpjax.residual.additive`).
      gamma: backward-only split (see :func:`hbpjax.residual_scan`).
      unroll: forward scan unrolling.
      rng_names: RNG streams split per layer and per call.
      layer_axis: mesh axis to split the layers over (layer parallelism, see
        :func:`hbpjax.residual_scan`); ``mesh`` defaults to the one set with ``jax.set_mesh``.
      linearize: ``"vmap"`` or ``"unroll"`` (see :func:`hbpjax.residual_scan`).
      microbatches: with ``layer_axis``, pipeline the forward over this many microbatches of the
        carry's leading axis (see :func:`hbpjax.residual_scan`).

    Raises:
      TypeError: (when called) ``num_layers`` is not an int, or ``block()`` does not build a Linen
        Module.
      ValueError: (when called) ``num_layers < 1``, or a bad ``gamma`` or ``layer_axis`` (as
        :func:`hbpjax.residual_scan` reports them).

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> import flax.linen as nn
      >>> class Block(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, h):
      ...         return nn.Dense(8)(jnp.tanh(nn.LayerNorm()(h)))
      >>> stack = hbpjax.linen.ResidualStack(Block, num_layers=6)
      >>> variables = stack.init(jax.random.key(0), jnp.ones((2, 8)))
      >>> variables["params"]["layers"]["Dense_0"]["kernel"].shape
      (6, 8, 8)
    """

    block: Callable[..., nn.Module]
    num_layers: int
    residual: Callable = additive
    gamma: float = 0.0
    unroll: int | bool = 1
    rng_names: Sequence[str] = ("dropout",)
    layer_axis: str | None = None
    mesh: Any = None
    linearize: str = "vmap"
    microbatches: int | None = None

    @nn.compact
    def __call__(self, h, *args, **kwargs):
        name = "hbpjax.linen.ResidualStack"
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int):
            raise TypeError(f"{name}: `num_layers` must be an int >= 1; got {self.num_layers!r}.")
        if self.num_layers < 1:
            raise ValueError(f"{name}: `num_layers` must be >= 1; got {self.num_layers}.")
        template = self.block(parent=None)
        if not isinstance(template, nn.Module):
            raise TypeError(f"{name}: `block()` must build a flax.linen Module; got {type(template).__name__}.")
        rng_names = tuple(n for n in self.rng_names if self.has_rng(n))

        if self.is_initializing():
            keys = jax.random.split(self.make_rng("params"), self.num_layers)

            def init_one(key):
                rngs = {"params": key, **dict.fromkeys(rng_names, key)}
                return template.init(rngs, h, *args, **kwargs)

            stacked = jax.vmap(init_one)(keys)
            for collection, value in stacked.items():
                if collection == "params":
                    self.param(_LAYERS, lambda _, v=value: v)
                else:
                    self.variable(collection, _LAYERS, lambda v=value: v)

        collections = [c for c in self.variables if self.has_variable(c, _LAYERS)]
        variables = {c: self.get_variable(c, _LAYERS) for c in collections}
        state = [c for c in collections if c != "params"]
        # As for a lifted scan: state updates need the collection to be mutable; during init the
        # block runs once to create its variables, and its updates are not kept.
        mutable = state if self.is_initializing() else [c for c in state if self.is_mutable_collection(c)]
        layer_rngs = {n: jax.random.split(self.make_rng(n), self.num_layers) for n in rng_names}

        def block(h, layer):
            layer_vars, rngs = layer
            if mutable:
                return template.apply(layer_vars, h, *args, rngs=rngs, mutable=mutable, **kwargs)
            return template.apply(layer_vars, h, *args, rngs=rngs, **kwargs), {}

        h, _, updates = _cells.stack(
            name, block, h, (variables, layer_rngs), residual=self.residual, gamma=self.gamma,
            unroll=self.unroll, has_aux=True, layer_axis=self.layer_axis, mesh=self.mesh, linearize=self.linearize,
            microbatches=self.microbatches,
        )
        if not self.is_initializing():
            for collection in mutable:
                self.put_variable(collection, _LAYERS, updates[collection])
        return h


class GRUCell(_cells.SplitCell, nn.GRUCell):
    """``flax.linen.GRUCell`` with its update written as a residual split (same parameters).

    ``block(h, x) = (z, (1 - z) * n)`` with :func:`hbpjax.residual.gated`: ``h' = z * h + (1-z) n``.
    Use it with :class:`ResidualRNN`; as a plain cell it computes what ``nn.GRUCell`` computes.

    Attributes:
      features: the carry's feature size; the other attributes (``gate_fn``, ``activation_fn``,
        initialisers, ``dtype``, ``param_dtype``) are ``nn.GRUCell``'s.

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> cell = hbpjax.linen.GRUCell(features=4)
      >>> variables = cell.init(jax.random.key(0), jnp.zeros((2, 4)), jnp.ones((2, 3)))
      >>> new_h, y = cell.apply(variables, jnp.zeros((2, 4)), jnp.ones((2, 3)))
      >>> new_h.shape
      (2, 4)
    """

    @nn.compact
    def block(self, carry, inputs):
        h = carry
        dense_h = functools.partial(
            nn.Dense, features=h.shape[-1], use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.recurrent_kernel_init, bias_init=self.bias_init,
        )
        dense_i = functools.partial(
            nn.Dense, features=h.shape[-1], use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=self.kernel_init, bias_init=self.bias_init,
        )
        x_proj = (dense_i(name="ir")(inputs), dense_i(name="iz")(inputs), dense_i(name="in")(inputs))
        h_proj = (dense_h(name="hr")(h), dense_h(name="hz")(h), dense_h(name="hn", use_bias=True)(h))
        return _cells.gru_split(x_proj, h_proj, self.gate_fn, self.activation_fn)



class LSTMCell(_cells.SplitCell, nn.LSTMCell):
    """``flax.linen.LSTMCell`` with its update written as a residual split (same parameters).

    On the carry ``(c, h)``: :func:`hbpjax.residual.gated` with ``a = (f, 0)``, ``b = (i g, h')``.

    Attributes:
      features: the feature size of ``c`` and ``h``; the other attributes are ``nn.LSTMCell``'s.

    Examples:
      >>> import jax, jax.numpy as jnp, hbpjax
      >>> cell = hbpjax.linen.LSTMCell(features=4)
      >>> carry = (jnp.zeros((2, 4)), jnp.zeros((2, 4)))
      >>> variables = cell.init(jax.random.key(0), carry, jnp.ones((2, 3)))
      >>> (c, h), y = cell.apply(variables, carry, jnp.ones((2, 3)))
      >>> y.shape
      (2, 4)
    """

    @nn.compact
    def block(self, carry, inputs):
        h = carry[1]
        dense_h = functools.partial(
            nn.Dense, features=h.shape[-1], use_bias=True, kernel_init=self.recurrent_kernel_init,
            bias_init=self.bias_init, dtype=self.dtype, param_dtype=self.param_dtype,
        )
        dense_i = functools.partial(
            nn.Dense, features=h.shape[-1], use_bias=False, kernel_init=self.kernel_init,
            dtype=self.dtype, param_dtype=self.param_dtype,
        )
        gates = tuple(dense_i(name=f"i{g}")(inputs) + dense_h(name=f"h{g}")(h) for g in "ifgo")
        return _cells.lstm_split(carry, gates, self.gate_fn, self.activation_fn)

    def output(self, carry):
        return carry[1]



class ResidualRNN(nn.Module):
    """One shared cell over the time axis, like ``flax.linen.RNN``, as a :func:`hbpjax.residual_scan`.

    The cell's parameters live under ``params/cell`` and are shared by every step. The cell must
    provide ``block(carry, x) -> z``, a ``residual`` and ``initialize_carry(rng, input_shape)``
    (:class:`GRUCell`, :class:`LSTMCell`).

    Attributes:
      cell: the cell's class or a factory (e.g. ``functools.partial(hbpjax.linen.GRUCell, features=32)``).
      time_major: inputs are ``(time, *batch, features)`` instead of ``(*batch, time, features)``.
      return_carry: return ``(carry, outputs)``.
      unroll: forward scan unrolling.
      gamma: backward-only split (see :func:`hbpjax.residual_scan`).

    Raises:
      TypeError: (when called) the cell does not spell out its residual split (no ``block`` method
        or ``residual``); use ``nn.RNN`` for other cells (its scan is converted automatically).

    Examples:
      >>> import functools, jax, jax.numpy as jnp, hbpjax
      >>> rnn = hbpjax.linen.ResidualRNN(functools.partial(hbpjax.linen.GRUCell, features=5))
      >>> variables = rnn.init(jax.random.key(0), jnp.ones((2, 7, 3)))
      >>> rnn.apply(variables, jnp.ones((2, 7, 3))).shape
      (2, 7, 5)
    """

    cell: Callable[..., nn.Module]
    time_major: bool = False
    return_carry: bool = False
    unroll: int | bool = 1
    gamma: float = 0.0

    @nn.compact
    def __call__(self, inputs, initial_carry=None):
        name = "hbpjax.linen.ResidualRNN"
        template = self.cell(parent=None)
        _cells.check_split_cell(name, template, "Use hbpjax.linen.GRUCell or LSTMCell, or add them.")
        xs, time_axis = _cells.to_time_major(inputs, self.time_major)
        if initial_carry is None:
            initial_carry = template.initialize_carry(jax.random.key(0), xs.shape[1:])
        params = self.param("cell", lambda rng: template.init(rng, initial_carry, xs[0], method="block")["params"])

        def block(carry, x):
            return template.apply({"params": params}, carry, x, method="block")

        carry, carries = _cells.stack(
            name, block, initial_carry, xs, residual=template.residual, gamma=self.gamma, unroll=self.unroll
        )
        outputs = _cells.from_time_major(template.output(carries), time_axis)
        return (carry, outputs) if self.return_carry else outputs
