"""hbpjax: Highway backpropagation for JAX.

``hbpjax.highway_grad`` is ``jax.grad`` for residual networks and RNNs: it finds the residual stacks
of the function (the ``lax.scan``s with a residual path, from ``nnx.scan``, ``nnx.RNN``, ``nn.scan``,
``lax.fori_loop``..., and every :func:`hbpjax.residual_scan`) and runs their backward as a few
parallel sweeps instead of walking the layers one by one. ``iterations=k`` sweeps count every
gradient path through at most ``k`` blocks exactly; ``k >= L`` is exact backprop.
"""

from . import residual as residual
from ._analysis.conversion import find_stacks as find_stacks
from ._analysis.info import NoStackWarning as NoStackWarning
from ._analysis.info import StackInfo as StackInfo
from ._backward.linearize import UnbatchableWarning as UnbatchableWarning
from ._front.adaptive import AdaptiveIterations as AdaptiveIterations
from ._front.adaptive import AdaptiveState as AdaptiveState
from ._front.context import exact as exact
from ._front.diagnostics import GradientAgreement as GradientAgreement
from ._front.diagnostics import gradient_agreement as gradient_agreement
from ._front.filter import filter_grad as filter_grad
from ._front.filter import filter_value_and_grad as filter_value_and_grad
from ._front.options import Options as Options
from ._front.report import SweepReport as SweepReport
from ._front.scan import residual_scan as residual_scan
from ._front.transform import highway_grad as highway_grad
from ._front.transform import highway_value_and_grad as highway_value_and_grad
from ._version import __version__ as __version__


def __getattr__(name):
    # `hbpjax.nnx`, `hbpjax.linen` and `hbpjax.examples` import flax, so they load on first use only.
    if name in ("nnx", "linen", "examples"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaptiveIterations",
    "AdaptiveState",
    "GradientAgreement",
    "NoStackWarning",
    "Options",
    "StackInfo",
    "SweepReport",
    "UnbatchableWarning",
    "exact",
    "filter_grad",
    "filter_value_and_grad",
    "find_stacks",
    "gradient_agreement",
    "highway_grad",
    "highway_value_and_grad",
    "residual",
    "residual_scan",
]
