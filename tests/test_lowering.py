"""Ready for accelerators nobody lends us: every example model's highway training step, a
data-parallel step and a layer-parallel step lower for TPU and GPU on this CPU (``jax.export`` with
``platforms=("tpu", "cuda")``), with no host callback and no host transfer in the lowered program.

Exporting lowers the whole step for each platform with that platform's lowering rules, so a
primitive that only has a CPU lowering, or a ``pure_callback`` / ``io_callback`` / debug print on
the converted path, fails here.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import hbpjax
from hbpjax.examples import models
from helpers import sharded_mlp_problem

pytestmark = pytest.mark.usefixtures("eight_devices")

PLATFORMS = ("tpu", "cuda")
# What would run on the host, or need one: Python callbacks, host send / receive, debug printing.
HOST = re.compile(r"callback|host_compute|SendToHost|RecvFromHost|xla_python|debug_print", re.IGNORECASE)


def _lowered(fn, *args) -> str:
    exported = jax.export.export(jax.jit(fn) if not hasattr(fn, "lower") else fn, platforms=PLATFORMS)(*args)
    assert exported.platforms == PLATFORMS
    text = exported.mlir_module()
    host = sorted(set(HOST.findall(text)))
    assert not host, f"host operations in the lowered step: {host}"
    return text


def _tokens(vocab, batch, length):
    return jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length)), jnp.int32)


def _images(batch):
    return jnp.asarray(np.random.default_rng(1).uniform(size=(batch, 8, 8, 1)), jnp.float32), jnp.arange(batch) % 10


def _ce(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


EXAMPLES = {
    "GPT": lambda: (models.GPT(11, dim=8, heads=2, layers=3, max_len=6, rngs=nnx.Rngs(0)), _tokens(11, 8, 6)),
    "PostLNTransformer": lambda: (models.PostLNTransformer(11, dim=8, heads=2, layers=3, max_len=6, rngs=nnx.Rngs(0)), _tokens(11, 8, 6)),
    "ScannedGPT": lambda: (models.ScannedGPT(11, dim=8, heads=2, layers=3, max_len=6, rngs=nnx.Rngs(0)), _tokens(11, 8, 6)),
    "ScannedGPT dots_saveable": lambda: (
        models.ScannedGPT(11, dim=8, heads=2, layers=3, max_len=6, remat=jax.checkpoint_policies.dots_saveable, rngs=nnx.Rngs(0)),
        _tokens(11, 8, 6),
    ),
    "PreActResNet": lambda: (models.PreActResNet(channels=(2, 4), blocks_per_stage=3, rngs=nnx.Rngs(0)), *_images(8)),
    "PostReLUResNet": lambda: (models.PostReLUResNet(channels=(2, 4), blocks_per_stage=3, rngs=nnx.Rngs(0)), *_images(8)),
    "LoopResNet": lambda: (models.LoopResNet(channels=(2, 4), blocks_per_stage=3, rngs=nnx.Rngs(0)), *_images(8)),
    **{
        f"CharRNN {cell}": (lambda cell=cell: (models.CharRNN(11, hidden=8, cell=cell, layers=2, rngs=nnx.Rngs(0)), _tokens(11, 8, 12)))
        for cell in ("gru", "lstm", "mingru")
    },
}


def _example(name):
    model, x, *y = EXAMPLES[name]()
    y = y[0] if y else jnp.roll(x, -1, axis=1)
    graphdef, state = nnx.split(model)
    step = lambda state, x, y: hbpjax.nnx.value_and_grad(_ce, iterations=2)(nnx.merge(graphdef, state), x, y)
    return step, state, x, y


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_training_step_lowers_for_accelerators(name):
    step, state, x, y = _example(name)
    _lowered(step, state, x, y)


def test_data_parallel_step_lowers_for_accelerators():
    """The GPT's highway step with its batch sharded over 8 devices (GSPMD, as Flax models use)."""
    step, state, x, y = _example("GPT")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    jitted = jax.jit(step, in_shardings=(jax.tree.map(lambda _: replicated, state), batch, batch))
    text = _lowered(jitted, state, x, y)
    assert "mhlo.sharding" in text or "sdy.sharding" in text  # the shardings are in the lowered step


def test_layer_parallel_step_lowers_for_accelerators():
    """A residual_scan whose layers are split over 4 devices (layer_axis): the local sweeps and the
    boundary exchanges (collective permutes) lower for TPU and GPU."""
    loss, params, data = sharded_mlp_problem()
    mesh = jax.make_mesh((4,), ("layers",), devices=jax.devices()[:4])
    fn = hbpjax.highway_value_and_grad(lambda p, x: loss(p, x, layer_axis="layers", mesh=mesh), (0, 1), iterations=2)
    text = _lowered(fn, params, data)
    assert "collective_permute" in text


def test_pipelined_step_lowers_for_accelerators():
    """The same stack pipelined over 4 microbatches: the tick loop, the vmapped sweeps and the
    accumulation of the parameters' cotangents lower for TPU and GPU."""
    loss, params, data = sharded_mlp_problem()
    mesh = jax.make_mesh((4,), ("layers",), devices=jax.devices()[:4])
    piped = lambda p, x: loss(p, x, layer_axis="layers", mesh=mesh, microbatches=4)
    text = _lowered(hbpjax.highway_value_and_grad(piped, (0, 1), iterations=2), params, data)
    assert "collective_permute" in text and "stablehlo.while" in text
