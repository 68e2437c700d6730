"""The residual combines of ``hbpjax.residual``: values, diagonals, and the errors of a misfit block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbpjax
from helpers import scan_both_ways


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
