"""Flax's own ``nnx.RNN`` models, unchanged, under ``hbpjax.nnx.value_and_grad``.

For ``nnx.RNN(nnx.GRUCell)`` and ``nnx.RNN(nnx.OptimizedLSTMCell)`` (T=4096, hidden 16, batch 4, 16
input features) it times one jitted value-and-gradient step of

* ``nnx.value_and_grad`` (exact backprop, the reference),
* ``hbpjax.nnx.value_and_grad`` with ``k = 0`` and ``k = 2`` on the unchanged Flax model (the
  scan found automatically), and
* the same on hbpjax's hand-split modules (``hbpjax.nnx.ResidualRNN`` over ``hbpjax.nnx.GRUCell`` /
  ``LSTMCell``) holding the same weights,

all interleaved in one process (medians, ratios against ``nnx.value_and_grad`` of the same run). It
also reports what the automatic conversion costs at trace time: the time to trace and lower, and to
compile, the step with ``scans="auto"``, with ``scans="marked"`` (nothing converted) and with
``nnx.value_and_grad``.

Goals (docs/performance.md): automatic within 10 % of the hand-split module; GRU ``k = 0`` at least 1.5x.

Run:  python benchmarks/auto_speed.py [--repeats 15] [--quick]
Writes results/auto_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hbpjax  # noqa: E402

CELLS = {"GRU": (nnx.GRUCell, hbpjax.nnx.GRUCell), "LSTM": (nnx.OptimizedLSTMCell, hbpjax.nnx.LSTMCell)}
SWEEPS = (0, 2)


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def problem(kind, T, H, B, d_in):
    flax_cell, hand_cell = CELLS[kind]
    flax_model = nnx.RNN(flax_cell(d_in, H, rngs=nnx.Rngs(0)))
    hand_model = hbpjax.nnx.ResidualRNN(hand_cell(d_in, H, rngs=nnx.Rngs(1)))
    nnx.update(hand_model, nnx.state(flax_model, nnx.Param))  # the same weights
    ks = jax.random.split(jax.random.key(2))
    x = jax.random.normal(ks[0], (B, T, d_in))
    y = jax.random.normal(ks[1], (B, T, H))
    return flax_model, hand_model, x, y


def steps_for(flax_model, hand_model, x, y):
    """Zero-argument jitted steps, by label."""

    def bind(grad_fn, model):
        step = nnx.jit(grad_fn)
        return lambda: step(model, x, y)

    fns = {"nnx.value_and_grad": bind(nnx.value_and_grad(loss_fn), flax_model)}
    for k in SWEEPS:
        fns[f"automatic k={k}"] = bind(hbpjax.nnx.value_and_grad(loss_fn, iterations=k), flax_model)
        fns[f"hand-split k={k}"] = bind(hbpjax.nnx.value_and_grad(loss_fn, iterations=k), hand_model)
    return fns


def trace_costs(flax_model, x, y, repeats):
    """Median seconds to trace+lower and to compile the step, per variant (fresh functions each time)."""
    variants = {
        "nnx.value_and_grad": lambda: nnx.value_and_grad(loss_fn),
        'scans="marked" (nothing converted)': lambda: hbpjax.nnx.value_and_grad(loss_fn, iterations=2, scans="marked"),
        'scans="auto"': lambda: hbpjax.nnx.value_and_grad(loss_fn, iterations=2),
    }
    graphdef, state = nnx.split(flax_model)
    out = {}
    for label, make in variants.items():
        lowering, compiling = [], []
        for _ in range(repeats):
            grad_fn = make()

            def pure(state, x, y):
                return grad_fn(nnx.merge(graphdef, state), x, y)

            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", hbpjax.NoStackWarning)
                lowered = jax.jit(pure).lower(state, x, y)
            lowering.append(time.perf_counter() - start)
            start = time.perf_counter()
            lowered.compile()
            compiling.append(time.perf_counter() - start)
        out[label] = {"trace_and_lower_s": float(np.median(lowering)), "compile_s": float(np.median(compiling))}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small sizes, results/auto_speed_quick.*")
    args = parser.parse_args()
    T, H, B, d_in = (512, 16, 4, 16) if args.quick else (4096, 16, 4, 16)
    repeats = 3 if args.quick else args.repeats
    env = common.environment()
    results = {"env": env, "config": {"T": T, "hidden": H, "batch": B, "in_features": d_in}, "models": {}}
    lines = [
        "# Flax's own nnx.RNN, unchanged, under hbpjax.nnx.value_and_grad",
        "",
        common.env_line(env) + f" T={T}, hidden {H}, batch {B}, {d_in} input features; one jitted "
        f"value-and-gradient step, median of {repeats} interleaved runs; speedup against "
        "nnx.value_and_grad of the same run.",
        "",
    ]
    rows = []
    for kind in CELLS:
        flax_model, hand_model, x, y = problem(kind, T, H, B, d_in)
        fns = steps_for(flax_model, hand_model, x, y)
        times = common.time_round_robin(fns, repeats)
        med = {label: float(np.median(t)) for label, t in times.items()}
        base = med["nnx.value_and_grad"]
        results["models"][kind] = {"median_s": med}
        for k in SWEEPS:
            auto, hand = med[f"automatic k={k}"], med[f"hand-split k={k}"]
            rows.append([
                f"nnx.RNN({CELLS[kind][0].__name__})", k, f"{1e3 * base:.1f}", f"{1e3 * auto:.1f}", f"{base / auto:.2f}x",
                f"{1e3 * hand:.1f}", f"{base / hand:.2f}x", f"{100 * (auto / hand - 1):+.1f} %",
            ])
        print(f"{kind}: " + ", ".join(f"{label} {1e3 * t:.1f} ms" for label, t in med.items()))
    lines.append(common.markdown_table(
        ["model", "k", "nnx.value_and_grad ms", "automatic ms", "speedup", "hand-split ms", "speedup",
         "automatic vs hand-split"],
        rows,
    ))
    gru = results["models"]["GRU"]["median_s"]
    results["goals"] = {
        "gru_k0_speedup": gru["nnx.value_and_grad"] / gru["automatic k=0"],
        "worst_auto_vs_hand": max(
            results["models"][kind]["median_s"][f"automatic k={k}"] / results["models"][kind]["median_s"][f"hand-split k={k}"]
            for kind in CELLS for k in SWEEPS
        ),
    }
    lines += [
        "",
        f"Goals: GRU automatic k=0 at least 1.5x nnx.value_and_grad: {results['goals']['gru_k0_speedup']:.2f}x; "
        f"automatic within 10 % of the hand-split module: worst {100 * (results['goals']['worst_auto_vs_hand'] - 1):+.1f} %.",
        "",
        "## What the automatic conversion costs at trace time (GRU, median of 3, fresh functions)",
        "",
    ]
    flax_model, _, x, y = problem("GRU", T, H, B, d_in)
    costs = trace_costs(flax_model, x, y, 3)
    results["trace"] = costs
    lines.append(common.markdown_table(
        ["gradient", "trace + lower s", "compile s"],
        [[label, f"{c['trace_and_lower_s']:.2f}", f"{c['compile_s']:.2f}"] for label, c in costs.items()],
    ))
    name = "auto_speed_quick" if args.quick else "auto_speed"
    path = common.write_results(name, "\n".join(lines), results)
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
