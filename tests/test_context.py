"""The setting ``highway_grad`` passes to the stacks: part of the jit cache key, scoped, never leaking."""

import jax
import jax.numpy as jnp
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
