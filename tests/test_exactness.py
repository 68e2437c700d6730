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
from helpers import (
    assert_trees_close,
    gru_stack,
    highway_by_definition,
    lstm_stack,
    mlp_stack,
    tree_rel_error,
    two_stacks,
)

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


@pytest.mark.parametrize("layer_parallel", [False, True])
def test_integer_carry_leaves_are_state(layer_parallel):
    """A step counter in the carry (as Flax RNG counts are) is non-differentiable state, as for jax.grad."""
    with jax.enable_x64(True):
        L = 8
        W = 0.4 * jax.random.normal(jax.random.key(11), (L, 3, 3), jnp.float64)
        h0 = jax.random.normal(jax.random.key(12), (2, 3), jnp.float64)
        mesh = jax.make_mesh((2,), ("layers",), devices=jax.devices()[:2]) if layer_parallel else None

        def loss(W, h0):
            def block(carry, w):
                h, step = carry
                scale = 1.0 / (1.0 + step.astype(h.dtype))  # the counter changes the layer
                return jnp.tanh(h @ w) * scale, jnp.ones_like(step)

            (h, steps), (hs, _) = hbpjax.residual_scan(
                block, (h0, jnp.int32(0)), W, layer_axis="layers" if mesh else None, mesh=mesh
            )
            return jnp.sum(jnp.sin(hs)) + jnp.sum(h**2) + steps.astype(h.dtype)

        _check_exact(loss, (W, h0), depth=L)


@pytest.mark.parametrize("L", [64, 200, 512])
def test_residual_gain_above_one_is_finite_and_exact(L):
    """r = 1.5 h + z with z = -0.5 h + ...: K = 1.5 alone overflows over long spans (k=L was off by
    2e16 at L=200, NaN at L=512). The backward keeps |K| <= 1 in the scan: finite at every k, exact
    at k >= L (here already at k = 0: K + J = 1)."""
    xs = jax.random.normal(jax.random.key(13), (L, 4))

    def loss(h0, xs):
        block = lambda h, x: -0.5 * h + 0.01 * jnp.tanh(x)
        h, hs = hbpjax.residual_scan(block, h0, xs, residual=lambda h, z: 1.5 * h + z)
        return jnp.sum(hs[:100] ** 2) + jnp.sum(h)

    exact = jax.grad(loss)(jnp.ones(4), xs)
    for k in (0, 2, L):
        got = jax.jit(hbpjax.highway_grad(loss, iterations=k))(jnp.ones(4), xs)
        assert bool(jnp.all(jnp.isfinite(got)))
        assert_trees_close(got, exact, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_residual_gain_above_one_with_a_block_ignoring_the_carry(dtype):
    """J = 0 (the block ignores the carry) and a loss on the first 10 of 256 carries: 1.5^256
    overflows, backprop's gradient does not. k = 0 is exact and finite (it was half NaN)."""
    xs = jax.random.normal(jax.random.key(14), (256, 4), dtype)

    def loss(h0, xs):
        _, hs = hbpjax.residual_scan(
            lambda h, x: 0.01 * jnp.tanh(x), h0, xs, residual=lambda h, z: jnp.asarray(1.5, h.dtype) * h + z
        )
        return jnp.sum(hs[:10].astype(jnp.float32) ** 2)

    h0 = jnp.ones(4, dtype)
    exact = jax.grad(loss)(h0, xs)
    assert bool(jnp.all(jnp.isfinite(exact)))
    for k in (0, 3):
        got = jax.jit(hbpjax.highway_grad(loss, iterations=k))(h0, xs)
        assert bool(jnp.all(jnp.isfinite(got)))
        assert_trees_close(got, exact, rtol=1e-2 if dtype == jnp.float16 else 1e-5)


def _mlp_by_definition():
    L, d, batch = 6, 3, 2
    ks = jax.random.split(jax.random.key(15), 4)
    scale = 1.0 + 0.2 * jax.random.normal(ks[0], (d,), jnp.float64)
    W = (0.8 / np.sqrt(d)) * jax.random.normal(ks[1], (L, d, d), jnp.float64)
    h0 = jax.random.normal(ks[2], (batch, d), jnp.float64)
    c = jax.random.normal(ks[3], (L, batch, d), jnp.float64)
    step = lambda scale, h, w: h + jnp.tanh((h * scale) @ w)
    k_of = lambda scale, h, w: jnp.ones_like(h)  # additive: K = 1

    def loss(scale, W, h0):
        _, hs = hbpjax.residual_scan(lambda h, w: jnp.tanh((h * scale) @ w), h0, W)
        return jnp.sum(c * hs)

    return loss, step, k_of, (scale, W, h0), c


def _gru_by_definition():
    L, d, d_in, batch = 6, 3, 2, 2
    ks = jax.random.split(jax.random.key(16), 5)
    params = {n: jax.random.normal(k, s, jnp.float64) for n, k, s in zip(("Wz", "Uz", "Wh"), ks, ((d_in, d), (d, d), (d, d)))}
    xs = jax.random.normal(ks[3], (L, batch, d_in), jnp.float64)
    h0 = 0.5 * jax.random.normal(ks[4], (batch, d), jnp.float64)
    c = jax.random.normal(jax.random.key(17), (L, batch, d), jnp.float64)
    gate = lambda p, h, x: jax.nn.sigmoid(x @ p["Wz"] + h @ p["Uz"])
    step = lambda p, h, x: (1 - gate(p, h, x)) * h + gate(p, h, x) * jnp.tanh(h @ p["Wh"])
    k_of = lambda p, h, x: 1 - gate(p, h, x)  # gated: K = 1 - u

    def loss(p, xs, h0):
        cell = lambda h, x: (1 - gate(p, h, x), gate(p, h, x) * jnp.tanh(h @ p["Wh"]))
        _, hs = hbpjax.residual_scan(cell, h0, xs, residual=hbpjax.residual.gated)
        return jnp.sum(c * hs)

    return loss, step, k_of, (params, xs, h0), c


@pytest.mark.parametrize("model", [_mlp_by_definition, _gru_by_definition])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_intermediate_k_counts_paths_through_at_most_k_blocks(model, k):
    """0 < k < L - 1 against the recurrence written out with dense Jacobians (helpers), not
    against values this code produced."""
    with jax.enable_x64(True):
        loss, step, k_of, (params, xs, h0), c = model()
        got = jax.jit(hbpjax.highway_grad(loss, (0, 1, 2), iterations=k))(params, xs, h0)
        expected = highway_by_definition(step, k_of, params, h0, xs, c, k)
        assert_trees_close(got, jax.tree.map(jnp.asarray, expected))


@pytest.mark.parametrize("builder", [mlp_stack, gru_stack, lstm_stack])
def test_save_linearization_false_is_the_same_gradient(builder):
    """Recomputing the linearization in every sweep changes memory, not the numbers."""
    with jax.enable_x64(True):
        loss, args = builder(jax.random.key(18))
        argnums = tuple(range(len(args)))
        for k in (0, 2):
            kept = jax.jit(hbpjax.highway_grad(loss, argnums, iterations=k))(*args)
            again = jax.jit(hbpjax.highway_grad(loss, argnums, iterations=k, save_linearization=False))(*args)
            assert_trees_close(again, kept)
        assert_trees_close(
            jax.jit(hbpjax.highway_grad(loss, argnums, iterations=12, save_linearization=False))(*args),
            jax.grad(loss, argnums)(*args),
        )


@pytest.mark.parametrize("scans", ["auto", "marked"])
def test_alternating_sublayers_chosen_by_a_per_layer_cond_exact(scans):
    """A block that picks its sublayer with `lax.cond` on a per-layer integer (attention / MLP
    alternating as separate layers of one stack): vmap of the cond puts stop_gradient on the operands
    of its linearization, which has no transpose rule of its own."""
    L, d = 6, 4
    with jax.enable_x64(True):
        key = jax.random.key(7)
        W = 0.5 * jax.random.normal(key, (L, d, d), jnp.float64)
        kinds = jnp.arange(L, dtype=jnp.int32) % 2
        x = jax.random.normal(jax.random.key(8), (3, d), jnp.float64)

        def block(h, layer):
            w, kind = layer
            return jax.lax.cond(kind == 0, lambda h: jnp.tanh(h @ w), lambda h: jnp.sin(h @ w) ** 2, h)

        def loss(W, x):
            if scans == "marked":
                h, _ = hbpjax.residual_scan(block, x, (W, kinds))
            else:
                h, _ = jax.lax.scan(lambda h, layer: (h + block(h, layer), None), x, (W, kinds))
            return jnp.sum(jnp.cos(h))

        exact = jax.grad(loss, (0, 1))(W, x)
        assert_trees_close(hbpjax.highway_grad(loss, (0, 1), iterations=L, scans=scans)(W, x), exact)
        assert_trees_close(jax.jit(hbpjax.highway_grad(loss, (0, 1), iterations=L, scans=scans))(W, x), exact)
        assert tree_rel_error(hbpjax.highway_grad(loss, (0, 1), iterations=0, scans=scans)(W, x), exact) > 1e-6
