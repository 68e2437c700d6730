"""Stacks nested in stacks, each found once and evaluated from the one plan.

Every case is checked three ways: what ``find_stacks`` lists (each stack once, the nested ones
after the stack whose block holds them), the gradient against ``jax.grad`` in float64 (``k`` at or
above every stack's length is exact; ``k = 0`` differs, since the stacks are converted), and the
sweep report (one row per stack that is not nested). The shapes are the ones real models have: a
Python loop of blocks that each run a scan over time (every stacked state-space or RNN model,
here with Flax's own ``nnx.RNN(nnx.GRUCell)`` too), a scan whose step holds a Python loop of
residual blocks, and three levels under ``jit``, ``jax.checkpoint`` and ``cond``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hbpjax
from hbpjax._analysis import planner
from helpers import assert_trees_close, fixture_over_cases, model_grad, tree_rel_error


@dataclasses.dataclass
class Case:
    loss: object
    args: tuple
    rows: list  # (kind, length, converted, nested) per find_stacks row, in order
    depth: int  # the longest stack: k >= depth is exact
    module: bool = False


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float64)


def case_loop_of_blocks_each_with_a_scan():
    """``for p in layers: x = x + ssm(x)``, the SSM a residual ``lax.scan`` over time."""
    keys = jax.random.split(jax.random.key(0), 4)
    layers = [dict(u=_normal(k, (3, 3), 0.4), v=_normal(jax.random.fold_in(k, 1), (3, 3), 0.4)) for k in keys]
    x = _normal(jax.random.key(1), (6, 3))

    def ssm(x, p):
        def step(s, x_t):
            s = s + jnp.tanh(s @ p["u"] + x_t)
            return s, s @ p["v"]

        return jax.lax.scan(step, jnp.zeros(3), x)[1]

    def loss(layers, x):
        for p in layers:
            x = x + ssm(x, p)
        return jnp.sum(jnp.sin(x))

    return Case(loss, (layers, x), [("chain", 4, True, False), ("scan", 6, True, True)], depth=6)


def case_stacked_flax_rnns():
    """Flax's own ``nnx.RNN(nnx.GRUCell)`` in each block of a Python loop of residual layers."""

    class Stacked(nnx.Module):
        def __init__(self, rngs):
            self.rnns = nnx.List(
                [nnx.RNN(nnx.GRUCell(4, 4, rngs=rngs, param_dtype=jnp.float64)) for _ in range(3)]
            )

        def __call__(self, x):
            for rnn in self.rnns:
                x = x + rnn(x)
            return x

    model = Stacked(nnx.Rngs(0))
    x = _normal(jax.random.key(2), (2, 7, 4))
    loss = lambda model, x: jnp.mean(jnp.sin(model(x)))
    return Case(loss, (model, x), [("chain", 3, True, False), ("scan", 7, True, True)], depth=7, module=True)


def case_scan_whose_step_holds_a_loop_of_blocks():
    """A scan over time whose step runs a Python loop of residual blocks (a deep cell)."""
    A = _normal(jax.random.key(3), (3, 3), 0.5)
    B = [_normal(jax.random.key(10 + i), (3, 3), 0.5) for i in range(4)]
    xs = _normal(jax.random.key(4), (8, 3))

    def loss(A, B, xs):
        def step(h, x):
            u = jnp.tanh(h @ A + x)
            for b in B:
                u = u + jnp.tanh(u @ b)
            return h + 0.3 * u, h

        h, hs = jax.lax.scan(step, jnp.zeros(3), xs)
        return jnp.sum(h**2) + jnp.sum(jnp.cos(hs))

    return Case(loss, (A, B, xs), [("scan", 8, True, False), ("chain", 4, True, True)], depth=8)


def case_three_levels_under_jit_checkpoint_and_cond():
    """``jit`` around a scan (level 1) whose step is checkpointed and runs a Python loop of
    residual blocks (level 2), each choosing with ``cond`` a branch that runs a scan (level 3)."""
    W = _normal(jax.random.key(5), (5, 3, 3), 0.4)
    V = [_normal(jax.random.key(20 + i), (3, 3), 0.4) for i in range(3)]
    U = _normal(jax.random.key(6), (3, 3), 0.4)
    h0 = _normal(jax.random.key(7), (4, 3))

    def inner(v, flag):
        def rows(r, _):
            return r + jnp.tanh(r @ U), None

        scanned = jax.lax.scan(rows, v, None, length=4)[0]
        return jax.lax.cond(flag, lambda: scanned, lambda: -scanned)

    @jax.jit
    def loss(W, V, h0):
        @jax.checkpoint
        def step(h, w):
            u = h @ w
            for v in V:
                u = u + jnp.tanh(inner(u @ v, jnp.sum(u) > -1e9))
            return h + 0.5 * jnp.tanh(u), None

        return jnp.sum(jnp.sin(jax.lax.scan(step, h0, W)[0]))

    rows = [("scan", 5, True, False), ("chain", 3, True, True), ("scan", 4, True, True)]
    return Case(loss, (W, V, h0), rows, depth=5)


case = fixture_over_cases(globals())


def _rows(stacks):
    return [(s.kind, s.length, s.converted, "(nested:" in s.reason) for s in stacks]


def test_find_stacks_lists_each_stack_once(case):
    with jax.enable_x64(True):
        stacks = hbpjax.find_stacks(case.loss, *case.args)
    assert _rows(stacks) == case.rows, str(stacks)


def test_k_ge_every_length_equals_jax_grad(case):
    with jax.enable_x64(True):
        exact = model_grad(case.loss, case.args, module=case.module)
        highway = model_grad(case.loss, case.args, case.depth, module=case.module)
        k0 = model_grad(case.loss, case.args, 0, module=case.module)
    assert_trees_close(highway, exact)
    assert tree_rel_error(k0, exact) > 1e-6


@pytest.mark.parametrize(
    "build",
    [case_loop_of_blocks_each_with_a_scan, case_scan_whose_step_holds_a_loop_of_blocks, case_three_levels_under_jit_checkpoint_and_cond],
)
def test_planned_once_and_reported_per_top_level_stack(build, monkeypatch):
    """One walk per trace; the sweep report lists the stacks that are not nested, in order."""
    with jax.enable_x64(True):
        case = build()
    plans = []
    original = planner.Planner.plan
    monkeypatch.setattr(planner.Planner, "plan", lambda self, closed: plans.append(1) or original(self, closed))
    with jax.enable_x64(True):
        _, report = hbpjax.highway_grad(
            case.loss, tuple(range(len(case.args))), iterations=2, return_report=True
        )(*case.args)
    assert len(plans) == 1
    top = [r for r in case.rows if not r[3]]
    assert len(report.sources) == len(top)
    np.testing.assert_array_equal(np.asarray(report.sweeps), [min(2, length - 1) for _, length, _, _ in top])
