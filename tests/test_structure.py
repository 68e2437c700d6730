"""The properties the method exists for, read off the jaxpr of the gradient.

- The highway backward holds no sequential loop over the L layers: the only length-L loop in the
  whole gradient is the forward scan (``jax.grad`` has two: forward and backward).
- Each layer is linearized once per backward: the block's nonlinearities appear twice (forward scan
  and one parallel linearization), however many sweeps run.
- Shared (closed-over) weights get one summed gradient: no ``(T, *W.shape)`` array of per-step
  weight gradients is ever materialised.
- An RNN cell's matmuls of the per-step input run for all steps before the forward loop; the loop
  keeps the carry's.
- k = 0 runs no more matmuls than backprop, on a remat'd ``nnx.scan`` Transformer as on a plain one:
  the per-step outputs ``nnx.scan`` returns (the layer's state) cost no VJP of their own.
- The prefix scan of ``h + z`` (K = 1) is an associative scan, never ``lax.cumsum`` (a
  reduce-window with O(L^2) adds per element on a CPU).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hbpjax
from helpers import count, equations, gru_stack, loops, lstm_stack, matmul_flops, mlp_stack, scan_bodies, two_stacks

T = 11  # distinct from every other dimension and from the sweep counts used below


def _shapes(closed_jaxpr):
    return {tuple(getattr(v.aval, "shape", ())) for eqn in equations(closed_jaxpr) for v in eqn.outvars}


MODELS = {
    "mlp": lambda: mlp_stack(jax.random.key(0), dtype=jnp.float32, L=T),
    "gru": lambda: gru_stack(jax.random.key(1), dtype=jnp.float32, T=T),
    "lstm": lambda: lstm_stack(jax.random.key(2), dtype=jnp.float32, T=T),
}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("iterations", [0, 3])
def test_backward_has_no_loop_over_layers(model, iterations):
    loss, args = MODELS[model]()
    argnums = tuple(range(len(args)))
    exact = loops(jax.make_jaxpr(jax.grad(loss, argnums))(*args))
    assert exact.count(("scan", T)) == 2  # the detector sees backprop's backward loop
    highway = loops(jax.make_jaxpr(hbpjax.highway_grad(loss, argnums, iterations=iterations))(*args))
    # The forward, nothing else: a few sweeps are straight-line code.
    assert highway == [("scan", T)], highway


def test_many_sweeps_loop_over_sweeps_only(monkeypatch):
    """Past STRAIGHT_LINE_SWEEPS the sweeps are a loop of length k, and still none over layers."""
    monkeypatch.setattr("hbpjax._backward.sweeps.STRAIGHT_LINE_SWEEPS", 2)
    loss, args = MODELS["gru"]()
    highway = loops(jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=3))(*args))
    assert sorted(highway) == [("scan", 3), ("scan", T)], highway


def test_unrolled_linearization_has_no_loop_in_the_backward():
    loss, args = gru_stack(jax.random.key(1), dtype=jnp.float32, T=T, linearize="unroll")
    highway = loops(jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=3))(*args))
    assert highway == [("scan", T)]  # the forward; layers and sweeps are straight-line code


@pytest.mark.parametrize("iterations", [0, 2])
def test_additive_stack_scans_by_associative_scan(iterations):
    """``h + z`` (K = 1): the prefix scan is a reverse cumulative sum, taken as an associative scan.
    ``lax.cumsum`` lowers to a reduce-window with O(L^2) adds per element on a CPU."""
    loss, args = mlp_stack(jax.random.key(0), dtype=jnp.float32, L=T, loss_on="all")
    jaxpr = jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=iterations))(*args)
    assert count(jaxpr, "cumsum") == 0
    assert loops(jaxpr) == [("scan", T)]


def test_tol_mode_loops_over_sweeps_only(monkeypatch):
    monkeypatch.setattr("hbpjax._backward.sweeps.STRAIGHT_LINE_SWEEPS", 2)
    loss, args = MODELS["gru"]()
    highway = loops(jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=5, tol=1e-3))(*args))
    assert highway.count(("scan", T)) == 1
    # The sweep loop: 5 steps that skip the sweep once converged (a scan, so it can be
    # differentiated again); its body holds no scan.
    assert highway.count(("scan", 5)) == 1
    assert len(highway) == 2
    # Written out (5 sweeps are few): no loop but the forward.
    monkeypatch.setattr("hbpjax._backward.sweeps.STRAIGHT_LINE_SWEEPS", 16)
    highway = loops(jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=5, tol=1e-3))(*args))
    assert highway == [("scan", T)], highway


def test_traced_iterations_loop_over_sweeps_only():
    loss, args = MODELS["gru"]()
    jaxpr = jax.make_jaxpr(lambda k, *a: hbpjax.highway_grad(loss, iterations=k)(*a))(jnp.int32(3), *args)
    assert sorted(loops(jaxpr), key=str) == [("scan", T), ("while", None)]  # forward; sweeps


def test_two_stacks_each_have_one_forward_loop():
    loss, args = two_stacks(jax.random.key(3), dtype=jnp.float32)
    highway = loops(jax.make_jaxpr(hbpjax.highway_grad(loss, (0, 1, 2), iterations=2))(*args))
    assert sorted(n for kind, n in highway if kind == "scan") == [5, 6]  # the sweeps are written out


@pytest.mark.parametrize("iterations", [0, 1, 4])
def test_each_layer_linearized_once(iterations):
    """The GRU cell has one tanh and one sigmoid, evaluated once per step, any k: the forward scan
    keeps the linearization from its own evaluation (not a second copy of the cell beside it), and
    the backward evaluates no cell again."""
    loss, args = MODELS["gru"]()
    jaxpr = jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=iterations))(*args)
    assert count(jaxpr, "tanh") == 1
    assert count(jaxpr, "logistic") == 1


@pytest.mark.parametrize("model, carry_matmuls, all_matmuls", [("gru", 2, 4), ("lstm", 1, 2)])
def test_input_matmuls_run_before_the_forward_loop(model, carry_matmuls, all_matmuls):
    """The cells' matmuls of the per-step input (``x @ W``, independent of the carry) run once over
    all steps before the forward scan; its body holds only the carry's. Backprop's forward scan
    holds them all (the control: the counter sees them)."""
    loss, args = MODELS[model]()
    exact = [count(body, "dot_general") for body in scan_bodies(jax.make_jaxpr(jax.grad(loss))(*args))]
    assert all_matmuls in exact, exact
    (forward,) = scan_bodies(jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=2))(*args))
    assert count(forward, "dot_general") == carry_matmuls


def test_flax_gru_input_matmul_runs_before_the_forward_loop():
    """The same on Flax's own ``nnx.RNN(nnx.GRUCell)``, unchanged: ``dense_i(x)`` runs once over all
    steps, the forward scan body keeps ``dense_h(h)`` alone (``nnx.grad``'s forward keeps both)."""
    model = nnx.RNN(nnx.GRUCell(3, 5, rngs=nnx.Rngs(0)))
    xs = jax.random.normal(jax.random.key(5), (2, T, 3))
    loss = lambda m, xs: jnp.sum(m(xs, initial_carry=jnp.zeros((2, 5))) ** 2)
    graphdef, state = nnx.split(model)
    traced = lambda grad: jax.make_jaxpr(lambda state: grad(loss)(nnx.merge(graphdef, state), xs))(state)
    exact = [count(body, "dot_general") for body in scan_bodies(traced(nnx.grad))]
    assert 2 in exact, exact
    (forward,) = scan_bodies(traced(lambda f: hbpjax.nnx.grad(f, iterations=2)))
    assert count(forward, "dot_general") == 1


def test_shared_weights_never_stacked_per_step():
    loss, (params, xs, h0) = gru_stack(jax.random.key(4), dtype=jnp.float32, T=T, d=5, d_in=3, batch=2)
    per_step_stacks = {(T,) + w.shape for w in jax.tree.leaves(params)}
    jaxpr = jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=3))(params, xs, h0)
    assert not per_step_stacks & _shapes(jaxpr)

    # Control: per-step weight gradients (what a naive vmap over time computes) are detected.
    def one_step(params, x, h):
        return loss(params, x[None], h)

    naive = jax.make_jaxpr(jax.vmap(jax.grad(one_step), in_axes=(None, 0, None)))(params, xs, h0)
    assert per_step_stacks & _shapes(naive)


def test_save_linearization_false_loops_over_groups_of_layers_only():
    """Recomputing the linearization runs 8 groups of L/8 layers one after the other (lax.map):
    a loop of 8, not of L."""
    loss, args = mlp_stack(jax.random.key(0), dtype=jnp.float32, L=16)
    found = loops(jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=2, save_linearization=False))(*args))
    assert found.count(("scan", 16)) == 1 and set(found) <= {("scan", 16), ("scan", 2), ("scan", 8)}, found


def test_linearization_read_by_several_vjps_stores_only_costly_values():
    """What the sweeps keep of a GRU cell's linearization: its gate values u and c (sigmoid, tanh),
    not also u (1 - u) and 1 - c**2, which each VJP recomputes from them (lean's policy)."""
    from hbpjax._backward.linearize import lean

    def cell(h, x, W):
        u = jax.nn.sigmoid(x @ W[0] + h @ W[1])
        c = jnp.tanh(x @ W[2] + h @ W[3])
        return (1.0 - u, u * c), ()

    h, x = jnp.ones((T, 3, 4)), jnp.ones((T, 3, 2))
    W = [jnp.ones((2, 4)), jnp.ones((4, 4)), jnp.ones((2, 4)), jnp.ones((4, 4))]

    def stored(block):
        _, vjp = jax.vjp(jax.vmap(block, in_axes=(0, 0, None)), h, x, W)
        return sum(a.shape == h.shape for a in jax.tree.leaves(vjp)) - 1  # not h itself

    assert stored(cell) == 4  # control: JAX's own rules keep both derivatives too
    assert stored(lean(cell)) == 2


@pytest.mark.parametrize("dtype, rounded", [(jnp.float32, False), (jnp.bfloat16, True)])
def test_stored_values_are_not_rounded_to_their_own_precision(dtype, rounded):
    """jax.checkpoint rounds each value it stores to its own dtype's precision (reduce_precision),
    which newer XLA keeps as a second copy of the value. The sweeps' linearization drops the
    rounding where it changes nothing (float32, float64) and keeps it elsewhere (bfloat16), with
    the same VJP as jax.vjp's."""
    from hbpjax._backward.linearize import lean, vjp_unrounded

    def cell(h, x, W):
        u = jax.nn.sigmoid(x @ W[0] + h @ W[1])
        return (1.0 - u, u * jnp.tanh(h @ W[2])), ()

    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    h, x = jax.random.normal(keys[0], (T, 3, 4), dtype), jax.random.normal(keys[1], (T, 3, 2), dtype)
    W = [jax.random.normal(k, s, dtype) for k, s in zip(keys[2:], [(2, 4), (4, 4), (4, 4)])]
    blocks = jax.vmap(lean(cell), in_axes=(0, 0, None))
    ct = ((jnp.ones_like(h), jnp.ones_like(h)), ())

    def grads(vjp):
        out, fun = vjp(blocks, h, x, W)
        return out, fun(ct)

    assert "reduce_precision" in str(jax.make_jaxpr(lambda: grads(jax.vjp))())  # control
    assert ("reduce_precision" in str(jax.make_jaxpr(lambda: grads(vjp_unrounded))())) == rounded
    for ours, theirs in zip(jax.tree.leaves(grads(vjp_unrounded)), jax.tree.leaves(grads(jax.vjp))):
        np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))


@pytest.mark.parametrize("linearize", ["vmap", "unroll"])
def test_highway_backward_keeps_no_rounded_copies(linearize):
    """Both ways of linearizing the layers read the stored values unrounded (float32)."""
    loss, args = gru_stack(jax.random.key(0), dtype=jnp.float32, linearize=linearize)
    assert "reduce_precision" in str(jax.make_jaxpr(jax.grad(jax.checkpoint(loss, policy=_everything)))(*args))
    assert "reduce_precision" not in str(jax.make_jaxpr(hbpjax.highway_grad(loss, iterations=2))(*args))


def _everything(prim, *avals, **params):
    return True


@pytest.mark.parametrize("remat", [False, True, jax.checkpoint_policies.dots_saveable], ids=["no remat", "remat", "dots_saveable"])
def test_k0_runs_no_more_matmuls_than_backprop(remat):
    """``nnx.scan`` returns every layer's state as a per-step output; its cotangent reaches the
    layer's parameters only, never the carry, so k = 0 is one forward and one VJP of every layer,
    as backprop is (with remat: one recomputation of every layer, as backprop's; with
    ``dots_saveable``, none of the matmuls the forward saved).

    Counted on the compiled programs, where every matmul runs once per layer (in a loop over the
    layers or batched over them): without remat, also on the jaxpr (a remat'd VJP's jaxpr holds a
    primal forward of the checkpoint that nothing reads, which XLA removes)."""
    from hbpjax.examples.models import ScannedGPT

    layers = 3
    model = ScannedGPT(11, dim=16, heads=2, layers=layers, max_len=8, remat=remat, rngs=nnx.Rngs(0))
    tokens = jnp.arange(16).reshape(2, 8) % 11
    loss = lambda m, x: jnp.mean(m(x) ** 2)
    grads = {"exact": nnx.grad(loss), "highway": hbpjax.nnx.grad(loss, iterations=0, gamma=0.2)}
    hlo = {name: jax.jit(g).lower(model, tokens).compile().as_text() for name, g in grads.items()}
    trips = {name: set(re.findall(r'known_trip_count":{"n":"(\d+)"', text)) for name, text in hlo.items()}
    assert trips["highway"] == trips["exact"] == {str(layers)}, trips
    assert hlo["highway"].count(" dot(") <= hlo["exact"].count(" dot("), {n: t.count(" dot(") for n, t in hlo.items()}
    if remat is False:
        flops = {name: matmul_flops(jax.make_jaxpr(g)(model, tokens)) for name, g in grads.items()}
        assert flops["highway"] <= flops["exact"], flops
