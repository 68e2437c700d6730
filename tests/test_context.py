"""What ``highway_grad`` applies to: the setting it passes to the stacks (part of the jit cache key,
scoped, never leaking), inner gradients, and ``hbpjax.exact()`` regions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbpjax
from helpers import assert_trees_close, mlp_stack, tree_rel_error


def _mlp32():
    return mlp_stack(jax.random.key(0), dtype=jnp.float32, L=6)


def test_iterations_is_part_of_the_jit_cache_key_and_never_leaks():
    """A function jitted once serves k=0, k=L and plain jax.grad, each with its own trace."""
    loss, args = _mlp32()
    f = jax.jit(loss)
    exact = jax.grad(loss)(*args)
    k0 = hbpjax.highway_grad(f, iterations=0)(*args)
    kL = hbpjax.highway_grad(f, iterations=6)(*args)
    plain = jax.grad(f)(*args)  # after highway calls on the same jitted function
    assert_trees_close(kL, exact, rtol=2e-4, atol=1e-5)
    assert_trees_close(plain, exact)
    assert tree_rel_error(k0, exact) > 1e-3
    assert_trees_close(k0, hbpjax.highway_grad(loss, iterations=0)(*args), rtol=1e-5)


def test_context_restored_after_an_error():
    loss, args = _mlp32()

    def broken(*args):
        loss(*args)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        hbpjax.highway_grad(broken, iterations=0)(*args)
    assert_trees_close(jax.grad(loss)(*args), jax.grad(jax.jit(loss))(*args))
    # The residual_scan traced now is a plain lax.scan: forward mode works (custom_vjp would fail).
    jax.jvp(lambda W: loss(W, *args[1:]), (args[0],), (jnp.ones_like(args[0]),))


def _penalty_problem():
    W = 0.4 * jax.random.normal(jax.random.key(30), (6, 3, 3), jnp.float64)
    x = jax.random.normal(jax.random.key(31), (2, 3), jnp.float64)

    def task(W, x):
        h, hs = hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), x, W)
        return jnp.sum(jnp.sin(hs))

    def penalty(W, x):  # a gradient penalty: an inner jax.grad inside the loss
        return jnp.sum(jax.grad(task, 1)(W, x) ** 2)

    return task, penalty, W, x


def test_inner_jax_grad_values_are_exact():
    """The rule: values computed inside the loss, inner gradients included, are exact; the outer
    highway_grad approximates its own backward through every residual scan of the traced
    program (the scans of the inner gradient too)."""
    with jax.enable_x64(True):
        task, penalty, W, x = _penalty_problem()

        def loss(W, x):
            value = penalty(W, x)
            return value, value

        (value, aux), _ = hbpjax.highway_value_and_grad(loss, has_aux=True, iterations=0)(W, x)
        np.testing.assert_allclose(aux, penalty(W, x), rtol=1e-14)  # exact (to rounding: fused differently)
        exact = jax.grad(lambda W, x: penalty(W, x))(W, x)
        approx = hbpjax.highway_grad(lambda W, x: penalty(W, x), iterations=0)(W, x)
        assert tree_rel_error(approx, exact) > 1e-6  # the penalty's own backward is approximated ...
        assert_trees_close(hbpjax.highway_grad(lambda W, x: penalty(W, x), iterations=12)(W, x), exact)


def test_exact_region_keeps_its_part_of_the_gradient_exact():
    """... unless it is inside hbpjax.exact(): then that part of the gradient is jax.grad's."""
    with jax.enable_x64(True):
        task, penalty, W, x = _penalty_problem()

        def loss(W, x):
            with hbpjax.exact():
                kept = penalty(W, x)
            return task(W, x) + kept

        got = hbpjax.highway_grad(loss, iterations=0)(W, x)
        expected = hbpjax.highway_grad(task, iterations=0)(W, x) + jax.grad(penalty)(W, x)
        assert_trees_close(got, expected)
        stacks = [s for s in hbpjax.find_stacks(loss, W, x) if s.kind != "chain"]
        kept = [s for s in stacks if not s.converted]
        assert sum(s.converted for s in stacks) == 1 and kept, str(stacks)  # the task's own scan
        assert all("hbpjax.exact()" in s.reason for s in kept), str(stacks)
