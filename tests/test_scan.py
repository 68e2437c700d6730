"""``residual_scan`` under plain JAX is ``lax.scan``; its arguments are checked with clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import hbpjax
from helpers import assert_trees_close, gru_stack, lstm_stack, scan_both_ways


def _reference_scan(block, residual, init, xs):
    def step(h, x):
        h = residual(h, block(h, x))
        return h, h

    return jax.lax.scan(step, init, xs)


@pytest.mark.parametrize("unroll", [1, 3, True])
def test_forward_equals_lax_scan(unroll):
    W = 0.4 * jax.random.normal(jax.random.key(0), (7, 3, 3))
    block = lambda h, w: jnp.tanh(h @ w)
    got = hbpjax.residual_scan(block, jnp.ones(3), W, residual=hbpjax.residual.relu, unroll=unroll)
    np.testing.assert_allclose(got[1], _reference_scan(block, hbpjax.residual.relu, jnp.ones(3), W)[1], rtol=1e-6)
    assert got[1].shape == (7, 3)
    np.testing.assert_array_equal(got[0], got[1][-1])


def test_plain_mode_is_lax_scan_in_the_jaxpr():
    """Without highway_grad there is no custom_vjp: forward mode and higher order just work."""
    W = 0.4 * jnp.ones((4, 2, 2))
    f = lambda W: hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), jnp.ones(2), W)[0]
    names = {eqn.primitive.name for eqn in jax.make_jaxpr(f)(W).jaxpr.eqns}
    assert "scan" in names and not any("custom" in n for n in names)


@pytest.mark.parametrize("builder", [gru_stack, lstm_stack])
def test_check_grads_exact_mode(builder):
    """Forward and reverse mode, first and second order, against finite differences."""
    with jax.enable_x64(True):
        loss, args = builder(jax.random.key(3), T=4)
        check_grads(jax.jit(loss), args, order=2, modes=("fwd", "rev"))


def test_highway_forward_value_unchanged():
    """The value computed under highway_grad is the plain forward, for every k."""
    loss, args = gru_stack(jax.random.key(4), dtype=jnp.float32)
    value = loss(*args)
    for k in (0, 3):
        v, _ = hbpjax.highway_value_and_grad(loss, iterations=k)(*args)
        np.testing.assert_allclose(v, value, rtol=1e-6)


def test_xs_none_and_zero_length():
    h, hs = hbpjax.residual_scan(lambda h, _: 0.5 * h, jnp.ones(2), length=3)
    np.testing.assert_allclose(h, 1.5**3 * jnp.ones(2))
    f = lambda h0: jnp.sum(hbpjax.residual_scan(lambda h, _: jnp.sin(h), h0, length=0)[0])
    np.testing.assert_allclose(hbpjax.highway_grad(f, iterations=2)(jnp.ones(2)), jnp.ones(2))


def test_length_one_stack():
    f = lambda W: jnp.sum(hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), jnp.ones(3), W)[0] ** 2)
    W = 0.3 * jnp.ones((1, 3, 3))
    for k in (0, 1, 5):
        assert_trees_close(hbpjax.highway_grad(f, iterations=k)(W), jax.grad(f)(W))


# ----------------------------------------------------------------------------------- errors










def test_errors_xs_lengths_must_agree():
    xs = {"w": jnp.ones((4, 3)), "b": jnp.ones((5, 3))}
    with pytest.raises(ValueError, match=r"hbpjax.residual_scan: .*leading.*xs\['b'\]: 5.*xs\['w'\]: 4"):
        scan_both_ways(lambda h, x: h, jnp.ones(3), xs)
    with pytest.raises(ValueError, match=r"`length=3` disagrees with the leading axis of `xs` \(4\)"):
        scan_both_ways(lambda h, x: h, jnp.ones(3), jnp.ones((4, 3)), length=3)
    with pytest.raises(ValueError, match=r"xs\['s'\] is a scalar"):
        scan_both_ways(lambda h, x: h, jnp.ones(3), {"s": jnp.float32(1.0)})
    with pytest.raises(ValueError, match=r"pass `length=L`"):
        scan_both_ways(lambda h, x: h, jnp.ones(3))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(gamma=1.5), ValueError, r"`gamma` must be in \[0, 1\].*1.5"),
        (dict(gamma="x"), TypeError, r"`gamma` must be a Python float"),
        (dict(residual=3), TypeError, r"`residual` must be callable"),
        (dict(length=-1), ValueError, r"`length` must be >= 0"),
        (dict(length=2.5), TypeError, r"`length` must be an int"),
        (dict(linearize="loop"), ValueError, r"`linearize` must be 'vmap' or 'unroll'; got 'loop'"),
    ],
)
def test_errors_bad_options(kwargs, error, match):
    kwargs.setdefault("length", 2)
    with pytest.raises(error, match=r"hbpjax.residual_scan: " + match):
        scan_both_ways(lambda h, x: h, jnp.ones(3), **kwargs)
    with pytest.raises(TypeError, match=r"hbpjax.residual_scan: `block` must be callable"):
        scan_both_ways(None, jnp.ones(3), length=2)


def test_errors_also_under_highway_grad():
    f = lambda h0: jnp.sum(hbpjax.residual_scan(lambda h, x: jnp.ones(4), h0, length=2)[0])
    with pytest.raises(ValueError, match=r"hbpjax.residual_scan: .*shape \(3,\), got \(4,\)"):
        hbpjax.highway_grad(f, iterations=1)(jnp.ones(3))


def test_has_aux_returns_stacked_state_without_gradient():
    """Per-step aux (e.g. updated statistics) is returned stacked, identical in both modes."""
    with jax.enable_x64(True):
        W = 0.5 * jax.random.normal(jax.random.key(5), (6, 3, 3), jnp.float64)

        def block(h, w):
            z = jnp.tanh(h @ w)
            return z, {"mean": jnp.mean(z), "step": jnp.int32(1)}

        def loss(W, h0):
            h, hs, aux = hbpjax.residual_scan(block, h0, W, has_aux=True)
            return jnp.sum(h**2) + jnp.sum(aux["mean"]), aux  # aux contributes no gradient

        h0 = jnp.ones(3, jnp.float64)
        (value, aux), g = jax.value_and_grad(loss, has_aux=True)(W, h0)
        (hvalue, haux), hg = hbpjax.highway_value_and_grad(loss, has_aux=True, iterations=6)(W, h0)
        assert aux["mean"].shape == (6,) and aux["step"].dtype == jnp.int32
        assert_trees_close((hvalue, haux, hg), (value, aux, g))

        def no_aux(W, h0):
            h, _ = hbpjax.residual_scan(lambda h, w: block(h, w)[0], h0, W)
            return jnp.sum(h**2)

        assert_trees_close(g, jax.grad(no_aux)(W, h0))  # stop_gradient: same as without the aux term
        with pytest.raises(ValueError, match=r"has_aux=True `block` must return a pair \(z, aux\); got an array of shape \(3,\)"):
            hbpjax.residual_scan(lambda h, w: h, h0, W, has_aux=True)
