"""Flax NNX adapters against Flax's own modules and transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hbpjax
from helpers import assert_trees_close, tree_rel_error

L, D, BATCH = 5, 6, 8


class Block(nnx.Module):
    """LayerNorm + Dropout + BatchNorm: every kind of state a block can carry."""

    def __init__(self, rngs, dtype=jnp.float32):
        self.norm = nnx.LayerNorm(D, param_dtype=dtype, rngs=rngs)
        self.linear = nnx.Linear(D, D, param_dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(D, momentum=0.8, param_dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, h):
        return 0.5 * self.drop(self.bn(jnp.tanh(self.linear(self.norm(h)))))


class Model(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32, residual=hbpjax.residual.additive, gamma=0.0):
        self.stack = hbpjax.nnx.ResidualStack(lambda r: Block(r, dtype), L, rngs=rngs, residual=residual, gamma=gamma)
        self.head = nnx.Linear(D, 1, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.head(self.stack(x))


def loss_fn(model, x, y):
    return jnp.mean((model(x)[:, 0] - y) ** 2)


def _data(dtype=jnp.float32, n=BATCH):
    k1, k2 = jax.random.split(jax.random.key(42))
    x = jax.random.normal(k1, (n, D), dtype)
    return x, jnp.sin(x.sum(-1)) + 0.1 * jax.random.normal(k2, (n,), dtype)


def _scan_reference(model, x):
    """The same blocks under nnx.scan: the behaviour ResidualStack must reproduce."""

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(layer, h):
        return h + layer(h)

    return model.head(forward(model.stack.layers, x))


def _stats(model):
    return nnx.state(model, nnx.BatchStat, nnx.RngState)


def test_forward_and_state_updates_match_nnx_scan():
    x, _ = _data()
    ours, ref = Model(nnx.Rngs(0)), Model(nnx.Rngs(0))
    out_ours, out_ref = ours(x), _scan_reference(ref, x)
    np.testing.assert_allclose(out_ours, out_ref, rtol=1e-6, atol=1e-6)
    assert_trees_close(_stats(ours), _stats(ref))
    # Statistics moved away from their init and differ per layer; dropout keys differ per layer.
    mean = ours.stack.layers.bn.mean[...]
    assert mean.shape == (L, D) and float(jnp.abs(mean[0] - mean[1]).max()) > 1e-4


def test_eval_mode_freezes_statistics():
    x, _ = _data()
    model = Model(nnx.Rngs(0))
    model.eval()
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
    out1 = model(x)
    assert_trees_close(nnx.state(model, nnx.BatchStat), before)
    np.testing.assert_array_equal(out1, model(x))  # no dropout, deterministic


def _grad_both(iterations, dtype=jnp.float32, **model_kw):
    x, y = _data(dtype)
    ours, ref = Model(nnx.Rngs(0), dtype, **model_kw), Model(nnx.Rngs(0), dtype, **model_kw)
    for model in (ours, ref):  # nnx.BatchNorm keeps float32 statistics whatever param_dtype says
        nnx.update(model, jax.tree.map(lambda a: a.astype(dtype), nnx.state(model, nnx.BatchStat)))
    got = nnx.jit(hbpjax.nnx.value_and_grad(loss_fn, iterations=iterations))(ours, x, y)
    expected = nnx.jit(nnx.value_and_grad(loss_fn))(ref, x, y)
    return got, expected, ours, ref


def test_iterations_none_is_nnx_value_and_grad():
    (loss, grads), (e_loss, e_grads), ours, ref = _grad_both(None)
    assert_trees_close((loss, grads, _stats(ours)), (e_loss, e_grads, _stats(ref)), rtol=0, atol=0)


def test_iterations_ge_depth_equals_nnx_value_and_grad_float32():
    (loss, grads), (e_loss, e_grads), ours, ref = _grad_both(L)
    np.testing.assert_array_equal(loss, e_loss)
    assert_trees_close(grads, e_grads, rtol=2e-4, atol=2e-6)
    assert_trees_close(_stats(ours), _stats(ref))
    (_, approx), _, _, _ = _grad_both(0)
    assert tree_rel_error(approx, e_grads) > 1e-3  # k=0 differs: the comparison can fail


@pytest.mark.parametrize("residual, gamma", [(hbpjax.residual.additive, 0.0), (hbpjax.residual.relu, 0.2)])
def test_iterations_ge_depth_equals_nnx_value_and_grad_float64(residual, gamma):
    with jax.enable_x64(True):
        (loss, grads), (e_loss, e_grads), ours, ref = _grad_both(L, jnp.float64, residual=residual, gamma=gamma)
        assert jax.tree.leaves(grads)[0].dtype == jnp.float64
        assert_trees_close((loss, grads), (e_loss, e_grads))


def test_diffstate_selects_parameters():
    x, y = _data()
    only_linear = nnx.DiffState(0, nnx.PathContains("linear"))
    got = hbpjax.nnx.grad(loss_fn, argnums=only_linear, iterations=L)(Model(nnx.Rngs(0)), x, y)
    expected = nnx.grad(loss_fn, argnums=only_linear)(Model(nnx.Rngs(0)), x, y)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    assert_trees_close(got, expected, rtol=2e-4, atol=2e-6)


def test_has_aux_and_decorator_form():
    x, y = _data()

    @hbpjax.nnx.value_and_grad(has_aux=True, iterations=L)
    def with_aux(model, x, y):
        return loss_fn(model, x, y), {"n": x.shape[0]}

    (loss, aux), grads = with_aux(Model(nnx.Rngs(0)), x, y)
    (e_loss, e_aux), e_grads = nnx.value_and_grad(lambda m, x, y: (loss_fn(m, x, y), {"n": 8}), has_aux=True)(
        Model(nnx.Rngs(0)), x, y
    )
    assert aux == e_aux
    assert_trees_close(grads, e_grads, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("graph", [True, False])
def test_trains_under_nnx_jit_and_loss_falls(graph):
    x, y = _data(n=64)
    model = Model(nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    # In tree mode Flax differentiates every leaf of the module, RNG counters included: allow_int.
    @nnx.jit(graph=graph)
    def train_step(model, optimizer, x, y):
        loss, grads = hbpjax.nnx.value_and_grad(loss_fn, iterations=2, graph=graph, allow_int=not graph)(model, x, y)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(40)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(optimizer.step[...]) == 40
    assert float(jnp.abs(model.stack.layers.bn.mean[...]).max()) > 0  # statistics were written back


# ------------------------------------------------------------------------------------ cells


def _copy_params(src, dst):
    nnx.update(dst, nnx.state(src, nnx.Param))
    return dst


@pytest.mark.parametrize(
    "ours, theirs, carry_shape",
    [
        (hbpjax.nnx.GRUCell, nnx.GRUCell, "h"),
        (hbpjax.nnx.LSTMCell, nnx.OptimizedLSTMCell, "ch"),
    ],
)
def test_cells_equal_flax_cells(ours, theirs, carry_shape):
    ref = theirs(3, 5, rngs=nnx.Rngs(7))
    cell = _copy_params(ref, ours(3, 5, rngs=nnx.Rngs(99)))  # different init, then same parameters
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (4, 3))
    h = jax.random.normal(ks[1], (4, 5))
    carry = h if carry_shape == "h" else (jax.random.normal(ks[2], (4, 5)), h)
    new, y = cell(carry, x)
    e_new, e_y = ref(carry, x)
    assert_trees_close((new, y), (e_new, e_y), rtol=1e-6, atol=1e-7)
    # Whole sequences: ResidualRNN equals nnx.RNN, in both layouts and directions.
    xs = jax.random.normal(ks[2], (4, 9, 3))
    for kw in [{}, {"return_carry": True}, {"reverse": True, "keep_order": True}]:
        assert_trees_close(hbpjax.nnx.ResidualRNN(cell, **kw)(xs), nnx.RNN(ref, **kw)(xs), rtol=1e-5, atol=1e-6)
    xs_tm = jnp.swapaxes(xs, 0, 1)
    assert_trees_close(
        hbpjax.nnx.ResidualRNN(cell, time_major=True)(xs_tm), nnx.RNN(ref, time_major=True)(xs_tm), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("cell_cls", [hbpjax.nnx.GRUCell, hbpjax.nnx.LSTMCell])
def test_rnn_exact_at_iterations_ge_T(cell_cls):
    with jax.enable_x64(True):
        T = 7
        model = hbpjax.nnx.ResidualRNN(cell_cls(3, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
        xs = jax.random.normal(jax.random.key(1), (2, T, 3), jnp.float64)
        loss = lambda m, xs: jnp.mean(jnp.sin(m(xs)))
        got = nnx.jit(hbpjax.nnx.grad(loss, iterations=T))(model, xs)
        expected = nnx.jit(nnx.grad(loss))(model, xs)
        assert_trees_close(got, expected)
        assert tree_rel_error(nnx.jit(hbpjax.nnx.grad(loss, iterations=1))(model, xs), expected) > 1e-6


def test_min_gru_exact_at_iterations_zero():
    with jax.enable_x64(True):
        model = hbpjax.nnx.ResidualRNN(hbpjax.nnx.MinGRUCell(3, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
        xs = jax.random.normal(jax.random.key(1), (2, 30, 3), jnp.float64)
        loss = lambda m, xs: jnp.mean(jnp.sin(m(xs)) * jnp.arange(30.0)[:, None])
        got = nnx.jit(hbpjax.nnx.grad(loss, iterations=0))(model, xs)
        assert_trees_close(got, nnx.jit(nnx.grad(loss))(model, xs))


# ----------------------------------------------------------------------------------- errors


def test_errors_block_output_must_fit_additive_residual():
    class Widening(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(D, D + 1, rngs=rngs)

        def __call__(self, h):
            return self.linear(h)

    stack = hbpjax.nnx.ResidualStack(Widening, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"hbpjax.nnx.ResidualStack: .*`additive`.*shape \(8, 6\), got \(8, 7\)"):
        stack(jnp.ones((BATCH, D)))


def test_errors_num_layers_must_be_positive():
    with pytest.raises(ValueError, match=r"hbpjax.nnx.ResidualStack: `num_layers` must be >= 1; got 0"):
        hbpjax.nnx.ResidualStack(Block, 0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"`num_layers` must be an int"):
        hbpjax.nnx.ResidualStack(Block, 2.0, rngs=nnx.Rngs(0))


def test_errors_value_and_grad_needs_a_module_or_state():
    x, y = _data()
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"hbpjax.nnx.value_and_grad: argument 0 must be an nnx.Module or an nnx.State.*got a dict"):
        hbpjax.nnx.value_and_grad(lambda p, x, y: jnp.sum(p["w"]))(params, x, y)
    with pytest.raises(TypeError, match=r"hbpjax.nnx.grad: argument 1 must be an nnx.Module.*array of shape \(8, 6\)"):
        hbpjax.nnx.grad(loss_fn, argnums=1)(Model(nnx.Rngs(0)), x, y)
    with pytest.raises(ValueError, match=r"hbpjax.nnx.grad: `iterations` must be >= 0"):
        hbpjax.nnx.grad(loss_fn, iterations=-1)


def test_errors_rnn_needs_a_split_cell():
    with pytest.raises(TypeError, match=r"hbpjax.nnx.ResidualRNN: .*GRUCell lacks block, residual"):
        hbpjax.nnx.ResidualRNN(nnx.GRUCell(2, 3, rngs=nnx.Rngs(0)))
