"""The backbone: with ``iterations >= L`` Highway-BP equals ``jax.grad`` in float64.

Every residual kind, carry structure and parameter layout is checked against an independent
reference (plain ``jax.grad`` through ``lax.scan``). A wrong ``(K, u)`` composition order in the
prefix scan still "converges" to something; only this equality catches it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbpjax
from helpers import assert_trees_close, gru_stack, lstm_stack, mlp_stack, tree_rel_error, two_stacks

GAMMAS = [0.0, 0.2, 1.0]


def _all_argnums(args):
    return tuple(range(len(args)))


def _check_exact(loss, args, depth):
    argnums = _all_argnums(args)
    expected = jax.grad(loss, argnums)(*args)
    got = jax.jit(hbpjax.highway_grad(loss, argnums, iterations=depth))(*args)
    assert_trees_close(got, expected)
    # iterations=None is exact backprop through the same code.
    assert_trees_close(hbpjax.highway_grad(loss, argnums, iterations=None)(*args), expected)
    # Small k is *not* exact on these models, so the equality above is not vacuous.
    approx = jax.jit(hbpjax.highway_grad(loss, argnums, iterations=1))(*args)
    assert tree_rel_error(approx, expected) > 1e-6


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("loss_on", ["final", "all"])
@pytest.mark.parametrize("residual", ["additive", "relu", "custom"])
def test_mlp_stack_exact(residual, loss_on, gamma):
    with jax.enable_x64(True):
        loss, args = mlp_stack(jax.random.key(0), residual=residual, gamma=gamma, loss_on=loss_on)
        _check_exact(loss, args, depth=7)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("loss_on", ["final", "all"])
def test_gru_stack_exact(loss_on, gamma):
    with jax.enable_x64(True):
        loss, args = gru_stack(jax.random.key(1), gamma=gamma, loss_on=loss_on)
        _check_exact(loss, args, depth=9)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("residual", ["custom", "gated"])
def test_lstm_pytree_carry_exact(residual, gamma):
    with jax.enable_x64(True):
        loss, args = lstm_stack(jax.random.key(2), residual=residual, gamma=gamma)
        _check_exact(loss, args, depth=8)


@pytest.mark.parametrize("gamma", [0.0, 0.2])
def test_two_stacks_exact(gamma):
    with jax.enable_x64(True):
        loss, args = two_stacks(jax.random.key(3), gamma=gamma)
        _check_exact(loss, args, depth=6)


@pytest.mark.parametrize("gamma", [0.0, 0.2])
def test_unrolled_linearization_exact(gamma):
    """linearize="unroll": one VJP per layer, shared and per-layer parameters, loss on every carry."""
    with jax.enable_x64(True):
        loss, args = mlp_stack(jax.random.key(9), gamma=gamma, loss_on="all", linearize="unroll")
        _check_exact(loss, args, depth=7)
        loss, args = gru_stack(jax.random.key(10), gamma=gamma, linearize="unroll")
        _check_exact(loss, args, depth=9)


def test_has_aux_and_value_exact():
    with jax.enable_x64(True):
        loss, args = gru_stack(jax.random.key(4))

        def loss_aux(*args):
            value = loss(*args)
            return value, {"twice": 2 * value}

        (value, aux), grads = hbpjax.highway_value_and_grad(loss_aux, (0, 2), has_aux=True, iterations=9)(*args)
        (e_value, e_aux), e_grads = jax.value_and_grad(loss_aux, (0, 2), has_aux=True)(*args)
        assert_trees_close((value, aux, grads), (e_value, e_aux, e_grads))
        g, aux2 = hbpjax.highway_grad(loss_aux, 1, has_aux=True, iterations=9)(*args)
        assert_trees_close((g, aux2), jax.grad(loss_aux, 1, has_aux=True)(*args))


def test_init_gradient_only():
    """Gradient with respect to the initial carry alone (the default argnums=0)."""
    with jax.enable_x64(True):
        loss, (W, b, scale, h0) = mlp_stack(jax.random.key(5))
        f = lambda h0: loss(W, b, scale, h0)
        assert_trees_close(hbpjax.highway_grad(f, iterations=7)(h0), jax.grad(f)(h0))


def test_iterations_zero_is_the_residual_path():
    """k = 0 against a hand-derived gradient of an additive stack with a linear per-step loss.

    With ``h_j = h_{j-1} + tanh(h_{j-1} W_j)`` and loss ``sum_j <c_j, h_j>``, the residual path alone
    gives every carry ``w_j = sum_{i >= j} c_i``; the weight gradient is then
    ``h_{j-1}^T (w_j * (1 - t_j^2))`` and the initial carry gets ``w_1 + (w_1 (1 - t_1^2)) W_1^T``.
    """
    with jax.enable_x64(True):
        L, d, batch = 6, 3, 2
        k1, k2, k3 = jax.random.split(jax.random.key(6), 3)
        W = 0.5 * jax.random.normal(k1, (L, d, d), jnp.float64)
        c = jax.random.normal(k2, (L, batch, d), jnp.float64)
        h0 = jax.random.normal(k3, (batch, d), jnp.float64)

        def loss(W, h0):
            _, hs = hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), h0, W)
            return jnp.sum(c * hs)

        gW, gh0 = hbpjax.highway_grad(loss, (0, 1), iterations=0)(W, h0)

        Wn, cn, h = np.asarray(W), np.asarray(c), np.asarray(h0)
        hs = [h]
        for j in range(L):
            hs.append(hs[-1] + np.tanh(hs[-1] @ Wn[j]))
        w = np.cumsum(cn[::-1], axis=0)[::-1]  # w_j = sum_{i >= j} c_i
        expected_W = np.stack([hs[j].T @ (w[j] * (1 - np.tanh(hs[j] @ Wn[j]) ** 2)) for j in range(L)])
        expected_h0 = w[0] + (w[0] * (1 - np.tanh(hs[0] @ Wn[0]) ** 2)) @ Wn[0].T
        np.testing.assert_allclose(gW, expected_W, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(gh0, expected_h0, rtol=1e-12, atol=1e-13)


def test_linear_diagonal_recurrence_exact_at_k0():
    """A gate that does not read h (LRU/minGRU style) has J = 0: k = 0 is already exact."""
    with jax.enable_x64(True):
        T, d_in, d = 40, 3, 5
        ks = jax.random.split(jax.random.key(7), 4)
        Wa = jax.random.normal(ks[0], (d_in, d), jnp.float64)
        Wb = jax.random.normal(ks[1], (d_in, d), jnp.float64)
        xs = jax.random.normal(ks[2], (T, d_in), jnp.float64)
        targets = jax.random.normal(ks[3], (T, d), jnp.float64)

        def loss(Wa, Wb, xs):
            cell = lambda h, x: (jax.nn.sigmoid(x @ Wa), x @ Wb)
            _, hs = hbpjax.residual_scan(cell, jnp.zeros(d, jnp.float64), xs, residual=hbpjax.residual.gated)
            return jnp.mean((hs - targets) ** 2)

        assert_trees_close(
            hbpjax.highway_grad(loss, (0, 1, 2), iterations=0)(Wa, Wb, xs), jax.grad(loss, (0, 1, 2))(Wa, Wb, xs)
        )


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_error_non_increasing_on_contractive_stack(gamma):
    """Small blocks (||J|| << 1): every extra sweep can only add paths, and the error shrinks."""
    with jax.enable_x64(True):
        L, d = 10, 4
        k1, k2 = jax.random.split(jax.random.key(8))
        W = (0.3 / np.sqrt(d)) * jax.random.normal(k1, (L, d, d), jnp.float64)
        h0 = jax.random.normal(k2, (d,), jnp.float64)

        def loss(W, h0):
            _, hs = hbpjax.residual_scan(lambda h, w: 0.5 * jnp.tanh(h @ w), h0, W, gamma=gamma)
            return jnp.sum(jnp.sin(hs))

        exact = jax.grad(loss, (0, 1))(W, h0)
        errors = [
            tree_rel_error(jax.jit(hbpjax.highway_grad(loss, (0, 1), iterations=k))(W, h0), exact)
            for k in range(L + 1)
        ]
        assert errors[0] > 1e-3
        assert all(b <= a * (1 + 1e-9) + 1e-15 for a, b in zip(errors, errors[1:])), errors
        assert errors[-1] < 1e-12
