"""``hbpjax.Options`` and the adapter protocol: one options value for every transform, and
``gradient_agreement`` / ``AdaptiveIterations`` differentiating as the transform for the same
arguments would (plain JAX, Equinox-style filtering, NNX)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hbpjax
from helpers import assert_trees_close, mlp_stack, tree_rel_error

eqx = pytest.importorskip("equinox")

L = 7


def _problem():
    with jax.enable_x64(True):
        return mlp_stack(jax.random.key(0), L=L)


def _transforms():
    """Every transform, as a function of (loss, options, keywords) -> gradient of the first argument."""
    return {
        "highway_grad": lambda loss, args, **kw: hbpjax.highway_grad(loss, **kw)(*args),
        "highway_value_and_grad": lambda loss, args, **kw: hbpjax.highway_value_and_grad(loss, **kw)(*args)[1],
        "filter_grad": lambda loss, args, **kw: hbpjax.filter_grad(loss, **kw)(*args),
        "filter_value_and_grad": lambda loss, args, **kw: hbpjax.filter_value_and_grad(loss, **kw)(*args)[1],
    }


@pytest.mark.parametrize("name", sorted(_transforms()))
def test_every_transform_takes_an_options_value(name):
    """``options=Options(...)`` is the same as its fields as keywords; a keyword beside it wins."""
    loss, args = _problem()
    transform = _transforms()[name]
    with jax.enable_x64(True):
        exact = jax.grad(loss)(*args)
        by_keywords = transform(loss, args, iterations=1, gamma=0.3)
        by_value = transform(loss, args, options=hbpjax.Options(iterations=1, gamma=0.3))
        replaced = transform(loss, args, options=hbpjax.Options(iterations=1, gamma=0.3), iterations=L)
    assert_trees_close(by_value, by_keywords)
    assert tree_rel_error(by_value, exact) > 1e-4
    assert_trees_close(replaced, exact)


def test_nnx_transforms_take_an_options_value():
    model = nnx.RNN(nnx.GRUCell(2, 3, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 9, 2))
    loss = lambda model, x: jnp.mean(jnp.sin(model(x)))
    options = hbpjax.Options(iterations=0, return_report=True)
    (value, grads), report = hbpjax.nnx.value_and_grad(loss, options=options)(model, x)
    by_keywords = hbpjax.nnx.grad(loss, iterations=0)(model, x)
    grads_only, _ = hbpjax.nnx.grad(loss, options=options)(model, x)
    assert_trees_close(grads, by_keywords)
    assert_trees_close(grads_only, by_keywords)
    assert report.sweeps.tolist() == [0]


def test_options_compare_by_value_and_show_their_fields():
    a, b = hbpjax.Options(iterations=2, gamma=0.2), hbpjax.Options(gamma=0.2, iterations=2)
    assert a == b and hash(a) == hash(b) and a != hbpjax.Options(iterations=3, gamma=0.2)
    assert "iterations=2" in repr(a) and "gamma=0.2" in repr(a) and "name" not in repr(a)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: hbpjax.Options(iterations=-1), ValueError, r"hbpjax.Options: `iterations` must be >= 0"),
        (lambda: hbpjax.Options(gamma=2.0), ValueError, r"hbpjax.Options: `gamma` must be in \[0, 1\]"),
        (lambda: hbpjax.Options(2), TypeError, "positional"),
        (lambda: hbpjax.highway_grad(jnp.sum, iteratons=2), TypeError, r"hbpjax.highway_grad: unknown option 'iteratons'"),
        (lambda: hbpjax.nnx.grad(jnp.sum, options={"iterations": 2}), TypeError, r"hbpjax.nnx.grad: `options` must be an hbpjax.Options"),
        (lambda: hbpjax.filter_grad(jnp.sum, options=hbpjax.Options(), gamma=-1.0), ValueError, r"hbpjax.filter_grad: `gamma`"),
        (lambda: hbpjax.Options(recompute_layers=0), ValueError, r"hbpjax.Options: `recompute_layers` must be >= 1"),
        (lambda: hbpjax.highway_grad(jnp.sum, recompute_layers=2.0), TypeError, r"hbpjax.highway_grad: `recompute_layers` must be a positive int"),
        (lambda: hbpjax.Options(recompute_layers=True), TypeError, r"`recompute_layers` must be a positive int .* got"),
    ],
)
def test_errors_options(make, error, match):
    with pytest.raises(error, match=match):
        make()


class _Block(eqx.Module):
    """An Equinox module with the fields Equinox examples carry: an int, a bool, a function."""

    linear: eqx.nn.Linear
    drop: eqx.nn.Dropout
    num_layers: int
    act: object

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 3, key=key, dtype=jnp.float64)
        self.drop = eqx.nn.Dropout(0.1, inference=True)
        self.num_layers = 6
        self.act = jnp.tanh


def _equinox_problem():
    block = _Block(jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (4, 3), jnp.float64)

    def loss(block, x):
        def step(h, _):
            return h + block.drop(block.act(jax.vmap(block.linear)(h))), None

        return jnp.sum(jnp.sin(jax.lax.scan(step, x, None, length=block.num_layers)[0]))

    return loss, block, x


def test_agreement_on_an_equinox_module_with_int_and_bool_fields():
    """The floating-point arrays are compared, as hbpjax.filter_grad differentiates them."""
    with jax.enable_x64(True):
        loss, block, x = _equinox_problem()
        agreement = hbpjax.gradient_agreement(loss, block, x, iterations=(0, 6))
        exact = eqx.filter_grad(loss)(block, x)
        k0 = hbpjax.filter_grad(loss, iterations=0)(block, x)
    arrays = lambda tree: [a for a in jax.tree.leaves(tree) if a is not None]
    flat = lambda tree: np.concatenate([np.ravel(a) for a in arrays(tree)])
    expected = np.linalg.norm(flat(k0) - flat(exact)) / np.linalg.norm(flat(exact))
    np.testing.assert_allclose(agreement.relative_error, [expected, 0.0], atol=1e-12)
    np.testing.assert_allclose(agreement.exact_norm, np.linalg.norm(flat(exact)))


def test_agreement_takes_an_options_value():
    loss, args = _problem()
    with jax.enable_x64(True):
        exact = jax.grad(loss)(*args)
        k1 = hbpjax.highway_grad(loss, iterations=1, gamma=0.5)(*args)
        agreement = hbpjax.gradient_agreement(loss, *args, iterations=1, options=hbpjax.Options(gamma=0.5))
    np.testing.assert_allclose(agreement.relative_error[0], tree_rel_error(k1, exact), rtol=1e-9)


def test_adaptive_iterations_on_an_equinox_module():
    with jax.enable_x64(True):
        loss, block, x = _equinox_problem()
        controller = hbpjax.AdaptiveIterations(target=0.999999, every=1, k_init=0)
        step = controller.value_and_grad(loss)
        (value, grads), state = step(controller.init(), block, x)
        exact = eqx.filter_grad(loss)(block, x)
        k0 = hbpjax.filter_grad(loss, iterations=0)(block, x)
    assert grads.num_layers is None and grads.act is None
    assert_trees_close(grads.linear, k0.linear)
    arrays = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree) if a is not None])
    cosine = arrays(k0) @ arrays(exact) / np.linalg.norm(arrays(k0)) / np.linalg.norm(arrays(exact))
    np.testing.assert_allclose(float(state.cosine), cosine, rtol=1e-5)
    assert int(state.k) == 1
