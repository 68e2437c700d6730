"""The residual combines of ``hbpjax.residual``: values, diagonals, and the errors of a misfit block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbpjax
from helpers import assert_trees_close, scan_both_ways


@pytest.mark.parametrize(
    "residual, z, expected_k",
    [
        (hbpjax.residual.additive, jnp.array([0.5, -2.0, 1.0]), lambda h, z: jnp.ones(3)),
        (hbpjax.residual.gated, (jnp.array([0.2, 0.7, -1.5]), jnp.array([1.0, 2.0, 3.0])), lambda h, z: z[0]),
        (hbpjax.residual.relu, jnp.array([0.5, -2.0, 1.0]), lambda h, z: (h + z > 0).astype(h.dtype)),
    ],
)
def test_diagonal_is_the_documented_k(residual, z, expected_k):
    """Each combine is elementwise in h, with the K of the module's table."""
    h = jnp.array([1.0, 0.5, -3.0])
    jacobian = jax.jacfwd(lambda h: residual(h, z))(h)
    np.testing.assert_array_equal(jacobian, jnp.diag(jnp.diag(jacobian)))  # diagonal
    np.testing.assert_allclose(jnp.diag(jacobian), expected_k(h, z))


def test_pytree_carries_combine_leaf_by_leaf():
    h = {"a": jnp.ones(2), "b": (2.0 * jnp.ones(3),)}
    z = {"a": jnp.array([1.0, 2.0]), "b": (jnp.array([-1.0, 0.0, 1.0]),)}
    out = hbpjax.residual.gated(h, (z, z))
    np.testing.assert_allclose(out["a"], z["a"] * h["a"] + z["a"])
    np.testing.assert_allclose(out["b"][0], z["b"][0] * 2.0 + z["b"][0])


def test_errors_additive_shape_mismatch():
    with pytest.raises(ValueError, match=r"hbpjax.residual_scan: .*`additive`.*shape \(3,\), got \(4,\)"):
        scan_both_ways(lambda h, x: jnp.ones(4), jnp.ones(3), length=2)


def test_errors_additive_structure_mismatch():
    with pytest.raises(ValueError, match=r"hbpjax.residual_scan: .*`additive`.*same pytree structure"):
        scan_both_ways(lambda h, x: (h, h), jnp.ones(3), length=2)


def test_errors_gated_needs_a_pair():
    with pytest.raises(ValueError, match=r"hbpjax.residual_scan: .*`gated`.*pair \(a, b\).*got an array of shape \(3,\)"):
        scan_both_ways(lambda h, x: h, jnp.ones(3), length=2, residual=hbpjax.residual.gated)
    with pytest.raises(ValueError, match=r"`gated`.*tuple of length 3"):
        scan_both_ways(lambda h, x: (h, h, h), jnp.ones(3), length=2, residual=hbpjax.residual.gated)
    with pytest.raises(ValueError, match=r"gate a of a `gated` residual.*shape \(3,\), got \(2,\)"):
        scan_both_ways(lambda h, x: (jnp.ones(2), h), jnp.ones(3), length=2, residual=hbpjax.residual.gated)


def test_errors_custom_residual_must_return_the_carry_layout():
    with pytest.raises(ValueError, match=r"hbpjax.residual_scan: residual <lambda>\(h, z\) changed a carry shape"):
        scan_both_ways(lambda h, x: h, jnp.ones(3), length=2, residual=lambda h, z: jnp.concatenate([h, z]))
    with pytest.raises(TypeError, match=r"changed a carry dtype from float32 to int32"):
        scan_both_ways(lambda h, x: h, jnp.ones(3), length=2, residual=lambda h, z: (h + z).astype(jnp.int32))


# ------------------------------------------------------------------ residuals not elementwise in h


def _layer_norm(gain):
    def norm(y):
        mean = jnp.mean(y, -1, keepdims=True)
        return (y - mean) / jnp.sqrt(jnp.var(y, -1, keepdims=True) + 1e-5) * gain + 0.1

    return norm


def _custom_residual_loss(residual):
    def loss(W, h0):
        h, hs = hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), h0, W, residual=residual)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(h**2)

    return loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", ["reversed", "plus_a_sum", "layer_norm"])
def test_residual_not_elementwise_in_h_is_exact(name, dtype):
    """Its non-elementwise parts (a reversal, a sum, a LayerNorm's mean and variance) are cut values
    computed with the block: exact at k >= L (these gave relative errors of 0.27 to 0.81 before)."""
    with jax.enable_x64(dtype == jnp.float64):
        L = 8
        W = 0.5 * jax.random.normal(jax.random.key(0), (L, 3, 3), dtype)
        h0 = jax.random.normal(jax.random.key(1), (2, 3), dtype)
        gain = 1.0 + 0.3 * jax.random.normal(jax.random.key(2), (3,), dtype)
        residual = {
            "reversed": lambda h, z: h[..., ::-1] + z,
            "plus_a_sum": lambda h, z: h + z + 0.1 * jnp.sum(h),
            "layer_norm": lambda h, z: _layer_norm(gain)(h + z),
        }[name]
        loss = _custom_residual_loss(residual)
        exact = jax.grad(loss, (0, 1))(W, h0)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == jnp.float32 else {}
        grad = jax.jit(hbpjax.highway_grad(loss, (0, 1), iterations=L, scans="marked"))
        if name == "reversed":  # no elementwise path in h at all: exact backprop, and the user is told
            with pytest.warns(hbpjax.NoStackWarning, match=r"residual_scan, L=8\): no carry leaf has a residual path"):
                got = grad(W, h0)
        else:
            got = grad(W, h0)
        assert_trees_close(got, exact, **tol)
        kinds = {"reversed": ("none",), "plus_a_sum": ("identity",), "layer_norm": ("diagonal",)}[name]
        assert hbpjax.find_stacks(loss, W, h0)[0].residual == kinds


def test_layer_norm_residual_gets_the_post_ln_split():
    """residual=LayerNorm(h + z) iterates exactly like the hand-written post-LN split
    h' = a * h + b with a = gain / std(h + z) (RoBERTa-style), at every k."""
    with jax.enable_x64(True):
        L = 8
        W = 0.5 * jax.random.normal(jax.random.key(3), (L, 3, 3), jnp.float64)
        h0 = jax.random.normal(jax.random.key(4), (2, 3), jnp.float64)
        gain = 1.0 + 0.3 * jax.random.normal(jax.random.key(5), (3,), jnp.float64)
        automatic = _custom_residual_loss(lambda h, z: _layer_norm(gain)(h + z))

        def by_hand(W, h0):
            def block(h, w):
                f = jnp.tanh(h @ w)
                y = h + f
                a = gain / jnp.sqrt(jnp.var(y, -1, keepdims=True) + 1e-5)
                return a, (f - jnp.mean(y, -1, keepdims=True)) * a + 0.1

            h, hs = hbpjax.residual_scan(block, h0, W, residual=hbpjax.residual.gated)
            return jnp.sum(jnp.sin(hs)) + jnp.sum(h**2)

        for k in (0, 1, 3):
            assert_trees_close(
                jax.jit(hbpjax.highway_grad(automatic, (0, 1), iterations=k))(W, h0),
                jax.jit(hbpjax.highway_grad(by_hand, (0, 1), iterations=k))(W, h0),
            )
