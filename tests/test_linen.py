"""Flax Linen adapters against ``nn.scan``, ``nn.RNN`` and ``jax.value_and_grad`` with a TrainState."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import hbpjax
from helpers import assert_trees_close, tree_rel_error

L, D, BATCH = 5, 6, 8


class Block(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, train: bool = True):
        z = nn.Dense(D, param_dtype=self.dtype)(nn.LayerNorm(param_dtype=self.dtype)(h))
        z = nn.BatchNorm(use_running_average=not train, momentum=0.8, param_dtype=self.dtype)(jnp.tanh(z))
        return 0.5 * nn.Dropout(0.2, deterministic=not train)(z)


class Model(nn.Module):
    dtype: jnp.dtype = jnp.float32
    residual: object = hbpjax.residual.additive

    @nn.compact
    def __call__(self, x, train: bool = True):
        block = functools.partial(Block, dtype=self.dtype)
        h = hbpjax.linen.ResidualStack(block, num_layers=L, residual=self.residual)(x, train=train)
        return nn.Dense(1, param_dtype=self.dtype)(h)[:, 0]


def _data(dtype=jnp.float32, n=BATCH):
    k1, k2 = jax.random.split(jax.random.key(42))
    x = jax.random.normal(k1, (n, D), dtype)
    return x, jnp.sin(x.sum(-1)) + 0.1 * jax.random.normal(k2, (n,), dtype)


def _init(model, x, dtype=jnp.float32):
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    # Linen's BatchNorm keeps float32 statistics whatever param_dtype says.
    variables["batch_stats"] = jax.tree.map(lambda a: a.astype(dtype), variables["batch_stats"])
    return variables


def _loss_fn(model, batch_stats, x, y, dropout_key):
    def loss_fn(params):
        pred, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, rngs={"dropout": dropout_key}, mutable=["batch_stats"]
        )
        return jnp.mean((pred - y) ** 2), updates

    return loss_fn


class NoDropBlock(nn.Module):
    @nn.compact
    def __call__(self, h):
        z = nn.Dense(D)(nn.LayerNorm()(h))
        return 0.5 * nn.BatchNorm(use_running_average=False, momentum=0.8)(jnp.tanh(z))


def test_layout_and_forward_equal_nn_scan():
    """Output and updated statistics equal a lifted nn.scan of the same block (dropout off: the
    two split dropout keys differently)."""
    x, _ = _data()
    variables = hbpjax.linen.ResidualStack(Block, num_layers=L).init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    assert variables["params"]["layers"]["Dense_0"]["kernel"].shape == (L, D, D)
    assert variables["batch_stats"]["layers"]["BatchNorm_0"]["mean"].shape == (L, D)

    stack = hbpjax.linen.ResidualStack(NoDropBlock, num_layers=L)
    variables = stack.init(jax.random.key(0), x)
    out, updates = stack.apply(variables, x, mutable=["batch_stats"])

    class Step(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return h + NoDropBlock(name="block")(h), None

    ref = nn.scan(Step, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True}, length=L)()
    ref_vars = {c: {"block": v["layers"]} for c, v in variables.items()}
    (e_out, _), e_updates = ref.apply(ref_vars, x, None, mutable=["batch_stats"])
    np.testing.assert_allclose(out, e_out, rtol=1e-6, atol=1e-6)
    assert_trees_close(updates["batch_stats"]["layers"], e_updates["batch_stats"]["block"])
    mean = updates["batch_stats"]["layers"]["BatchNorm_0"]["mean"]
    assert float(jnp.abs(mean[0] - mean[1]).max()) > 1e-4  # per-layer statistics


def _both(iterations, dtype=jnp.float32, residual=hbpjax.residual.additive):
    x, y = _data(dtype)
    model = Model(dtype, residual)
    variables = _init(model, x, dtype)
    loss_fn = _loss_fn(model, variables["batch_stats"], x, y, jax.random.key(3))
    got = jax.jit(hbpjax.highway_value_and_grad(loss_fn, has_aux=True, iterations=iterations))(variables["params"])
    expected = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    return got, expected


def test_iterations_none_equals_jax_value_and_grad():
    got, expected = _both(None)
    assert_trees_close(got, expected, rtol=0, atol=0)


def test_iterations_ge_depth_float32():
    got, expected = _both(L)
    assert_trees_close(got, expected, rtol=2e-4, atol=2e-6)
    approx, _ = _both(0)
    assert tree_rel_error(approx[1], expected[1]) > 1e-3


@pytest.mark.parametrize("residual", [hbpjax.residual.additive, hbpjax.residual.relu])
def test_iterations_ge_depth_float64(residual):
    with jax.enable_x64(True):
        got, expected = _both(L, jnp.float64, residual)
        assert jax.tree.leaves(got[1])[0].dtype == jnp.float64
        assert_trees_close(got, expected)


def test_train_state_training_and_eval_mode():
    x, y = _data(n=64)
    model = Model()
    variables = _init(model, x)

    class TrainState(train_state.TrainState):
        batch_stats: dict

    state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.adam(3e-3), batch_stats=variables["batch_stats"])

    @jax.jit
    def train_step(state, x, y, key):
        loss_fn = _loss_fn(model, state.batch_stats, x, y, key)
        (loss, updates), grads = hbpjax.highway_value_and_grad(loss_fn, has_aux=True, iterations=2)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), loss

    losses = []
    for step in range(40):
        state, loss = train_step(state, x, y, jax.random.fold_in(jax.random.key(0), step))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses

    stats = state.batch_stats
    pred = model.apply({"params": state.params, "batch_stats": stats}, x, train=False)
    pred2, updates = model.apply({"params": state.params, "batch_stats": stats}, x, train=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(pred, pred2)
    assert_trees_close(updates["batch_stats"], stats, rtol=0, atol=0)  # eval mode: statistics unchanged


@pytest.mark.parametrize("ours, theirs", [(hbpjax.linen.GRUCell, nn.GRUCell), (hbpjax.linen.LSTMCell, nn.LSTMCell)])
def test_rnn_equals_nn_rnn_and_is_exact(ours, theirs):
    with jax.enable_x64(True):
        T = 7
        xs = jax.random.normal(jax.random.key(0), (2, T, 3), jnp.float64)
        ref = nn.RNN(theirs(features=4, param_dtype=jnp.float64))
        ref_vars = ref.init(jax.random.key(1), xs)
        rnn = hbpjax.linen.ResidualRNN(functools.partial(ours, features=4, param_dtype=jnp.float64))
        variables = {"params": {"cell": ref_vars["params"]["cell"]}}
        assert jax.tree.structure(rnn.init(jax.random.key(2), xs)) == jax.tree.structure(variables)
        assert_trees_close(rnn.apply(variables, xs), ref.apply(ref_vars, xs))

        def loss(params):
            return jnp.mean(jnp.sin(rnn.apply({"params": params}, xs)))

        exact = jax.grad(loss)(variables["params"])
        assert_trees_close(jax.jit(hbpjax.highway_grad(loss, iterations=T))(variables["params"]), exact)
        assert tree_rel_error(jax.jit(hbpjax.highway_grad(loss, iterations=1))(variables["params"]), exact) > 1e-6


def test_errors():
    x, _ = _data()

    class Widening(nn.Module):
        @nn.compact
        def __call__(self, h):
            return nn.Dense(D + 1)(h)

    with pytest.raises(ValueError, match=r"hbpjax.linen.ResidualStack: .*`additive`.*shape \(8, 6\), got \(8, 7\)"):
        hbpjax.linen.ResidualStack(Widening, num_layers=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"hbpjax.linen.ResidualStack: `num_layers` must be >= 1; got 0"):
        hbpjax.linen.ResidualStack(Block, num_layers=0).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"hbpjax.linen.ResidualRNN: .*GRUCell lacks block, residual"):
        hbpjax.linen.ResidualRNN(functools.partial(nn.GRUCell, features=3)).init(jax.random.key(0), jnp.ones((1, 4, 2)))
