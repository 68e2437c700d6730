"""``highway_grad`` / ``highway_value_and_grad`` behave like ``jax.grad`` / ``jax.value_and_grad``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbpjax
from helpers import assert_trees_close, gru_stack, mlp_stack, source_file, tree_rel_error


def _mlp32():
    return mlp_stack(jax.random.key(0), dtype=jnp.float32, L=6)


def test_without_residual_scan_is_exactly_jax_grad():
    def loss(x, y):
        return jnp.sum(jnp.sin(x) * y) + jnp.sum(jax.lax.scan(lambda c, a: (c * a, c), 1.0, x)[1])

    x, y = jnp.linspace(0.1, 1.0, 5), jnp.arange(5.0)
    # scans="marked": the scan (a linear diagonal recurrence) is left to JAX, and the user is told.
    with pytest.warns(hbpjax.NoStackWarning, match=r"hbpjax.highway_value_and_grad: found no residual stack"):
        got = hbpjax.highway_value_and_grad(loss, (0, 1), iterations=0, scans="marked")(x, y)
    expected = jax.value_and_grad(loss, (0, 1))(x, y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    # scans="auto" converts it; J = 0 for c * a, so even k = 0 is exact.
    assert_trees_close(hbpjax.highway_value_and_grad(loss, (0, 1), iterations=0)(x, y), expected)


@pytest.mark.parametrize("argnums", [0, 1, 3, -1, (0, 3), (3, 0, 2)])
def test_argnums_structure_matches_jax(argnums):
    loss, args = _mlp32()
    got = hbpjax.highway_grad(loss, argnums, iterations=6)(*args)
    expected = jax.grad(loss, argnums)(*args)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    assert_trees_close(got, expected, rtol=2e-4, atol=1e-5)


def test_allow_int_gives_float0_like_jax():
    def loss(x, n):
        h, _ = hbpjax.residual_scan(lambda h, _: jnp.tanh(h) * n, x, length=3)
        return jnp.sum(h)

    x, n = jnp.ones(3), jnp.int32(2)
    g = hbpjax.highway_grad(loss, (0, 1), allow_int=True, iterations=3)(x, n)
    e = jax.grad(loss, (0, 1), allow_int=True)(x, n)
    assert g[1].dtype == e[1].dtype == jax.dtypes.float0
    np.testing.assert_allclose(g[0], e[0], rtol=1e-6)


def test_int_and_key_inputs_in_xs_get_no_gradient():
    """Per-layer integer indices and PRNG keys travel through ``xs`` (dropout keys, token ids)."""

    def loss(W, tokens, keys):
        emb = jnp.eye(4)

        def block(h, x):
            w, tok, key = x
            mask = jax.random.bernoulli(key, 0.9, h.shape)
            return jnp.where(mask, jnp.tanh(h @ w + emb[tok]), 0.0)

        h, _ = hbpjax.residual_scan(block, jnp.ones(4), (W, tokens, keys))
        return jnp.sum(h**2)

    L = 5
    W = 0.3 * jax.random.normal(jax.random.key(0), (L, 4, 4))
    tokens = jnp.arange(L) % 4
    keys = jax.random.split(jax.random.key(1), L)
    g = jax.jit(hbpjax.highway_grad(loss, iterations=L))(W, tokens, keys)
    assert_trees_close(g, jax.grad(loss)(W, tokens, keys), rtol=1e-5)


def test_jit_equals_eager_and_does_not_recompile():
    loss, args = _mlp32()
    traces = []

    def counted(*args):
        traces.append(None)
        return loss(*args)

    step = jax.jit(hbpjax.highway_value_and_grad(counted, (0, 1), iterations=2))
    first = step(*args)
    second = step(*args)
    assert len(traces) == 1
    assert_trees_close(first, second)
    assert_trees_close(first, hbpjax.highway_value_and_grad(loss, (0, 1), iterations=2)(*args), rtol=1e-5)






def test_vmap_per_example_gradients():
    loss, (params, xs, h0) = gru_stack(jax.random.key(1), dtype=jnp.float32, T=6, batch=5)

    def per_example(params, x, h):  # one sequence: x (T, d_in), h (d,)
        return loss(params, x[:, None], h[None])

    def per_example_grads(grad_fn):
        return jax.jit(jax.vmap(grad_fn, in_axes=(None, 1, 0)))(params, xs, h0)

    vmapped = per_example_grads(hbpjax.highway_grad(per_example, iterations=1))
    single = jax.jit(hbpjax.highway_grad(per_example, iterations=1))
    for i in range(h0.shape[0]):
        assert_trees_close(jax.tree.map(lambda a: a[i], vmapped), single(params, xs[:, i], h0[i]), rtol=1e-5, atol=1e-6)
    exact = per_example_grads(jax.grad(per_example))
    assert tree_rel_error(vmapped, exact) > 1e-4  # k=1 is an approximation here ...
    full = per_example_grads(hbpjax.highway_grad(per_example, iterations=6))
    assert_trees_close(full, exact, rtol=1e-4, atol=1e-6)  # ... and k >= T is exact


def _contractive_problem(L=16, seed=2, d=4):
    """A float64 residual stack whose sweeps shrink the change ~10x each: ``(loss, W, h0)``.
    Call it under ``jax.enable_x64(True)``."""
    W = (0.1 / np.sqrt(d)) * jax.random.normal(jax.random.key(seed), (L, d, d), jnp.float64)
    h0 = jnp.ones(d, jnp.float64)

    def loss(W, h0):
        _, hs = hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), h0, W)
        return jnp.sum(jnp.cos(hs))

    return loss, W, h0


def test_tol_stops_early_on_a_contractive_stack():
    """Each sweep shrinks the change ~10x; tol=1e-4 stops after a few sweeps, well under the cap."""
    with jax.enable_x64(True):
        L = 16
        loss, W, h0 = _contractive_problem(L)

        def grad(**kw):
            return jax.jit(hbpjax.highway_grad(loss, **kw))(W, h0)

        fixed = [grad(iterations=k) for k in range(7)]
        tol = grad(iterations=L, tol=1e-4)
        stopped = [k for k, g in enumerate(fixed) if tree_rel_error(tol, g) < 1e-14]
        assert stopped and 1 <= stopped[0] <= 5, stopped
        assert tree_rel_error(tol, grad(iterations=L)) > 1e-9  # it did not run to the cap
        # A cap below the stopping point wins.
        assert tree_rel_error(grad(iterations=1, tol=1e-12), fixed[1]) < 1e-14
        # Eager and vmapped (each example stops on its own) agree with the jitted result.
        assert tree_rel_error(hbpjax.highway_grad(loss, iterations=L, tol=1e-4)(W, h0), tol) < 1e-12
        batched = jax.vmap(hbpjax.highway_grad(loss, iterations=L, tol=1e-4), in_axes=(None, 0))(
            W, jnp.stack([h0, 2 * h0])
        )
        assert tree_rel_error(batched[0], tol) < 1e-12


# ----------------------------------------------------------------------------------- errors


def _simple_loss(x):
    h, _ = hbpjax.residual_scan(lambda h, _: jnp.tanh(h), x, length=3)
    return jnp.sum(h)


@pytest.mark.parametrize("transform", [hbpjax.highway_grad, hbpjax.highway_value_and_grad])
def test_errors_non_scalar_output(transform):
    name = transform.__name__
    with pytest.raises(TypeError, match=rf"hbpjax.{name}: .*scalar.*shape \(3,\)"):
        transform(lambda x: x * 2)(jnp.ones(3))
    with pytest.raises(TypeError, match=rf"hbpjax.{name}: .*pair \(value, aux\)"):
        transform(lambda x: jnp.sum(x), has_aux=True)(jnp.ones(3))
    with pytest.raises(TypeError, match=rf"hbpjax.{name}: .*real floating-point output.*int32"):
        transform(lambda x: jnp.sum(x).astype(jnp.int32))(jnp.ones(3))


def test_errors_argnums():
    with pytest.raises(TypeError, match=r"hbpjax.highway_grad: differentiating with respect to argnums=2 .*3 positional"):
        hbpjax.highway_grad(lambda x, y: jnp.sum(x), argnums=2)(jnp.ones(2), jnp.ones(2))
    with pytest.raises(TypeError, match=r"hbpjax.highway_grad: `argnums` must be an int.*'a'"):
        hbpjax.highway_grad(_simple_loss, argnums="a")
    with pytest.raises(ValueError, match=r"must not repeat.*\(0, 0\)"):
        hbpjax.highway_grad(_simple_loss, argnums=(0, 0))
    with pytest.raises(TypeError, match=r"`fun` must be callable"):
        hbpjax.highway_grad(3)


def test_errors_integer_input_without_allow_int():
    with pytest.raises(TypeError, match=r"hbpjax.highway_value_and_grad: argument 0 .*int32.*allow_int=True"):
        hbpjax.highway_value_and_grad(lambda x: jnp.sum(x * 1.0))(jnp.arange(3, dtype=jnp.int32))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(iterations=-1), ValueError, r"`iterations` must be >= 0.*got -1"),
        (dict(iterations=1.5), TypeError, r"`iterations` must be a non-negative int.*1.5.*float"),
        (dict(iterations=True), TypeError, r"`iterations` must be a non-negative int.*True"),
        (dict(iterations="3"), TypeError, r"`iterations` must be a non-negative int.*'3'"),
        (dict(iterations=4, tol=0.0), ValueError, r"`tol` must be > 0.*got 0.0"),
        (dict(iterations=4, tol=-1e-3), ValueError, r"`tol` must be > 0"),
        (dict(iterations=4, tol="small"), TypeError, r"`tol` must be a positive float"),
        (dict(iterations=None, tol=1e-3), ValueError, r".*needs a cap.*iterations"),
    ],
)
def test_errors_bad_settings(kwargs, error, match):
    for transform in (hbpjax.highway_grad, hbpjax.highway_value_and_grad):
        with pytest.raises(error, match=rf"hbpjax.{transform.__name__}: " + match):
            transform(_simple_loss, **kwargs)


def test_numpy_integer_iterations_accepted():
    g = hbpjax.highway_grad(_simple_loss, iterations=np.int64(3))(jnp.ones(2))
    np.testing.assert_allclose(g, jax.grad(_simple_loss)(jnp.ones(2)), rtol=1e-6)


# ----------------------------------------------------------- compositions that used to fail


def test_collective_over_a_named_vmap_axis_in_the_block():
    """lax.pmean over a vmap axis named inside the loss (BatchNorm(axis_name=...) does this)."""
    with jax.enable_x64(True):
        W = 0.4 * jax.random.normal(jax.random.key(20), (6, 3, 3), jnp.float64)
        xs = jax.random.normal(jax.random.key(21), (4, 3), jnp.float64)

        def loss(W, xs):
            def one(x):
                def block(h, w):
                    z = jnp.tanh(h @ w)
                    return z - jax.lax.pmean(z, "batch")

                h, _ = hbpjax.residual_scan(block, x, W)
                return jnp.sum(h**2)

            return jnp.sum(jax.vmap(one, axis_name="batch")(xs))

        for k in (0, 6):
            got = hbpjax.highway_grad(loss, (0, 1), iterations=k)(W, xs)
            if k == 6:
                assert_trees_close(got, jax.grad(loss, (0, 1))(W, xs))


def test_linen_batch_norm_with_axis_name_under_vmap():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h):
            return 0.5 * jnp.tanh(nn.BatchNorm(use_running_average=False, axis_name="batch")(nn.Dense(3)(h)))

    model = hbpjax.linen.ResidualStack(Block, num_layers=4)
    x = jax.random.normal(jax.random.key(22), (5, 3))
    variables = jax.vmap(lambda x: model.init(jax.random.key(0), x), axis_name="batch")(x)
    variables = jax.tree.map(lambda a: a[0], variables)

    def loss(params, x):
        def one(x):
            out, _ = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(out**2)

        return jnp.sum(jax.vmap(one, axis_name="batch")(x))

    exact = jax.grad(loss)(variables["params"], x)
    assert_trees_close(hbpjax.highway_grad(loss, iterations=4)(variables["params"], x), exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["jvp", "linearize", "jacfwd"])
def test_forward_mode_inside_the_loss(mode):
    """jax.jvp / linearize / jacfwd of a function holding a residual_scan, inside a highway loss."""
    with jax.enable_x64(True):
        W = 0.4 * jax.random.normal(jax.random.key(23), (6, 3, 3), jnp.float64)
        x = jax.random.normal(jax.random.key(24), (3,), jnp.float64)

        def f(W, x):
            h, _ = hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), x, W)
            return h

        def loss(W, x):
            direction = jnp.ones_like(x)
            if mode == "jvp":
                tangent = jax.jvp(lambda x: f(W, x), (x,), (direction,))[1]
            elif mode == "linearize":
                tangent = jax.linearize(lambda x: f(W, x), x)[1](direction)
            else:
                tangent = jax.jacfwd(lambda x: f(W, x))(x) @ direction
            return jnp.sum(tangent**2) + jnp.sum(f(W, x))

        exact = jax.grad(loss, (0, 1))(W, x)
        assert_trees_close(hbpjax.highway_grad(loss, (0, 1), iterations=6)(W, x), exact)
        assert tree_rel_error(hbpjax.highway_grad(loss, (0, 1), iterations=0)(W, x), exact) > 1e-6


def test_gradient_of_a_tol_mode_gradient():
    """A gradient penalty over a tol-mode highway gradient: jax.grad of it works (it was a
    while_loop), and equals the same penalty with the number of sweeps tol stopped at."""
    with jax.enable_x64(True):
        L = 12
        loss, W, h0 = _contractive_problem(L, seed=25)

        def penalty(W, **options):
            return jnp.sum(hbpjax.highway_grad(loss, **options)(W, h0) ** 2)

        tol = hbpjax.highway_grad(loss, iterations=L, tol=1e-4)(W, h0)
        grad_at = jax.jit(lambda k: hbpjax.highway_grad(loss, iterations=k)(W, h0))  # k traced: one compilation
        stopped = next(k for k in range(L) if tree_rel_error(tol, grad_at(k)) < 1e-14)
        got = jax.grad(functools.partial(penalty, iterations=L, tol=1e-4))(W)
        assert_trees_close(got, jax.grad(functools.partial(penalty, iterations=stopped))(W))


def test_iterations_traced_under_jit_one_compilation():
    """A k schedule: iterations is a traced integer, k changes between calls, one compilation."""
    loss, args = _mlp32()
    traces = []

    @jax.jit
    def step(k, *args):
        traces.append(None)
        return hbpjax.highway_grad(loss, iterations=k)(*args)

    for k in (0, 2, 6, -1):
        assert_trees_close(step(jnp.int32(k), *args), hbpjax.highway_grad(loss, iterations=max(k, 0))(*args), rtol=1e-5, atol=1e-6)
    assert len(traces) == 1


def test_settings_given_as_concrete_jax_values():
    loss, args = _mlp32()
    expected = hbpjax.highway_grad(loss, iterations=3, tol=1e-3, gamma=0.2)(*args)
    got = hbpjax.highway_grad(loss, iterations=jnp.int32(3), tol=jnp.float32(1e-3), gamma=jnp.float32(0.2))(*args)
    assert_trees_close(got, expected)


@pytest.mark.parametrize("name", ["tol", "gamma"])
def test_errors_traced_tol_or_gamma_say_how_to_make_them_static(name):
    loss, args = _mlp32()

    @jax.jit
    def step(value, *args):
        options = {"iterations": 2, name: value}
        return hbpjax.highway_grad(loss, **options)(*args)

    with pytest.raises(TypeError, match=rf"hbpjax.highway_grad: `{name}` must be known when the function is traced.*static_argnums"):
        step(jnp.float32(0.1), *args)


def test_errors_traced_iterations_must_be_an_integer_scalar():
    loss, args = _mlp32()
    with pytest.raises(TypeError, match=r"hbpjax.highway_grad: a traced `iterations` must be an integer scalar.*float32"):
        jax.jit(lambda k, *a: hbpjax.highway_grad(loss, iterations=k)(*a))(jnp.float32(2.0), *args)


def test_holomorphic():
    with jax.enable_x64(True):
        L = 6
        W = (0.3 + 0.2j) * jax.random.normal(jax.random.key(26), (L, 3, 3), jnp.float64)
        h0 = jnp.ones(3, jnp.complex128)

        def loss(W, h0):
            h, hs = hbpjax.residual_scan(lambda h, w: jnp.tanh(h @ w), h0, W)
            return jnp.sum(jnp.sin(hs)) + jnp.sum(h**2)

        exact = jax.grad(loss, (0, 1), holomorphic=True)(W, h0)
        assert_trees_close(hbpjax.highway_grad(loss, (0, 1), holomorphic=True, iterations=L)(W, h0), exact)
        approx = hbpjax.highway_grad(loss, (0, 1), holomorphic=True, iterations=0)(W, h0)
        assert tree_rel_error(jax.tree.map(jnp.abs, approx), jax.tree.map(jnp.abs, exact)) > 1e-6


def test_holomorphic_block_with_complex_intermediates():
    """A complex block whose linearization stores intermediate values (not only its output):
    ``jax.checkpoint`` cannot round complex values, so such blocks are linearized whole."""
    with jax.enable_x64(True):
        L = 5
        W = (0.3 - 0.1j) * jax.random.normal(jax.random.key(27), (L, 3, 3), jnp.float64)
        h0 = jnp.full(3, 0.5 + 0.5j, jnp.complex128)

        def loss(W, h0):
            block = lambda h, w: (1.0 - jnp.tanh(h @ w)) * jnp.sin(h)
            h, hs = hbpjax.residual_scan(block, h0, W)
            return jnp.sum(hs**2) + jnp.sum(h)

        exact = jax.grad(loss, (0, 1), holomorphic=True)(W, h0)
        for k in (1, L):
            got = hbpjax.highway_grad(loss, (0, 1), holomorphic=True, iterations=k)(W, h0)
            if k == L:
                assert_trees_close(got, exact)


# ------------------------------------------------------------------------------ sweep report


def _two_stacks_loss():
    W = 0.3 * jax.random.normal(jax.random.key(50), (9, 3, 3))
    x = jax.random.normal(jax.random.key(51), (2, 3))

    def loss(W, x):
        h, hs = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), h), x, W)  # L = 9
        g, _ = hbpjax.residual_scan(lambda g, w: jnp.tanh(g @ w), h, W[:4])  # L = 4
        return jnp.sum(g**2) + jnp.sum(jnp.sin(hs))

    return loss, (W, x)


def test_report_lists_each_stack_in_program_order():
    loss, args = _two_stacks_loss()
    (value, grads), report = jax.jit(hbpjax.highway_value_and_grad(loss, (0, 1), iterations=5, return_report=True))(*args)
    assert_trees_close((value, grads), hbpjax.highway_value_and_grad(loss, (0, 1), iterations=5)(*args))
    assert report.sweeps.tolist() == [5, 3]  # the second stack has 4 layers: 3 sweeps are exact
    assert [source_file(s) for s in report.sources] == [__file__] * 2
    assert int(report.sources[0].split(":")[1]) < int(report.sources[1].split(":")[1])
    assert bool(jnp.all(report.change > 0)) and "sweeps" in str(report)
    g, report0 = hbpjax.highway_grad(loss, iterations=0, return_report=True)(*args)
    assert report0.sweeps.tolist() == [0, 0] and bool(jnp.all(jnp.isnan(report0.change)))


def test_report_says_where_tol_stopped():
    """The reported sweeps are those tol stopped at: the same gradient as that fixed k, and the
    last change is <= tol (while one sweep fewer still changed more)."""
    with jax.enable_x64(True):
        L = 16
        loss, W, h0 = _contractive_problem(L)

        g, report = hbpjax.highway_grad(loss, iterations=L, tol=1e-4, return_report=True)(W, h0)
        (k,) = report.sweeps.tolist()
        assert 1 <= k < L - 1 and float(report.change[0]) <= 1e-4
        assert tree_rel_error(g, hbpjax.highway_grad(loss, iterations=k)(W, h0)) < 1e-14
        _, before = hbpjax.highway_grad(loss, iterations=k - 1, return_report=True)(W, h0)
        assert k == 1 or float(before.change[0]) > 1e-4


def test_report_with_a_traced_k_and_under_vmap():
    loss, args = _two_stacks_loss()
    step = jax.jit(lambda k, *a: hbpjax.highway_grad(loss, iterations=k, return_report=True)(*a)[1])
    assert step(jnp.int32(-3), *args).sweeps.tolist() == [0, 0]  # a negative k counts as 0
    assert step(jnp.int32(2), *args).sweeps.tolist() == [2, 2]
    batched = jax.vmap(lambda x: hbpjax.highway_grad(loss, iterations=2, return_report=True)(args[0], x)[1])
    assert batched(jnp.stack([args[1]] * 3)).sweeps.shape == (3, 2)


def test_report_empty_when_nothing_is_converted():
    with pytest.warns(hbpjax.NoStackWarning):
        g, report = hbpjax.highway_grad(lambda x: jnp.sum(jnp.sin(x)), return_report=True)(jnp.ones(3))
    assert report.sweeps.shape == (0,) and str(report) == "no converted stack"


def test_report_from_the_nnx_transforms():
    from flax import nnx

    model = nnx.RNN(nnx.GRUCell(2, 4, rngs=nnx.Rngs(0)))
    x = jnp.ones((3, 10, 2))
    loss = lambda m, x: jnp.mean(m(x) ** 2)
    (value, grads), report = hbpjax.nnx.value_and_grad(loss, iterations=2, return_report=True)(model, x)
    expected = hbpjax.nnx.value_and_grad(loss, iterations=2)(nnx.clone(model), x)
    assert_trees_close((value, grads), expected)
    assert report.sweeps.tolist() == [2]
    grads, report = nnx.jit(hbpjax.nnx.grad(loss, iterations=4, return_report=True))(model, x)
    assert report.sweeps.tolist() == [4]
