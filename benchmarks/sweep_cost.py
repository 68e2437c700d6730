"""What k costs: the forward, one transpose of all layers, one prefix scan, and the step at each k.

The forward of a converted stack computes every layer's linearization (as backprop's forward
computes its residuals); the backward then applies the transposed linearization of all layers at
once, once per sweep (and once more for the parameters' cotangents), with one prefix scan per
sweep. So a step at ``k`` sweeps should cost about the forward, plus ``k + 1`` transposes of all
layers, plus ``k + 1`` prefix scans. This script measures, in one process and interleaved:

- the forward alone, backprop's step, and Highway-BP's step at k = 0, 1, 2, 4;
- one transpose of all layers alone: the VJP of the vmapped block, applied to stored residuals
  (``jax.vjp`` once, outside the timing; the timed function only applies it);
- one prefix scan alone (``hbpjax._backward.prefix``'s prepare and solve over the carry).

It fits ``step(k) = a + b k`` by least squares and reports ``b``, the cost of one more sweep,
against one transpose of all layers. Goal (docs/performance.md): ``b`` at most 1.1x one transpose.

Run:  python benchmarks/sweep_cost.py [--repeats 9]
Writes results/sweep_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from core_speed import gru_problem  # noqa: E402

import hbpjax  # noqa: E402
from hbpjax._backward import prefix as _prefix  # noqa: E402

KS = (0, 1, 2, 4)


def gru_parts(T, H, B):
    """The GRU stack of core_speed.py: its loss and its block, with stand-ins for the saved carries."""
    make_loss, (params, xs) = gru_problem(T, H, B)
    loss = make_loss(1)

    def path(h, x, params):  # the block path the backward linearizes: (a, b) of a * h + b, read a * sg(h) + b
        u = jax.nn.sigmoid(x @ params["Wz"] + h @ params["Uz"] + params["bz"])
        c = jnp.tanh(x @ params["Wh"] + h @ params["Uh"] + params["bh"])
        return (1.0 - u) * jax.lax.stop_gradient(h) + u * c

    hs = jax.random.normal(jax.random.key(5), (T, B, H))
    return loss, (params, xs), path, (hs, xs, params)


def transformer_parts(L, dim, T, B):
    """A pre-LN Transformer of L layers (attention and MLP per layer) under lax.scan."""
    keys = jax.random.split(jax.random.key(0), 6)
    s = 1.0 / np.sqrt(dim)
    params = {
        "qkv": s * jax.random.normal(keys[0], (L, dim, 3 * dim)),
        "out": s * jax.random.normal(keys[1], (L, dim, dim)),
        "fc1": s * jax.random.normal(keys[2], (L, dim, 4 * dim)),
        "fc2": 0.5 * s * jax.random.normal(keys[3], (L, 4 * dim, dim)),
    }
    x = jax.random.normal(keys[4], (B, T, dim))

    def norm(h):
        return (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)

    def update(h, p):
        q, k, v = jnp.split(norm(h) @ p["qkv"], 3, axis=-1)
        mask = jnp.tril(jnp.ones((T, T), bool))
        w = jax.nn.softmax(jnp.where(mask, q @ jnp.swapaxes(k, -1, -2) / np.sqrt(dim), -1e9), -1)
        h2 = h + (w @ v) @ p["out"]
        return h2 - h + jax.nn.gelu(norm(h2) @ p["fc1"]) @ p["fc2"]

    def loss(params, x):
        h, _ = jax.lax.scan(lambda h, p: (h + update(h, p), None), x, params)
        return jnp.mean(jnp.sin(h))

    def path(h, _, p):
        return jax.lax.stop_gradient(h) + update(h, p)

    hs = jax.random.normal(keys[5], (L, B, T, dim))
    return loss, (params, x), path, (hs, jnp.zeros((L,)), params)


def measure(name, loss, args, path, linearize_at, repeats):
    hs, xs, params = linearize_at
    per_layer_params = name.startswith("Transformer")
    in_axes = (0, 0, 0) if per_layer_params else (0, 0, None)
    _, vjp = jax.vjp(jax.vmap(path, in_axes=in_axes), hs, xs, params)
    transpose = jax.jit(lambda f, ct: f(ct))
    solve = jax.jit(lambda k, u: _prefix.solve(_prefix.prepare(k), u))
    fns = {
        "forward": (jax.jit(loss), args),
        "backprop": (jax.jit(jax.value_and_grad(loss)), args),
        "one transpose of all layers": (transpose, (vjp, hs)),
        "one prefix scan": (solve, (0.9 * jnp.ones_like(hs), hs)),
    }
    for k in KS:
        fns[f"k={k}"] = (jax.jit(hbpjax.highway_value_and_grad(loss, iterations=k)), args)
    compiled = {n: (f.lower(*a).compile(), a) for n, (f, a) in fns.items()}
    times = common.time_round_robin({n: (lambda c=c, a=a: c(*a)) for n, (c, a) in compiled.items()}, repeats)
    ms = {n: float(np.median(t)) * 1e3 for n, t in times.items()}
    slope, intercept = np.polyfit(KS, [ms[f"k={k}"] for k in KS], 1)
    return ms, float(slope), float(intercept)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    problems = {
        "GRU T=1024, hidden 128, batch 32 (compute-bound)": gru_parts(1024, 128, 32),
        "GRU T=16384, hidden 16, batch 4 (latency-bound)": gru_parts(16384, 16, 4),
        "Transformer pre-LN, 16 layers, dim 64, T=64, batch 16": transformer_parts(16, 64, 64, 16),
    }
    data = {"env": common.environment(), "results": {}}
    rows = []
    for name, (loss, loss_args, path, at) in problems.items():
        ms, slope, intercept = measure(name, loss, loss_args, path, at, args.repeats)
        ratio = slope / ms["one transpose of all layers"]
        data["results"][name] = {"ms": ms, "sweep_ms": slope, "k0_fit_ms": intercept, "sweep_vs_transpose": ratio}
        rows.append([
            name, f"{ms['forward']:.1f}", f"{ms['backprop']:.1f}",
            " / ".join(f"{ms[f'k={k}']:.1f}" for k in KS), f"{ms['backprop'] / ms['k=0']:.2f}x",
            f"{ms['one transpose of all layers']:.1f}", f"{ms['one prefix scan']:.1f}",
            f"{slope:.1f} ({ratio:.2f}x)",
        ])
        print(rows[-1], flush=True)
    table = common.markdown_table(
        ["stack", "forward ms", "backprop ms", "highway k=0 / 1 / 2 / 4 ms", "k=0 speedup",
         "one transpose of all layers ms", "one prefix scan ms", "fitted ms per sweep (vs one transpose)"],
        rows,
    )
    met = sum(r["sweep_vs_transpose"] <= 1.1 for r in data["results"].values())
    summary = f"A further sweep costs at most 1.1x one transpose of all layers on {met} of {len(rows)} stacks."
    markdown = "\n".join(["# The cost of k", "", table, "", summary, "", common.env_line(data["env"])])
    print(markdown)
    common.write_results("sweep_cost", markdown, data)
    if common.quote_in_readme("sweep_cost", "\n".join([table, "", summary, "", common.env_line(data["env"])])):
        print("updated the documents' quote of these results")


if __name__ == "__main__":
    main()
