"""``AdaptiveIterations``: k follows the measured agreement, inside one compiled train step."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hbpjax
from helpers import assert_trees_close, tree_rel_error

L = 16


def _problem():
    W = 0.5 * jax.random.normal(jax.random.key(0), (L, 4, 4))
    x = jnp.ones(4)

    def loss(W, x):
        h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)
        return jnp.sum(h**2)

    return loss, W, x


def test_k_rises_until_the_target_is_met_with_one_compilation():
    loss, W, x = _problem()
    cosine = dict(zip(*(lambda r: (r.iterations, r.cosine))(hbpjax.gradient_agreement(loss, W, x, iterations=tuple(range(L))))))
    controller = hbpjax.AdaptiveIterations(target=0.99, every=1, k_init=0, k_max=L)
    traces = []

    def counted(W, x):
        traces.append(None)
        return loss(W, x)

    step = jax.jit(controller.value_and_grad(counted))
    state, seen = controller.init(), []
    for _ in range(6):
        (value, grads), new = step(state, W, x)
        seen.append((int(state.k), float(new.cosine)))
        assert_cosine = cosine[int(state.k)]
        np.testing.assert_allclose(float(new.cosine), assert_cosine, rtol=1e-4)  # what it measured
        assert tree_rel_error(grads, hbpjax.highway_grad(loss, iterations=int(state.k))(W, x)) < 1e-5
        state = new
    ks = [k for k, _ in seen]
    assert ks[0] == 0 and ks == sorted(ks)  # it only ever grew here ...
    first_good = min(k for k in range(L) if cosine[k] >= 0.99)
    assert ks[-1] >= first_good and cosine[ks[-1]] >= 0.99  # ... until the target was met
    assert len(traces) <= 2  # traced once (jax may trace the loss once more for the exact branch)


def test_k_falls_when_agreement_is_comfortably_high():
    loss, W, x = _problem()
    controller = hbpjax.AdaptiveIterations(target=0.5, relax=0.6, every=2, k_init=8, k_min=3)
    step = jax.jit(controller.value_and_grad(loss))
    state = controller.init()
    ks = []
    for _ in range(12):
        ks.append(int(state.k))
        _, state = step(state, W, x)
    assert ks == [8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 3]  # measured every 2 steps, never below k_min
    assert int(state.step) == 12


def test_on_an_nnx_model_in_a_train_step(caplog):
    """The exact gradient is taken on a copy: the model's state advances once per step."""
    model = nnx.RNN(nnx.GRUCell(2, 8, rngs=nnx.Rngs(0)))
    twin = nnx.clone(model)
    xs = jax.random.normal(jax.random.key(1), (3, 32, 2))
    loss = lambda m, x: jnp.mean(m(x) ** 2)
    controller = hbpjax.AdaptiveIterations(target=0.999, every=2, k_init=0, log=True)
    value_and_grad = controller.value_and_grad(loss)

    @nnx.jit
    def train(model, optimizer, state, x):
        (value, grads), state = value_and_grad(state, model, x)
        optimizer.update(model, grads)
        return value, state

    @nnx.jit
    def train_plain(model, optimizer, k, x):
        value, grads = hbpjax.nnx.value_and_grad(loss, iterations=k)(model, x)
        optimizer.update(model, grads)
        return value

    opt, twin_opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param), nnx.Optimizer(twin, optax.adam(1e-2), wrt=nnx.Param)
    state = controller.init()
    with caplog.at_level(logging.INFO, logger="hbpjax"):
        for _ in range(4):
            k = state.k
            value, state = train(model, opt, state, xs)
            np.testing.assert_allclose(value, train_plain(twin, twin_opt, k, xs), rtol=1e-5)
    assert_trees_close(nnx.state(model), nnx.state(twin), rtol=1e-4, atol=1e-6)  # parameters, RNG counts
    assert "hbpjax.AdaptiveIterations: step 0: cosine" in caplog.text and "step 2:" in caplog.text


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(target=1.5), ValueError, r"`target` must be in \(0.0, 1.0\); got 1.5"),
        (dict(target="high"), TypeError, r"`target` must be a float"),
        (dict(k_min=4, k_max=2), ValueError, r"`k_max` \(2\) must be >= `k_min` \(4\)"),
        (dict(k_init=9, k_max=8), ValueError, r"`k_init` \(9\) must be in \[k_min, k_max\]"),
        (dict(every=0), ValueError, r"`every` must be >= 1; got 0"),
        (dict(target=0.9, relax=0.8), ValueError, r"`relax` \(0.8\) must be >= `target` \(0.9\)"),
    ],
)
def test_errors_bad_settings(options, error, match):
    with pytest.raises(error, match=r"hbpjax.AdaptiveIterations: " + match):
        hbpjax.AdaptiveIterations(**options)
