"""What the NNX and Linen adapters share: the cells' residual splits, the stack call, time axes.

Pure functions of arrays; neither Flax API is imported here. The cells of :mod:`hbpjax.nnx` and
:mod:`hbpjax.linen` compute their pre-activations with their own ``Linear``/``Dense`` layers and
hand them to the split functions below, so both APIs give the same ``(a, b)`` of
:func:`hbpjax.residual.gated` (``h' = a * h + b``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .. import residual as _residual
from ..residual import gated
from .scan import residual_scan

PyTree = Any

SPLIT_CELL_METHODS = ("block", "residual", "initialize_carry")


def gru_split(inputs: tuple, hidden: tuple, gate_fn: Callable, activation_fn: Callable):
    """GRU ``h' = z * h + (1 - z) * n`` as ``(a, b) = (z, (1 - z) * n)``.

    Args:
      inputs: the input projections ``(x_r, x_z, x_n)`` (with the input bias).
      hidden: the recurrent projections ``(h_r, h_z, h_n)`` (``h_n`` with its bias).
    """
    (x_r, x_z, x_n), (h_r, h_z, h_n) = inputs, hidden
    r = gate_fn(x_r + h_r)
    z = gate_fn(x_z + h_z)
    n = activation_fn(x_n + r * h_n)
    return z, (1.0 - z) * n


def lstm_split(carry: tuple, gates: tuple, gate_fn: Callable, activation_fn: Callable):
    """LSTM on the carry ``(c, h)`` as ``a = (f, 0)``, ``b = (i * g, o * act(f * c + i * g))``.

    The cell state is the residual path (``K = (f, 0)``); the new hidden state is part of the block.

    Args:
      carry: ``(c, h)``.
      gates: the pre-activations ``(i, f, g, o)``.
    """
    c, h = carry
    i, f, g, o = gates
    i, f, g, o = gate_fn(i), gate_fn(f), activation_fn(g), gate_fn(o)
    h_new = o * activation_fn(f * c + i * g)
    return (f, jnp.zeros_like(h)), (i * g, h_new)


def min_gru_split(gate: jax.Array, candidate: jax.Array):
    """minGRU ``h' = (1 - z) * h + z * h~`` with ``z = sigmoid(gate)``: ``(1 - z, z * h~)``."""
    z = jax.nn.sigmoid(gate)
    return 1.0 - z, z * candidate


class SplitCell:
    """What the split cells of both Flax APIs share: called as a cell, ``(new_carry, output)`` as
    ``nnx.RNN``/``nn.RNN`` expect, from ``residual(carry, block(carry, inputs))``; the output is the
    new carry unless the cell says otherwise."""

    residual = staticmethod(gated)

    def output(self, carry):
        return carry

    def __call__(self, carry, inputs):
        new = self.residual(carry, self.block(carry, inputs))
        return new, self.output(new)


def check_split_cell(name: str, cell: Any, suggestion: str) -> None:
    """Raises ``TypeError`` unless ``cell`` spells out its residual split."""
    missing = [m for m in SPLIT_CELL_METHODS if not hasattr(cell, m)]
    if missing:
        raise TypeError(
            f"{name}: the cell must split its update into `block(carry, x) -> z` and a `residual`, "
            f"and provide `initialize_carry`; {type(cell).__name__} lacks {', '.join(missing)}. "
            f"{suggestion}"
        )


def stack(name: str, block: Callable, init: PyTree, xs: PyTree, **options):
    """:func:`hbpjax.residual_scan` for a Flax module named ``name``: its errors are reported under
    the module's name (a block that does not fit the residual says so)."""
    try:
        return residual_scan(block, init, xs, **options)
    except _residual.Misfit as err:
        raise ValueError(f"{name}: the block does not fit the residual. {err}") from None
    except ValueError as err:
        if not str(err).startswith("hbpjax."):
            raise
        raise ValueError(f"{name}: {err}") from None


def to_time_major(inputs: jax.Array, time_major: bool) -> tuple[jax.Array, int]:
    """``(inputs with time on axis 0, the original time axis)`` for ``(*batch, time, features)``
    inputs, or ``(time, *batch, features)`` ones with ``time_major``."""
    time_axis = 0 if time_major else inputs.ndim - 2
    return jnp.moveaxis(inputs, time_axis, 0), time_axis


def from_time_major(outputs: PyTree, time_axis: int) -> PyTree:
    """Per-step outputs moved from axis 0 back to ``time_axis``."""
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, time_axis), outputs)
