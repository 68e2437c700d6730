"""Flax NNX adapters: gradient transforms, and modules with explicit residual splits.

Swap the gradient call of an ordinary NNX training step and keep everything else, the model
included::

    grad_fn = nnx.value_and_grad(loss_fn)                              # before
    grad_fn = hbpjax.nnx.value_and_grad(loss_fn, iterations=4)         # after

Highway-BP applies to every residual stack of the model: the scans Flax makes (``nnx.scan`` over
layers, ``nnx.RNN`` over a cell) whose step has a residual path, found automatically, and the
:class:`ResidualStack` and :class:`ResidualRNN` modules here, for explicit splits (a custom residual,
``gamma`` per stack, layer parallelism). Everything else is differentiated as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Unpack

import jax
import jax.numpy as jnp

try:
    from flax import nnx as _nnx
except ImportError as err:
    raise ImportError(
        f"hbpjax.nnx needs Flax ({err}); install it with `pip install 'hbpjax[flax]'`."
    ) from err

from ._front import cells as _cells
from ._front.nnx_adapter import Adapter
from ._front.options import OptionKeywords, Options, describe
from ._front.transform import ValueAndGrad, grad_from_value_and_grad
from .residual import additive

__all__ = [
    "GRUCell",
    "LSTMCell",
    "MinGRUCell",
    "ResidualRNN",
    "ResidualStack",
    "grad",
    "value_and_grad",
]


# ----------------------------------------------------------------------------- ResidualStack


class ResidualStack(_nnx.Module):
    """``num_layers`` independent copies of a block, run as one residual stack.

    The blocks are created with ``nnx.split_rngs`` + ``nnx.vmap`` (parameters stacked on a leading
    layer axis, each layer with its own random initialisation and its own RNG streams) and applied
    with :func:`hbpjax.residual_scan`: ``h <- residual(h, block_l(h))`` for ``l = 1..num_layers``.
    Under ``jax.grad`` / ``nnx.grad`` that is a plain scan; under :func:`hbpjax.nnx.grad` the backward
    is Highway-BP.

    Blocks may hold ``nnx.Param`` (stacked per layer, differentiated through the stack),
    ``nnx.BatchNorm`` (statistics updated per layer in training mode, frozen in eval mode) and
    ``nnx.Dropout`` (per-layer keys). Every Variable that is not an ``nnx.Param`` is treated as state:
    each layer reads its own and the updated values are written back after the stack, without
    gradient, exactly as under ``nnx.scan``.

    Args:
      make_block: ``make_block(rngs) -> nnx.Module``; the block maps the carry ``h`` (plus any extra
        call arguments) to ``z``.
      num_layers: number of layers ``L >= 1``.
      rngs: ``nnx.Rngs`` for the blocks' initialisation (split per layer).
      residual: the residual combine ``r(h, z)`` (default :func:`hbpjax.residual.additive`).
      gamma: backward-only split (see :func:`hbpjax.residual_scan`).
      unroll: forward scan unrolling.
      layer_axis: mesh axis to split the layers over (layer parallelism, see
        :func:`hbpjax.residual_scan`); shard the stacked state along axis 0 over it.
      mesh: the mesh for ``layer_axis`` (default: the one set with ``jax.set_mesh``).
      linearize: ``"vmap"`` or ``"unroll"`` (see :func:`hbpjax.residual_scan`).
      microbatches: with ``layer_axis``, pipeline the forward over this many microbatches of the
        carry's leading axis (see :func:`hbpjax.residual_scan`).

    Raises:
      TypeError: ``make_block`` is not callable, ``num_layers`` is not an int or ``rngs`` is not an
        ``nnx.Rngs``.
      ValueError: ``num_layers < 1``; when called, a bad ``gamma`` or ``layer_axis`` (as
        :func:`hbpjax.residual_scan` reports them).

    Examples:
      >>> import jax.numpy as jnp, hbpjax
      >>> from flax import nnx
      >>> class Block(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.norm = nnx.LayerNorm(8, rngs=rngs)
      ...         self.linear = nnx.Linear(8, 8, rngs=rngs)
      ...     def __call__(self, h):
      ...         return self.linear(jnp.tanh(self.norm(h)))
      >>> stack = hbpjax.nnx.ResidualStack(Block, 6, rngs=nnx.Rngs(0))
      >>> stack(jnp.ones((2, 8))).shape
      (2, 8)
      >>> stack.layers.linear.kernel.shape      # parameters stacked per layer
      (6, 8, 8)
    """

    def __init__(
        self,
        make_block: Callable[[_nnx.Rngs], _nnx.Module],
        num_layers: int,
        *,
        rngs: _nnx.Rngs,
        residual: Callable = additive,
        gamma: float = 0.0,
        unroll: int | bool = 1,
        layer_axis: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
        linearize: str = "vmap",
        microbatches: int | None = None,
    ):
        name = "hbpjax.nnx.ResidualStack"
        if not callable(make_block):
            raise TypeError(f"{name}: `make_block` must be callable as make_block(rngs) -> Module; got {make_block!r}.")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int):
            raise TypeError(f"{name}: `num_layers` must be an int >= 1; got {num_layers!r}.")
        if num_layers < 1:
            raise ValueError(f"{name}: `num_layers` must be >= 1; got {num_layers}.")
        if not isinstance(rngs, _nnx.Rngs):
            raise TypeError(f"{name}: `rngs` must be an nnx.Rngs; got {describe(rngs)}.")

        @_nnx.split_rngs(splits=num_layers)
        @_nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return make_block(rngs)

        self.layers, self.num_layers = create(rngs), num_layers
        self.residual, self.gamma, self.unroll = residual, gamma, unroll
        self.layer_axis, self.mesh, self.linearize = layer_axis, mesh, linearize
        self.microbatches = microbatches

    def __call__(self, h, *args, **kwargs):
        """Runs the stack on carry ``h``; extra arguments are passed unchanged to every layer."""
        graphdef, params, state = _nnx.split(self.layers, _nnx.Param, ...)

        def block(h, layer):
            layer_params, layer_state = layer
            module = _nnx.merge(graphdef, layer_params, layer_state)
            z = module(h, *args, **kwargs)
            _, _, new_state = _nnx.split(module, _nnx.Param, ...)
            return z, new_state

        h, _, new_state = _cells.stack(
            "hbpjax.nnx.ResidualStack", block, h, (params, state), residual=self.residual, gamma=self.gamma,
            unroll=self.unroll, has_aux=True, layer_axis=self.layer_axis, mesh=self.mesh, linearize=self.linearize,
            microbatches=self.microbatches,
        )
        _nnx.update(self.layers, new_state)
        return h


# ------------------------------------------------------------------------------------- cells


class GRUCell(_cells.SplitCell, _nnx.GRUCell):
    """``nnx.GRUCell`` with its update written as a residual split (same parameters, same values).

    ``h' = z * h + (1 - z) * n`` is :func:`hbpjax.residual.gated` with ``block(h, x) = (z, (1-z) n)``,
    so :class:`ResidualRNN` can run it with Highway-BP. Constructor and parameters are those of
    ``nnx.GRUCell``.

    Built as ``GRUCell(in_features, hidden_features, rngs=rngs, **kwargs)`` with the other arguments
    of ``nnx.GRUCell`` (``gate_fn``, ``activation_fn``, initialisers, ``dtype``, ``param_dtype``).

    Attributes:
      in_features: the input's feature size.
      hidden_features: the carry's feature size.

    Examples:
      >>> import jax.numpy as jnp, hbpjax
      >>> from flax import nnx
      >>> cell = hbpjax.nnx.GRUCell(3, 5, rngs=nnx.Rngs(0))
      >>> h, y = cell(jnp.zeros((2, 5)), jnp.ones((2, 3)))
      >>> h.shape
      (2, 5)
    """

    def block(self, carry, inputs):
        """The block of the residual split: ``(a, b)`` with ``h' = a * h + b``."""
        inputs = jnp.split(self.dense_i(inputs), 3, axis=-1)
        hidden = jnp.split(self.dense_h(carry), 3, axis=-1)
        return _cells.gru_split(inputs, hidden, self.gate_fn, self.activation_fn)



class LSTMCell(_cells.SplitCell, _nnx.OptimizedLSTMCell):
    """``nnx.OptimizedLSTMCell`` with its update written as a residual split (same parameters).

    On the carry ``(c, h)``: ``c' = f * c + i * g`` and ``h' = o * tanh(c')`` is
    :func:`hbpjax.residual.gated` with ``a = (f, 0)``, ``b = (i * g, h')``: the cell state is the
    residual path (``K = (f, 0)``), everything else is the block.

    Built as ``LSTMCell(in_features, hidden_features, rngs=rngs, **kwargs)`` with the other arguments
    of ``nnx.OptimizedLSTMCell``.

    Attributes:
      in_features: the input's feature size.
      hidden_features: the carry's feature size (of ``c`` and of ``h``).

    Examples:
      >>> import jax.numpy as jnp, hbpjax
      >>> from flax import nnx
      >>> cell = hbpjax.nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
      >>> (c, h), y = cell((jnp.zeros((2, 4)), jnp.zeros((2, 4))), jnp.ones((2, 3)))
      >>> y.shape
      (2, 4)
    """

    def block(self, carry, inputs):
        gates = jnp.split(self.dense_i(inputs) + self.dense_h(carry[1]), 4, axis=-1)
        return _cells.lstm_split(carry, gates, self.gate_fn, self.activation_fn)

    def output(self, carry):
        return carry[1]



class MinGRUCell(_cells.SplitCell, _nnx.Module):
    """A minimal linear diagonal recurrence (minGRU): ``h' = (1 - z) * h + z * h~``.

    ``z = sigmoid(W_z x + b_z)`` and ``h~ = W_h x + b_h`` read only the input, so the block does not
    depend on the carry: ``J = 0`` and Highway-BP with ``iterations=0`` is *exact* — an exact,
    parallel backward for a linear RNN.

    Args:
      in_features: the input's feature size.
      hidden_features: the carry's feature size.
      rngs: ``nnx.Rngs`` for the initialisation.
      param_dtype: the parameters' dtype.

    Examples:
      >>> import jax.numpy as jnp, hbpjax
      >>> from flax import nnx
      >>> cell = hbpjax.nnx.MinGRUCell(3, 4, rngs=nnx.Rngs(0))
      >>> cell.initialize_carry((2, 3)).shape
      (2, 4)
    """

    def __init__(self, in_features: int, hidden_features: int, *, rngs: _nnx.Rngs, param_dtype: Any = jnp.float32):
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.param_dtype = param_dtype
        self.dense_z = _nnx.Linear(in_features, hidden_features, param_dtype=param_dtype, rngs=rngs)
        self.dense_h = _nnx.Linear(in_features, hidden_features, param_dtype=param_dtype, rngs=rngs)

    def block(self, carry, inputs):
        return _cells.min_gru_split(self.dense_z(inputs), self.dense_h(inputs))


    def initialize_carry(self, input_shape, rngs=None):
        return jnp.zeros(tuple(input_shape[:-1]) + (self.hidden_features,), self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


# ------------------------------------------------------------------------------- ResidualRNN


class ResidualRNN(_nnx.Module):
    """Runs one shared cell over the time axis, like ``nnx.RNN``, as a :func:`hbpjax.residual_scan`.

    The cell must spell out its residual split: a ``block(carry, x) -> z`` method and a
    ``residual`` (as :class:`GRUCell`, :class:`LSTMCell` and :class:`MinGRUCell` do), plus
    ``initialize_carry(input_shape, rngs)`` and optionally ``output(carry) -> y``. The cell's
    parameters are shared by all steps and get their summed gradient.

    Args:
      cell: the cell module.
      time_major: inputs are ``(time, *batch, features)`` instead of ``(*batch, time, features)``.
      return_carry: also return the final carry: ``(carry, outputs)``.
      reverse: run from the last step to the first.
      keep_order: with ``reverse``, return outputs in the original time order.
      unroll: forward scan unrolling.
      gamma: backward-only split (see :func:`hbpjax.residual_scan`).

    Raises:
      TypeError: ``cell`` does not spell out its residual split (no ``block`` method or
        ``residual``); use ``nnx.RNN`` for other cells (its scan is converted automatically).

    Examples:
      >>> import jax.numpy as jnp, hbpjax
      >>> from flax import nnx
      >>> rnn = hbpjax.nnx.ResidualRNN(hbpjax.nnx.GRUCell(3, 5, rngs=nnx.Rngs(0)))
      >>> rnn(jnp.ones((2, 7, 3))).shape                     # (batch, time, hidden)
      (2, 7, 5)
    """

    def __init__(
        self,
        cell: _nnx.Module,
        *,
        time_major: bool = False,
        return_carry: bool = False,
        reverse: bool = False,
        keep_order: bool = False,
        unroll: int | bool = 1,
        gamma: float = 0.0,
    ):
        _cells.check_split_cell(
            "hbpjax.nnx.ResidualRNN", cell, "Use hbpjax.nnx.GRUCell, LSTMCell or MinGRUCell, or add them."
        )
        self.cell, self.time_major, self.return_carry = cell, time_major, return_carry
        self.reverse, self.keep_order, self.unroll, self.gamma = reverse, keep_order, unroll, gamma

    def __call__(self, inputs, *, initial_carry=None, return_carry=None, time_major=None, reverse=None, keep_order=None):
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        xs, time_axis = _cells.to_time_major(inputs, time_major)
        if reverse:
            xs = jnp.flip(xs, 0)
        if initial_carry is None:
            # The built-in cells start from zeros; the key only matters for random carry inits.
            initial_carry = self.cell.initialize_carry(xs.shape[1:], _nnx.Rngs(carry=0))
        output = getattr(self.cell, "output", lambda carry: carry)
        carry, carries = _cells.stack(
            "hbpjax.nnx.ResidualRNN", self.cell.block, initial_carry, xs, residual=self.cell.residual,
            gamma=self.gamma, unroll=self.unroll,
        )
        outputs = output(carries)
        if reverse and keep_order:
            outputs = jnp.flip(outputs, 0)
        outputs = _cells.from_time_major(outputs, time_axis)
        return (carry, outputs) if return_carry else outputs


# ------------------------------------------------------------------------ gradient transforms


def value_and_grad(
    f: Callable | None = None, *, argnums: int | Any = 0, has_aux: bool = False, holomorphic: bool = False,
    allow_int: bool = False, graph: bool | None = None, graph_updates: bool | None = None,
    options: Options | None = None, **keywords: Unpack[OptionKeywords],
) -> Callable:
    """``nnx.value_and_grad`` with Highway-BP inside every residual stack of ``f``.

    Same arguments and results as ``nnx.value_and_grad``: ``nnx.Param`` of the Module arguments are
    differentiated by default (``nnx.DiffState`` selects others), gradients come back as an
    ``nnx.State`` that ``nnx.Optimizer.update`` accepts, and non-parameter state (BatchNorm
    statistics, RNG counters) is written back to the model. The model's residual stacks
    (``nnx.scan`` over layers, ``nnx.RNN``, Python loops of residual blocks) are found and converted
    without changing the model, as :func:`hbpjax.highway_value_and_grad` converts them. Usable as a
    decorator, inside ``nnx.jit``, in graph and tree mode.

    Args:
      f: the function, ``f(*args)`` returning a real scalar (or ``(scalar, aux)`` with ``has_aux``);
        omitted, a decorator is returned.
      argnums: which positional arguments to differentiate: an int, an ``nnx.DiffState`` (an
        argument and a filter of its Variables) or a sequence of them (as ``nnx.grad``).
      has_aux: whether ``f`` returns ``(value, aux)``.
      holomorphic: as in ``nnx.grad``.
      allow_int: as in ``nnx.grad``.
      graph: as in ``nnx.grad``: graph mode (``True``) or tree mode; ``None`` is Flax's default.
      graph_updates: as in ``nnx.grad``: write state changes of the modules back.
      options: an :class:`hbpjax.Options` (default: ``Options()``, 4 sweeps).
      **keywords: any field of :class:`hbpjax.Options`, replacing that of ``options``.

    Returns:
      A function with ``f``'s signature returning ``(value, grads)`` (``((value, aux), grads)`` with
      ``has_aux``), ``grads`` an ``nnx.State`` of the differentiated Variables (a tuple of them for
      several ``argnums``); with ``return_report``, ``(that, report)``.

    Raises:
      TypeError: ``f`` is not callable, an option is unknown or has the wrong type, or (at call
        time) a differentiated argument is not an ``nnx.Module`` or ``nnx.State``.
      ValueError: an option has a bad value.

    Examples:
      >>> import jax.numpy as jnp, hbpjax
      >>> from flax import nnx
      >>> model = nnx.RNN(nnx.GRUCell(2, 4, rngs=nnx.Rngs(0)))        # Flax's own modules
      >>> loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
      >>> loss, grads = hbpjax.nnx.value_and_grad(loss_fn, iterations=2)(model, jnp.ones((3, 10, 2)))
      >>> grads["cell"]["dense_h"]["kernel"].shape
      (4, 12)
    """
    options = Options.given("hbpjax.nnx.value_and_grad", options, keywords)
    adapter = Adapter(graph, graph_updates)
    make = lambda f: ValueAndGrad(f, argnums, has_aux, holomorphic, allow_int, options=options, adapter=adapter)
    return make if f is None else make(f)


def grad(
    f: Callable | None = None, *, argnums: int | Any = 0, has_aux: bool = False, holomorphic: bool = False,
    allow_int: bool = False, graph: bool | None = None, graph_updates: bool | None = None,
    options: Options | None = None, **keywords: Unpack[OptionKeywords],
) -> Callable:
    """``nnx.grad`` with Highway-BP inside every residual stack of ``f``.

    See :func:`value_and_grad`; returns only the gradients (and ``aux`` with ``has_aux``).

    Args:
      f: the function, as for :func:`value_and_grad` (omitted, a decorator is returned); so are
        ``argnums``, ``has_aux``, ``holomorphic``, ``allow_int``, ``graph``, ``graph_updates``,
        ``options`` and the :class:`hbpjax.Options` keywords.

    Returns:
      A function with ``f``'s signature returning ``grads`` (``(grads, aux)`` with ``has_aux``), an
      ``nnx.State`` that ``nnx.Optimizer.update`` accepts; with ``return_report``, ``(that, report)``.

    Raises:
      TypeError: ``f`` is not callable, an option is unknown or has the wrong type, or (at call
        time) a differentiated argument is not an ``nnx.Module`` or ``nnx.State``.
      ValueError: an option has a bad value.

    Examples:
      >>> import jax.numpy as jnp, hbpjax, optax
      >>> from flax import nnx
      >>> model = hbpjax.nnx.ResidualRNN(hbpjax.nnx.GRUCell(2, 4, rngs=nnx.Rngs(0)))
      >>> optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
      >>> grads = hbpjax.nnx.grad(lambda m, x: jnp.mean(m(x) ** 2), iterations=2)(model, jnp.ones((3, 10, 2)))
      >>> _ = optimizer.update(model, grads)   # a standard optax step
    """
    options = Options.given("hbpjax.nnx.grad", options, keywords)
    adapter = Adapter(graph, graph_updates)
    make = lambda f: grad_from_value_and_grad(
        f, ValueAndGrad(f, argnums, has_aux, holomorphic, allow_int, options=options, adapter=adapter)
    )
    return make if f is None else make(f)
