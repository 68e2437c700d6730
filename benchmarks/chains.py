"""Models written as a Python loop of layers (chains) against the same models under ``nnx.scan``.

Both versions are plain Flax with the same weights; ``hbpjax.nnx.value_and_grad`` converts the
scan (found in the jaxpr) and the loop (found as a chain of identical blocks). For a pre-LN
Transformer (attention and MLP per layer) and a pre-activation ResNet (two convolutions per block)
at L = 16, 32 and 64 layers it reports, in one process:

- the largest relative difference between the two versions' gradients at k = 0 and k = 2 (the
  same Highway-BP gradient: equal to rounding);
- the train-step time of both (interleaved, medians), with ``nnx.value_and_grad``'s of each: the
  loop-written model is a different program for XLA (its forward alone runs at another speed than
  the scan's), so the goal compares what Highway-BP does to each, its step time against the same
  model's backprop: within 10 % between the loop and the scan version;
- the trace + lower + compile time of the loop version's highway step against
  ``nnx.value_and_grad``'s of the same loop model (goal at L = 64: under 2x).

Run:  python benchmarks/chains.py [--repeats 7] [--layers 16 32 64]
Writes results/chains.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hbpjax  # noqa: E402


class PreLN(nnx.Module):
    def __init__(self, dim, rngs):
        self.norm1, self.norm2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, dim, decode=False, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(dim, 2 * dim, rngs=rngs), nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, h):
        h = h + self.attn(self.norm1(h), mask=nnx.make_causal_mask(jnp.ones(h.shape[:2])))
        return h + self.fc2(jax.nn.gelu(self.fc1(self.norm2(h))))


class PreAct(nnx.Module):
    def __init__(self, channels, rngs):
        self.bn1, self.bn2 = nnx.BatchNorm(channels, rngs=rngs), nnx.BatchNorm(channels, rngs=rngs)
        self.conv1 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)

    def __call__(self, h):
        return h + self.conv2(nnx.relu(self.bn2(self.conv1(nnx.relu(self.bn1(h))))))


class Looped(nnx.Module):
    """The layers in an ``nnx.List``, run by a Python loop."""

    def __init__(self, make, layers, rngs):
        self.layers = nnx.List([make(rngs) for _ in range(layers)])

    def __call__(self, h):
        for layer in self.layers:
            h = layer(h)
        return h


class Scanned(nnx.Module):
    """The layers stacked with ``nnx.vmap``, run by ``nnx.scan``."""

    def __init__(self, make, layers, rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return make(rngs)

        self.layers = create(rngs)

    def __call__(self, h):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, layer):
            return layer(h)

        return step(h, self.layers)


def same_weights(looped: Looped, scanned: Scanned) -> None:
    """Gives the loop model the scan model's weights, layer by layer."""
    stacked = nnx.state(scanned.layers)
    for i, layer in enumerate(looped.layers):
        nnx.update(layer, jax.tree.map(lambda a, i=i: a[i], stacked))


def models(kind: str, layers: int):
    if kind == "transformer":
        make, x = (lambda r: PreLN(32, r)), jax.random.normal(jax.random.key(1), (8, 16, 32))
    else:
        make, x = (lambda r: PreAct(8, r)), jax.random.normal(jax.random.key(1), (16, 8, 8, 8))
    scanned = Scanned(make, layers, nnx.Rngs(0))
    looped = Looped(make, layers, nnx.Rngs(0))
    same_weights(looped, scanned)
    return looped, scanned, x


def compile_seconds(fn, *args) -> float:
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


def rel(a, b) -> float:
    fa = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    fb = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(fa - fb) / np.linalg.norm(fb))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 32, 64])
    args = parser.parse_args()
    loss = lambda m, x: jnp.mean(jnp.sin(m(x)))
    data = {"env": common.environment(), "results": []}
    rows = []
    for kind in ("transformer", "resnet"):
        for L in args.layers:
            looped, scanned, x = models(kind, L)
            infos = hbpjax.find_stacks(loss, looped, x)
            chains = [s for s in infos if s.kind == "chain" and s.converted]
            fns, grads = {}, {}
            for name, model in (("loop", looped), ("scan", scanned)):
                graphdef, state = nnx.split(model)
                bp = lambda state, x, graphdef=graphdef: nnx.value_and_grad(loss)(nnx.merge(graphdef, state), x)[1]
                compiled = jax.jit(bp).lower(state, x).compile()
                fns[f"{name} backprop"] = lambda c=compiled, s=state: c(s, x)
                for k in (0, 2):
                    vg = hbpjax.nnx.value_and_grad(loss, iterations=k)
                    step = lambda state, x, vg=vg: vg(nnx.merge(graphdef, state), x)[1]
                    compiled = jax.jit(step).lower(state, x).compile()
                    grads[name, k] = jax.tree.map(np.asarray, nnx.state(compiled(state, x), nnx.Param))
                    fns[f"{name} k={k}"] = lambda c=compiled, s=state: c(s, x)
            g_state = nnx.split(looped)
            plain = lambda state, x: nnx.value_and_grad(loss)(nnx.merge(g_state[0], state), x)
            highway = lambda state, x: hbpjax.nnx.value_and_grad(loss, iterations=2)(nnx.merge(g_state[0], state), x)
            t_plain, t_highway = compile_seconds(plain, g_state[1], x), compile_seconds(highway, g_state[1], x)
            times = common.time_round_robin(fns, args.repeats)
            ms = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
            # Per-layer gradients of the loop model, stacked like the scan model's, compared.
            diff = {}
            for k in (0, 2):
                loop_layers = grads["loop", k]["layers"]
                stacked = jax.tree.map(lambda *a: np.stack(a), *[loop_layers[i] for i in range(L)])
                diff[k] = rel(stacked, grads["scan", k]["layers"])
            result = {
                "model": kind, "L": L, "chains": [(s.length, s.period) for s in chains],
                "grad_rel_diff": diff, "step_ms": ms,
                "time_ratio": {k: ms[f"loop k={k}"] / ms[f"scan k={k}"] for k in (0, 2)},
                "backprop_ratio": ms["loop backprop"] / ms["scan backprop"],
                # Highway's step against the same model's backprop, loop version over scan version.
                "relative_speedup_ratio": {
                    k: (ms["loop backprop"] / ms[f"loop k={k}"]) / (ms["scan backprop"] / ms[f"scan k={k}"]) for k in (0, 2)
                },
                "compile_s": {"value_and_grad": t_plain, "highway k=2": t_highway}, "compile_ratio": t_highway / t_plain,
            }
            data["results"].append(result)
            speedup = lambda name, k: ms[f"{name} backprop"] / ms[f"{name} k={k}"]
            rows.append([
                kind, L, ", ".join(f"{n} x {p}" for n, p in result["chains"]) or "none",
                f"{diff[0]:.1e} / {diff[2]:.1e}",
                f"{ms['loop backprop']:.1f} / {ms['scan backprop']:.1f}",
                f"{ms['loop k=0']:.1f} / {ms['scan k=0']:.1f}", f"{ms['loop k=2']:.1f} / {ms['scan k=2']:.1f}",
                f"{speedup('loop', 0):.2f}x / {speedup('scan', 0):.2f}x", f"{speedup('loop', 2):.2f}x / {speedup('scan', 2):.2f}x",
                f"{t_highway:.1f} / {t_plain:.1f} s ({result['compile_ratio']:.2f}x)",
            ])
            print(rows[-1], flush=True)
    table = common.markdown_table(
        ["model", "L", "chain found (layers x period)", "gradient rel. diff loop vs scan, k=0 / k=2",
         "backprop ms, loop / scan", "k=0 ms, loop / scan", "k=2 ms, loop / scan", "k=0 vs own backprop, loop / scan",
         "k=2 vs own backprop, loop / scan", "compile: highway k=2 / value_and_grad (loop model)"],
        rows,
    )
    within = [all(abs(v - 1) <= 0.1 for v in r["relative_speedup_ratio"].values()) for r in data["results"]]
    compile_goal = [r["compile_ratio"] < 2.0 for r in data["results"] if r["L"] == max(args.layers)]
    spread = [r["backprop_ratio"] for r in data["results"]]
    summary = (
        f"Highway-BP's step against the same model's backprop within 10 % between the loop and the scan version: "
        f"{sum(within)} of {len(within)} rows. The loop-written models' own backprop runs at {min(spread):.2f}x to "
        f"{max(spread):.2f}x the scan versions' time here (a different program for XLA), and so do their highway steps. "
        f"Compile time at L = {max(args.layers)} under 2x plain value_and_grad's: {sum(compile_goal)} of {len(compile_goal)}."
    )
    config = ("Pre-LN Transformer: dim 32, 2 heads, T=16, batch 8. Pre-activation ResNet: 8 channels, 8x8, batch 16 "
              "(BatchNorm in train mode). Loss: mean of sin of the output.")
    markdown = "\n".join(["# Chains (Python loops of layers) against scans", "", config, "", table, "", summary, "",
                          common.env_line(data["env"])])
    print(markdown)
    common.write_results("chains", markdown, data)
    if common.quote_in_readme("chains", "\n".join([config, "", table, "", summary, "", common.env_line(data["env"])])):
        print("updated the documents' quote of these results")


if __name__ == "__main__":
    main()
