"""Equinox: ``hbpjax.filter_grad`` / ``filter_value_and_grad`` against ``eqx.filter_value_and_grad``
on Equinox's own modules, unmodified, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbpjax
from helpers import assert_trees_close, tree_rel_error

eqx = pytest.importorskip("equinox")

T, B, D_IN, H = 7, 2, 3, 4


def _arrays(tree):
    return [x for x in jax.tree.leaves(tree) if x is not None]


def _gru_loss(cell, xs):
    def step(h, x):
        h = jax.vmap(cell)(x, h)
        return h, h

    _, hs = jax.lax.scan(step, jnp.zeros((B, H), xs.dtype), xs)
    return jnp.sum(jnp.sin(hs) * jnp.arange(1, T + 1, dtype=xs.dtype)[:, None, None])


def _lstm_loss(cell, xs):
    def step(carry, x):
        carry = jax.vmap(cell)(x, carry)
        return carry, carry[1]

    zeros = jnp.zeros((B, H), xs.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), xs)
    return jnp.sum(jnp.sin(hs))


def _mlp_stack_loss(mlps, x):
    """A residual stack of eqx.nn.MLP blocks: the MLPs' arrays stacked (eqx.filter_vmap), scanned."""
    arrays, static = eqx.partition(mlps, eqx.is_array)

    def step(h, layer):
        mlp = eqx.combine(layer, static)
        return h + jax.vmap(mlp)(h), None

    h, _ = jax.lax.scan(step, x, arrays)
    return jnp.sum(jnp.sin(h))


class _LRU(eqx.Module):
    """An LRU-style block in Equinox: ``eqx.nn.Linear`` in and out around a diagonal linear
    recurrence over time (``lax.scan``), residual around it."""

    norm: eqx.nn.LayerNorm
    inp: eqx.nn.Linear
    out: eqx.nn.Linear
    decay: jax.Array

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm = eqx.nn.LayerNorm(H, dtype=jnp.float64)
        self.inp = eqx.nn.Linear(H, H, key=k1, dtype=jnp.float64)
        self.out = eqx.nn.Linear(H, H, key=k2, dtype=jnp.float64)
        self.decay = jax.random.normal(k3, (H,), jnp.float64)

    def __call__(self, h):  # h: (T, H)
        u = jax.vmap(self.inp)(jax.vmap(self.norm)(h))

        def step(s, u_t):
            s = jax.nn.sigmoid(self.decay) * s + u_t
            return s, s

        _, states = jax.lax.scan(step, jnp.zeros(H, h.dtype), u)
        return h + jax.vmap(self.out)(jnp.tanh(states))


def _ssm_stack_loss(blocks, x):
    for block in blocks:  # a Python loop of blocks that each hold a scan: every stacked SSM
        x = jax.vmap(block)(x)
    return jnp.sum(jnp.sin(x))


def test_stacked_ssm_converts_both_levels():
    """The loop of blocks is a chain, the scan in each block a stack in the chain's block, each
    listed once; k at or above both lengths equals eqx.filter_grad in float64, k = 0 differs."""
    with jax.enable_x64(True):
        blocks = [_LRU(k) for k in jax.random.split(jax.random.key(5), 4)]
        x = jax.random.normal(jax.random.key(6), (B, T, H), jnp.float64)
        stacks = hbpjax.find_stacks(_ssm_stack_loss, blocks, x)
        assert [(s.kind, s.length, s.converted) for s in stacks] == [("chain", 4, True), ("scan", T, True)], str(stacks)
        exact = eqx.filter_grad(_ssm_stack_loss)(blocks, x)
        got = hbpjax.filter_grad(_ssm_stack_loss, iterations=T)(blocks, x)
        assert jax.tree.structure(got) == jax.tree.structure(exact)
        assert_trees_close(_arrays(got), _arrays(exact))
        k0 = hbpjax.filter_grad(_ssm_stack_loss, iterations=0)(blocks, x)
        assert tree_rel_error(_arrays(k0), _arrays(exact)) > 1e-6


def _cases():
    key = jax.random.key(0)
    xs = jax.random.normal(key, (T, B, D_IN), jnp.float64)
    gru = eqx.nn.GRUCell(D_IN, H, key=jax.random.key(1), dtype=jnp.float64)
    lstm = eqx.nn.LSTMCell(D_IN, H, key=jax.random.key(2), dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(3), 5)
    mlps = eqx.filter_vmap(lambda k: eqx.nn.MLP(H, H, 8, 2, activation=jnp.tanh, key=k, dtype=jnp.float64))(keys)
    x = jax.random.normal(jax.random.key(4), (B, H), jnp.float64)
    return {
        "gru": (_gru_loss, gru, xs, T),
        "lstm": (_lstm_loss, lstm, xs, T),
        "mlp_stack": (_mlp_stack_loss, mlps, x, 5),
    }


@pytest.mark.parametrize("name", ["gru", "lstm", "mlp_stack"])
def test_k_ge_L_equals_eqx_filter_value_and_grad(name):
    with jax.enable_x64(True):
        loss, model, x, L = _cases()[name]
        value, exact = eqx.filter_value_and_grad(loss)(model, x)
        got_value, got = hbpjax.filter_value_and_grad(loss, iterations=L)(model, x)
        assert jax.tree.structure(got) == jax.tree.structure(exact)  # the same gradient tree, Nones included
        assert_trees_close(_arrays(got), _arrays(exact))
        np.testing.assert_allclose(got_value, value, rtol=1e-13)
        k0 = hbpjax.filter_grad(loss, iterations=0)(model, x)
        assert tree_rel_error(_arrays(k0), _arrays(exact)) > 1e-6


def test_filter_grad_has_aux_and_decorator():
    with jax.enable_x64(True):
        loss, model, x, L = _cases()["gru"]

        @hbpjax.filter_grad(has_aux=True, iterations=L)
        def with_aux(model, x):
            value = loss(model, x)
            return value, {"value": value}

        grads, aux = with_aux(model, x)
        assert_trees_close(_arrays(grads), _arrays(eqx.filter_grad(loss)(model, x)))
        np.testing.assert_allclose(aux["value"], loss(model, x))


def test_errors_highway_grad_on_a_module_says_to_use_filter_grad():
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"hbpjax.highway_grad: argument 0 has a leaf.*not an array.*hbpjax.filter_grad"):
        hbpjax.highway_grad(lambda m, x: jnp.sum(m(x)))(mlp, jnp.ones(2))


def test_gradient_agreement_on_a_module_with_static_leaves():
    """gradient_agreement compares the floating-point arrays of an eqx.nn.MLP stack (its activation
    functions are static leaves), against eqx.filter_grad computed here."""
    with jax.enable_x64(True):
        loss, model, x, L = _cases()["mlp_stack"]
        exact = np.concatenate([np.ravel(a) for a in _arrays(eqx.filter_grad(loss)(model, x))])
        k0 = np.concatenate([np.ravel(a) for a in _arrays(hbpjax.filter_grad(loss, iterations=0)(model, x))])
        agreement = hbpjax.gradient_agreement(loss, model, x, iterations=(0, L))
        np.testing.assert_allclose(agreement.exact_norm, np.linalg.norm(exact), rtol=1e-12)
        np.testing.assert_allclose(agreement.relative_error[0], np.linalg.norm(k0 - exact) / np.linalg.norm(exact), rtol=1e-9)
        assert agreement.relative_error[1] < 1e-12
