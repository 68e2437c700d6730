"""Memory and time of a remat'd pre-LN Transformer, written as large models are, under hbpjax.

The model (``hbpjax.examples.models.ScannedGPT``) is plain Flax: its layers' parameters stacked with
``nnx.vmap`` and run by ``nnx.scan`` over an ``nnx.remat``-ed pre-LN block. ``hbpjax.nnx.value_and_grad``
finds the scan, reads through the remat and keeps it: the highway backward recomputes what the
remat's policy does not save, a group of layers at a time.

For the model with and without remat it reports the compiled temporary memory of one jitted train
step (XLA's buffer assignment) and the step time (interleaved, medians), for ``nnx.value_and_grad``
and for ``hbpjax.nnx.value_and_grad`` at k = 0 and k = 2 (``gamma=0.2``).

Goal (docs/performance.md): with remat, k = 2 within 1.3x of backprop's temporary memory, and
below backprop's without remat.

Run:  python benchmarks/remat_memory.py [--repeats 7] [--layers 8]
Writes results/remat_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hbpjax  # noqa: E402
from hbpjax.examples import models  # noqa: E402

MiB = 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    vocab = 96
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.integers(0, vocab, (args.batch, args.seq)))
    y = jax.numpy.roll(x, -1, axis=1)
    ce = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    grads = {
        "backprop": nnx.value_and_grad,
        "k=0": lambda f: hbpjax.nnx.value_and_grad(f, iterations=0, gamma=0.2),
        "k=2": lambda f: hbpjax.nnx.value_and_grad(f, iterations=2, gamma=0.2),
    }
    rows, data, fns = [], {"env": common.environment(), "config": vars(args), "results": {}}, {}
    for remat in (False, True):
        model = models.ScannedGPT(vocab, dim=args.dim, heads=4, layers=args.layers, max_len=args.seq, remat=remat, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        for name, transform in grads.items():
            step = jax.jit(lambda state, x, y, t=transform: t(ce)(nnx.merge(graphdef, state), x, y))
            compiled = step.lower(state, x, y).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            key = f"{'remat' if remat else 'no remat'}, {name}"
            data["results"][key] = {"temp_bytes": int(temp)}
            fns[key] = lambda c=compiled, s=state: c(s, x, y)
    times = common.time_round_robin(fns, args.repeats)
    backprop = {remat: data["results"][f"{remat}, backprop"]["temp_bytes"] for remat in ("no remat", "remat")}
    step_ms = {key: float(np.median(t)) * 1e3 for key, t in times.items()}
    for key, result in data["results"].items():
        remat = key.split(",")[0]
        result["step_ms"] = step_ms[key]
        result["memory_ratio"] = result["temp_bytes"] / backprop[remat]
        result["speed_ratio"] = step_ms[f"{remat}, backprop"] / step_ms[key]
        rows.append([key, f"{result['temp_bytes'] / MiB:.1f}", f"{result['memory_ratio']:.2f}x",
                     f"{step_ms[key]:.1f}", f"{result['speed_ratio']:.2f}x"])
    k2 = data["results"]["remat, k=2"]["temp_bytes"]
    goal = k2 <= 1.3 * backprop["remat"] and k2 < backprop["no remat"]
    data["goal_met"] = bool(goal)
    table = common.markdown_table(
        ["model, gradient", "temp memory MiB", "vs backprop (same model)", "step ms (median)", "speed vs backprop"], rows
    )
    summary = (
        f"Remat'd model, k=2: {k2 / MiB:.1f} MiB against backprop's {backprop['remat'] / MiB:.1f} MiB with remat "
        f"({k2 / backprop['remat']:.2f}x; goal 1.3x) and {backprop['no remat'] / MiB:.1f} MiB without "
        f"(goal: below it): {'met' if goal else 'missed'}."
    )
    config = (
        f"ScannedGPT (plain Flax: nnx.scan over nnx.remat), {args.layers} layers, dim {args.dim}, 4 heads, "
        f"T={args.seq}, batch {args.batch}, vocab {vocab}; highway with gamma=0.2."
    )
    markdown = "\n".join(["# Remat'd Transformer: memory and time", "", config, "", table, "", summary, "",
                          common.env_line(data["env"])])
    print(markdown)
    common.write_results("remat_memory", markdown, data)
    if common.quote_in_readme("remat_memory", "\n".join([config, "", table, "", summary, "", common.env_line(data["env"])])):
        print("updated the documents' quote of these results")


if __name__ == "__main__":
    main()
