"""The diagonal affine prefix scan against a plain Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbpjax._backward.prefix import affine_scan, prepare, solve


def _loop(k, u):
    w = np.zeros_like(u)
    nxt = np.zeros_like(u[0])
    for j in reversed(range(len(u))):
        nxt = u[j] + k[j] * nxt
        w[j] = nxt
    return w


@pytest.mark.parametrize("method", ["parallel", "sequential"])
@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 13, 64, 100])
def test_matches_loop(length, method):
    rng = np.random.default_rng(length)
    k = rng.uniform(-1.2, 1.2, (length, 3))
    u = rng.normal(size=(length, 3))
    with jax.enable_x64(True):
        np.testing.assert_allclose(affine_scan(k, u, method=method), _loop(k, u), rtol=1e-12, atol=1e-12)


def test_pytree_and_reuse_of_the_preparation():
    rng = np.random.default_rng(0)
    k = {"a": rng.uniform(size=(9, 2)), "b": rng.uniform(size=(9,))}
    prepared = prepare(jax.tree.map(jnp.asarray, k))
    for seed in range(3):  # one preparation, several right-hand sides (one per sweep)
        u = jax.tree.map(lambda a: np.random.default_rng(seed).normal(size=a.shape), k)
        w = solve(prepared, jax.tree.map(jnp.asarray, u))
        for name in k:
            np.testing.assert_allclose(w[name], _loop(k[name], u[name]), rtol=1e-5, atol=1e-6)


def test_order_of_composition_matters():
    """Non-commuting order: the last coefficient must never matter, the first must."""
    u = jnp.ones(3)
    assert affine_scan(jnp.array([2.0, 3.0, 100.0]), u).tolist() == [9.0, 4.0, 1.0]
    assert affine_scan(jnp.array([5.0, 3.0, 2.0]), u).tolist() == [21.0, 4.0, 1.0]


def test_errors_unknown_method():
    with pytest.raises(ValueError, match="unknown prefix scan method 'magic'"):
        affine_scan(jnp.ones(2), jnp.ones(2), method="magic")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_gains_above_one_stay_finite_where_the_loop_is(dtype):
    """|k| > 1 over a long span overflows the products of the recursive doubling; where the u they
    multiply is zero (the loss reads only the first carries) that was inf * 0 = NaN."""
    k = 1.5 * jnp.ones(1024, dtype)
    u = jnp.where(jnp.arange(1024) < 10, 1.0, 0.0).astype(dtype)
    parallel, sequential = affine_scan(k, u), affine_scan(k, u, method="sequential")
    assert bool(jnp.all(jnp.isfinite(sequential)))
    assert bool(jnp.all(jnp.isfinite(parallel)))
    np.testing.assert_allclose(np.asarray(parallel, np.float64), np.asarray(sequential, np.float64), rtol=3e-2)
