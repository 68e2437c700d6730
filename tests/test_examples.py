"""The example models of the benchmarks and notebooks (``hbpjax.examples.models``), as they are
built there, in float64: Highway-BP with ``k >= L`` equals Flax's own gradient, with the
examples' per-layer linearization (``linearize="unroll"``, the forward written out) and with the
batched one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_trees_close, count, model_grad, scan_bodies, tree_rel_error

import hbpjax
from hbpjax.examples import models

LAYERS = 3


def _in_float64(model):
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    return nnx.merge(graphdef, state)


def _cross_entropy(model, x, y):
    logits = model(x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1))


def _transformer(cls, linearize):
    model = cls(11, dim=8, heads=2, layers=LAYERS, max_len=6, linearize=linearize, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 11, (2, 6)).astype(np.int32)
    return model, tokens, np.roll(tokens, -1, axis=1)


def _resnet(cls, linearize):
    model = cls(channels=(2, 4), blocks_per_stage=LAYERS, linearize=linearize, rngs=nnx.Rngs(0))
    images = np.random.default_rng(1).uniform(size=(4, 8, 8, 1))  # float64: cast where used
    return model, images, np.arange(4, dtype=np.int32)


MODELS = {
    "gpt": lambda lin: _transformer(models.GPT, lin),
    "post_ln": lambda lin: _transformer(models.PostLNTransformer, lin),
    "pre_act_resnet": lambda lin: _resnet(models.PreActResNet, lin),
    "post_relu_resnet": lambda lin: _resnet(models.PostReLUResNet, lin),
}


@pytest.mark.parametrize("linearize", ["unroll", "vmap"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_example_model_exact_at_k_equal_to_layers(name, linearize):
    with jax.enable_x64(True):
        model, x, y = MODELS[name](linearize)
        args = (_in_float64(model), jnp.asarray(x), jnp.asarray(y))
        exact = model_grad(_cross_entropy, args, module=True)
        assert_trees_close(model_grad(_cross_entropy, args, LAYERS, module=True), exact)
        assert tree_rel_error(model_grad(_cross_entropy, args, 0, module=True), exact) > 1e-6


@pytest.mark.parametrize(
    ("name", "primitive", "per_layer", "stages"),
    [
        ("pre_act_resnet", "conv_general_dilated", 2, 2),
        ("post_relu_resnet", "conv_general_dilated", 2, 2),
        ("gpt", "dot_general", 6, 1),  # qkv, two attention einsums, projection, two MLP matmuls
        ("post_ln", "dot_general", 6, 1),
    ],
)
def test_each_layer_evaluated_once_per_forward_step(name, primitive, per_layer, stages):
    """The forward keeps each layer's linearization from its own evaluation, not from a second
    copy of the block beside it (which XLA does not always merge, and cannot where the copy
    computes a jitted function's primal inside another call): each forward scan holds the layer's
    convolutions or matmuls once, and the backward holds no scan."""
    model, x, y = MODELS[name]("unroll")
    graphdef, state = nnx.split(model)
    loss = lambda state, x, y: _cross_entropy(nnx.merge(graphdef, state), x, y)
    x = x.astype(np.float32) if x.dtype == np.float64 else x
    jaxpr = jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=0))(state, x, y).jaxpr
    assert [count(body, primitive) for body in scan_bodies(jaxpr)] == [per_layer] * stages
