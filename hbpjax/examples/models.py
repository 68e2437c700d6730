"""The models of the benchmarks and notebooks, built from :mod:`hbpjax.nnx` modules.

Every residual part runs through :class:`hbpjax.nnx.ResidualStack` or
:class:`hbpjax.nnx.ResidualRNN`, so ``jax.grad``/``nnx.grad`` give exact backprop and
``hbpjax.nnx.grad(..., iterations=k)`` gives Highway-BP without touching the model. ``gamma`` (the
backward-only split) is a constructor argument: ``gamma=1`` turns the same model's highway
backward into fixed-point iteration. RNNs take ``tbptt=w`` for truncated backprop through time.

=======================  =============================================  ======================
model                    residual structure                             default gamma
=======================  =============================================  ======================
``PreActResNet``         stages of ``h + block(h)``, conv downsampling  0
``PostReLUResNet``       stages of ``relu(h + block(h))``               0
``GPT``                  pre-LN: ``h + attn(LN h)``, ``+ mlp(LN h)``    0.2
``PostLNTransformer``    post-LN: twice ``LN(h + f)``, as ``a h + b``   0.8
``ScannedGPT``           plain Flax: ``nnx.scan`` over ``nnx.remat``    transform's ``gamma``
``LoopResNet``           plain Flax: a Python loop of blocks per stage  0
``CharRNN``              GRU / LSTM / minGRU, stacked with residuals    0
``SequenceClassifier``   one recurrent layer read at its last step      0
=======================  =============================================  ======================
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import hbpjax

# ------------------------------------------------------------------------------------ ResNets


class PreActBlock(nnx.Module):
    """BN-ReLU-conv-BN-ReLU-conv: the update ``z`` of ``h + z``."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.bn1 = nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)
        self.conv1 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)

    def __call__(self, h):
        z = self.conv1(nnx.relu(self.bn1(h)))
        return self.conv2(nnx.relu(self.bn2(z)))


class PostReLUBlock(nnx.Module):
    """conv-BN-ReLU-conv-BN: the ``z`` of ``relu(h + z)`` (the original ResNet block)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)

    def __call__(self, h):
        return self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(h)))))


def _make_block(block, channels, rngs):
    return block(channels, rngs=rngs)


class _Stages(nnx.Module):
    """A stem, stages of residual blocks with strided convolutions between them, global average
    pooling and a linear head; subclasses say how a stage is built and run."""

    def __init__(self, channels, num_classes: int, in_channels: int, make_stage: Callable, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(in_channels, channels[0], (3, 3), rngs=rngs)
        self.stages = nnx.List([make_stage(c) for c in channels])
        self.downsample = nnx.List(
            [nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs) for a, b in itertools.pairwise(channels)]
        )
        self.norm = nnx.BatchNorm(channels[-1], momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(channels[-1], num_classes, rngs=rngs)

    def run_stage(self, stage, h):
        return stage(h)

    def __call__(self, x):
        h = self.stem(x)
        for i, stage in enumerate(self.stages):
            h = self.run_stage(stage, h)
            if i < len(self.downsample):
                h = self.downsample[i](nnx.relu(h))
        return self.head(jnp.mean(nnx.relu(self.norm(h)), axis=(1, 2)))


class _ResNet(_Stages):
    block: Callable[..., nnx.Module] = PreActBlock
    residual = staticmethod(hbpjax.residual.additive)

    def __init__(
        self,
        *,
        channels: tuple[int, ...] = (16, 32),
        blocks_per_stage: int = 8,
        num_classes: int = 10,
        in_channels: int = 1,
        gamma: float = 0.0,
        linearize: str = "unroll",
        unroll: int | bool = True,
        rngs: nnx.Rngs,
    ):
        def make_stage(c):
            return hbpjax.nnx.ResidualStack(
                functools.partial(_make_block, type(self).block, c), blocks_per_stage, rngs=rngs,
                residual=type(self).residual, gamma=gamma, linearize=linearize, unroll=unroll,
            )

        super().__init__(channels, num_classes, in_channels, make_stage, rngs=rngs)


class PreActResNet(_ResNet):
    """Pre-activation ResNet: each stage one ``ResidualStack`` of ``h + block(h)``, strided-conv
    downsampling between stages, global average pooling and a linear head."""


class LoopResNet(_Stages):
    """A pre-activation ResNet written in plain Flax, as Flax's own examples write ResNets: each
    stage a Python loop over its blocks (``h + block(h)``), strided convolutions between stages.

    Nothing of hbpjax in it: ``hbpjax.nnx.value_and_grad`` finds each stage as a chain of identical
    blocks and converts it; the parameters keep their per-block tree.
    """

    def __init__(self, *, channels=(16, 32), blocks_per_stage=8, num_classes=10, in_channels=1, rngs: nnx.Rngs):
        make_stage = lambda c: nnx.List([PreActBlock(c, rngs=rngs) for _ in range(blocks_per_stage)])
        super().__init__(channels, num_classes, in_channels, make_stage, rngs=rngs)

    def run_stage(self, stage, h):
        for block in stage:
            h = h + block(h)
        return h


class PostReLUResNet(_ResNet):
    """The original ResNet layout, ``relu(h + block(h))``, via :func:`hbpjax.residual.relu`."""

    block = PostReLUBlock
    residual = staticmethod(hbpjax.residual.relu)


# ------------------------------------------------------------------------------- Transformers


class _Layer(nnx.Module):
    """One Transformer layer's weights: causal self-attention and an MLP."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs, kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2)))
        self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs, kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2)))

    def attend(self, x):
        batch, length, dim = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        split = lambda a: a.reshape(batch, length, self.heads, dim // self.heads)
        q, k, v = split(q), split(k), split(v)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dim // self.heads)
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        return self.proj(jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, length, dim))

    def mlp(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class PreLNLayer(_Layer):
    """``h + attn(LN h)``, then ``+ mlp(LN h)``: the update ``z`` of ``h + z`` is both sublayers'."""

    def __init__(self, dim, heads, *, rngs):
        super().__init__(dim, heads, rngs=rngs)
        self.norm1, self.norm2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, h):
        a = self.attend(self.norm1(h))
        return a + self.mlp(self.norm2(h + a))


def _post_ln(h, f, scale, bias):
    """``LN(h + f) = a * h + b``: ``a = scale / std(y)``, ``b = (f - mean(y)) a + bias``, ``y = h + f``."""
    y = h + f
    mean = jnp.mean(y, axis=-1, keepdims=True)
    a = lax.rsqrt(jnp.var(y, axis=-1, keepdims=True) + 1e-6) * scale
    return a, (f - mean) * a + bias


class PostLNLayer(_Layer):
    """``h1 = LN(h + attn(h))``, ``h2 = LN(h1 + mlp(h1))``; each ``LN(h + f)`` is ``a h + b``, so the
    layer is the gated residual ``(a2 a1) h + (a2 b1 + b2)`` with ``K = a2 a1`` (RoBERTa-style split,
    use gamma ~ 0.8)."""

    def __init__(self, dim, heads, *, rngs):
        super().__init__(dim, heads, rngs=rngs)
        self.scale1, self.bias1 = nnx.Param(jnp.ones(dim)), nnx.Param(jnp.zeros(dim))
        self.scale2, self.bias2 = nnx.Param(jnp.ones(dim)), nnx.Param(jnp.zeros(dim))

    def __call__(self, h):
        a1, b1 = _post_ln(h, self.attend(h), self.scale1[...], self.bias1[...])
        h1 = a1 * h + b1
        a2, b2 = _post_ln(h1, self.mlp(h1), self.scale2[...], self.bias2[...])
        return a2 * a1, a2 * b1 + b2


class _Transformer(nnx.Module):
    """Embedding, one ``ResidualStack`` of ``layers`` Transformer layers, final LayerNorm, head.

    ``linearize="unroll"`` and ``unroll=True`` (as for the ResNets) suit a CPU, where one transpose
    per layer and a written-out forward run faster than one batched transpose of all layers; on a
    GPU or TPU pass ``linearize="vmap"``.
    """

    layer: Callable[..., nnx.Module] = PreLNLayer
    residual = staticmethod(hbpjax.residual.additive)
    default_gamma = 0.2

    def __init__(
        self, vocab_size: int, *, dim=64, heads=4, layers=4, max_len=256, gamma=None,
        linearize: str = "unroll", unroll: int | bool = True, rngs: nnx.Rngs,
    ):
        gamma = self.default_gamma if gamma is None else gamma
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, dim)))
        cls = type(self).layer
        self.stack = hbpjax.nnx.ResidualStack(
            lambda r: cls(dim, heads, rngs=r), layers, rngs=rngs, residual=type(self).residual, gamma=gamma,
            linearize=linearize, unroll=unroll,
        )
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab_size, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.stack(h)))


class GPT(_Transformer):
    """GPT-2-style pre-LN decoder: each layer of the stack is ``h + attn(LN h)`` then
    ``+ mlp(LN h)``, one additive residual ``h + z`` per layer; gamma 0.2 by default."""


class PostLNTransformer(_Transformer):
    """Post-LN (BERT/RoBERTa-style) decoder, ``h <- LN(h + f(h))`` after attention and after the
    MLP, one gated residual per layer; gamma 0.8."""

    layer = PostLNLayer
    residual = staticmethod(hbpjax.residual.gated)
    default_gamma = 0.8


class PreLNBlock(nnx.Module):
    """A pre-LN Transformer block in plain Flax: ``h + attn(LN h)``, then ``+ mlp(LN h)``."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1, self.norm2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs, kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2)))

    def __call__(self, h):
        causal = nnx.make_causal_mask(jnp.ones(h.shape[:2], jnp.int32))
        h = h + self.attn(self.norm1(h), mask=causal)
        return h + self.fc2(jax.nn.gelu(self.fc1(self.norm2(h))))


class ScannedGPT(nnx.Module):
    """A GPT written the way large models are, with nothing of hbpjax in it: the layers' parameters
    stacked on a leading axis (``nnx.vmap``) and run by ``nnx.scan`` over an ``nnx.remat``-ed
    block, so each layer's activations are recomputed in the backward instead of stored.

    ``hbpjax.nnx.value_and_grad`` finds the scan and converts it (reading through the remat);
    ``gamma`` is then an option of the transform (``gamma=0.2`` suits pre-LN models). ``remat`` is
    ``True`` (``nnx.remat``'s default: save nothing), ``False`` (no remat) or a checkpoint policy
    (``jax.checkpoint_policies.dots_saveable``).
    """

    def __init__(self, vocab_size: int, *, dim=64, heads=4, layers=4, max_len=256, remat=True, rngs: nnx.Rngs):
        self.remat = remat
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, dim)))

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return PreLNBlock(dim, heads, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab_size, rngs=rngs)

    def __call__(self, tokens):
        block = lambda layer, h: layer(h)
        if self.remat is not False:
            block = nnx.remat(block) if self.remat is True else nnx.remat(block, policy=self.remat)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(h, layer):
            return block(layer, h)

        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(run(h, self.layers)))


# ------------------------------------------------------------------------------------- RNNs

CELLS = {"gru": hbpjax.nnx.GRUCell, "lstm": hbpjax.nnx.LSTMCell, "mingru": hbpjax.nnx.MinGRUCell}


def _run_rnn(rnn, x, tbptt):
    """All outputs of ``rnn`` on ``x (batch, time, features)``; truncated BPTT with window ``tbptt``."""
    if not tbptt or tbptt >= x.shape[1]:
        return rnn(x)
    outputs, carry = [], None
    for start in range(0, x.shape[1], tbptt):
        carry, y = rnn(x[:, start : start + tbptt], initial_carry=carry, return_carry=True)
        carry = jax.lax.stop_gradient(carry)  # no gradient flows across the window boundary
        outputs.append(y)
    return jnp.concatenate(outputs, axis=1)


class CharRNN(nnx.Module):
    """Character language model: embedding, ``layers`` recurrent layers (GRU, LSTM or minGRU) with
    residual connections between layers, linear read-out at every step."""

    def __init__(self, vocab_size: int, *, hidden=128, cell="gru", layers=1, gamma=0.0, tbptt=None, unroll=1, rngs: nnx.Rngs):
        self.tbptt = tbptt
        self.embed = nnx.Embed(vocab_size, hidden, rngs=rngs)
        self.rnns = nnx.List(
            [hbpjax.nnx.ResidualRNN(CELLS[cell](hidden, hidden, rngs=rngs), gamma=gamma, unroll=unroll) for _ in range(layers)]
        )
        self.head = nnx.Linear(hidden, vocab_size, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for i, rnn in enumerate(self.rnns):
            y = _run_rnn(rnn, x, self.tbptt)
            x = y if i == 0 else x + y
        return self.head(x)


class SequenceModel(nnx.Module):
    """One recurrent layer over ``(batch, time, features)`` read at its last step: classification
    (pixel-by-pixel digits) or regression (the adding problem, ``num_outputs=1``)."""

    def __init__(self, in_features: int, num_outputs: int, *, hidden=64, cell="gru", gamma=0.0, tbptt=None, unroll=1, rngs: nnx.Rngs):
        self.tbptt = tbptt
        self.rnn = hbpjax.nnx.ResidualRNN(CELLS[cell](in_features, hidden, rngs=rngs), gamma=gamma, unroll=unroll)
        self.head = nnx.Linear(hidden, num_outputs, rngs=rngs)

    def __call__(self, x):
        return self.head(_run_rnn(self.rnn, x, self.tbptt)[:, -1])
