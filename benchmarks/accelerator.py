"""The paper's settings on whatever accelerator is present, in one command (``make bench-accel``).

A GRU over L = 1024 steps at k = 0, 5 and 10; a deep pre-activation ResNet; a small GPT; the long
GRU of ``core_speed.py``. Each is timed in one process, round-robin after warm-up, as the jitted
train step (value and gradient) of ``jax.value_and_grad`` against ``hbpjax`` at each k; the
results name the device they ran on.

On a GPU or TPU the full sizes run (a few minutes on one GPU). On a CPU a small mode runs instead
(under 5 minutes on 2 cores) and says so: its figures are CPU figures, not accelerator ones.

Run:  python benchmarks/accelerator.py [--repeats 10] [--small]
Writes results/accelerator.{md,json} (results/accelerator_cpu.{md,json} for a CPU run).
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
import core_speed  # noqa: E402

import hbpjax  # noqa: E402
from hbpjax.examples import data, models  # noqa: E402


def _ce(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _functional(make_loss, args, ks):
    loss = make_loss(1)
    fns = {"backprop": jax.jit(jax.value_and_grad(loss))}
    fns.update({f"k={k}": jax.jit(hbpjax.highway_value_and_grad(loss, iterations=k)) for k in ks})
    return fns, args


def _module(model, x, y, ks, gamma=0.0):
    graphdef, state = nnx.split(model)
    fns = {"backprop": jax.jit(lambda s, x, y: nnx.value_and_grad(_ce)(nnx.merge(graphdef, s), x, y))}
    for k in ks:
        transform = hbpjax.nnx.value_and_grad(_ce, iterations=k, gamma=gamma)
        fns[f"k={k}"] = jax.jit(lambda s, x, y, t=transform: t(nnx.merge(graphdef, s), x, y))
    return fns, (state, x, y)


def settings(small: bool) -> dict:
    """``{name: () -> (fns, args)}``; ``small``: sizes for a CPU."""
    corpus, _ = data.char_corpus()
    rng = np.random.default_rng(0)
    images, labels = data.digits()[0][: 32 if small else 128], data.digits()[1][: 32 if small else 128]
    blocks, gpt_layers, gpt_dim, T = (4, 4, 32, 32) if small else (32, 12, 256, 256)
    gru_T, gru_H, gru_B = (256, 32, 8) if small else (1024, 256, 64)
    long_T = 2048 if small else 16384
    text = corpus.batch(rng, 4 if small else 32, T)
    return {
        f"GRU, L={gru_T}, hidden {gru_H}, batch {gru_B}": lambda: _functional(*core_speed.gru_problem(gru_T, gru_H, gru_B), (0, 5, 10)),
        f"pre-activation ResNet, 2 x {blocks} blocks, digits, batch {len(labels)}": lambda: _module(
            models.PreActResNet(blocks_per_stage=blocks, rngs=nnx.Rngs(0)), images, labels, (0, 2)),
        f"GPT pre-LN, {gpt_layers} layers, dim {gpt_dim}, T={T}": lambda: _module(
            models.GPT(corpus.vocab_size, dim=gpt_dim, layers=gpt_layers, max_len=T, rngs=nnx.Rngs(0)), *text, (0, 2), gamma=0.2),
        f"long GRU (core_speed), T={long_T}, hidden 16, batch 4": lambda: _functional(*core_speed.gru_problem(long_T, 16, 4), (0, 2)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="the CPU sizes, whatever the device")
    args = parser.parse_args()
    env = common.environment()
    on_cpu = jax.default_backend() == "cpu"
    small = args.small or on_cpu
    results = {}
    for name, make in settings(small).items():
        fns, call_args = make()
        compiled = {m: f.lower(*call_args).compile() for m, f in fns.items()}
        times = common.time_round_robin({m: (lambda c=c: c(*call_args)) for m, c in compiled.items()}, args.repeats)
        results[name] = {m: float(np.median(t)) * 1e3 for m, t in times.items()}
        print(name, {m: round(v, 2) for m, v in results[name].items()}, flush=True)
    rows = []
    for name, r in results.items():
        speed = " ".join(f"{m} {r['backprop'] / r[m]:.2f}x" for m in r if m != "backprop")
        rows.append([name, f"{r['backprop']:.2f}", speed])
    device = jax.devices()[0].device_kind
    where = (f"a CPU ({env['cpu_cores']} cores), small mode: CPU figures, not accelerator ones" if on_cpu
             else f"{jax.device_count()} x {device}" + (", small mode" if small else ""))
    markdown = "\n".join([
        f"# The paper's settings on {where}", "",
        common.markdown_table(["setting", "backprop ms (median)", "speed of highway vs backprop"], rows), "",
        common.env_line(env),
    ])
    print(markdown)
    common.write_results("accelerator_cpu" if on_cpu else "accelerator", markdown, {"env": env, "small": small, "results": results})


if __name__ == "__main__":
    main()
