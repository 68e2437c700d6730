"""What hbpjax's own machinery costs: its k=0 train step against a minimal hand-written one.

On a residual MLP with two matmuls per layer, ``h <- h + W2_l tanh(W1_l h + b_l)`` (L=2048, width
16, batch 4), k=0 Highway-BP is "sum the cotangents along the residual path, then one VJP of all
layers at once". This script writes that directly (a ``jax.custom_vjp``: the forward scan saves the
layers' inputs; the backward is a reverse cumulative sum and one ``jax.vjp`` of the vmapped block)
and times it, interleaved in one process, against ``hbpjax.highway_value_and_grad(iterations=0)``
on the plain ``lax.scan`` of the same model (found automatically) and against
``jax.value_and_grad``. Goal (docs/performance.md): hbpjax's k=0 within 3 % of the minimal version.

Run:  python benchmarks/overhead.py [--repeats 200]     writes results/overhead.{md,json}
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

import hbpjax  # noqa: E402


def problem(L, W, B, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    params = {
        "W1": jax.random.normal(ks[0], (L, W, W)) / np.sqrt(W),
        "b": 0.1 * jax.random.normal(ks[1], (L, W)),
        "W2": 0.5 * jax.random.normal(ks[2], (L, W, W)) / np.sqrt(W),
    }
    x = jax.random.normal(ks[3], (B, W))
    target = jax.random.normal(ks[4], (B, W))
    return params, x, target


def block(h, p):
    return jnp.tanh(h @ p["W1"] + p["b"]) @ p["W2"]


def make_loss(target):
    def loss(params, x):  # the model as anyone writes it: a lax.scan over stacked layers
        h, _ = jax.lax.scan(lambda h, p: (h + block(h, p), None), x, params)
        return jnp.mean((h - target) ** 2)

    return loss


def make_minimal(target):
    """k=0 Highway-BP written by hand for this model: the reference line."""

    @jax.custom_vjp
    def stack(params, x):
        return jax.lax.scan(lambda h, p: (h + block(h, p), None), x, params)[0]

    def fwd(params, x):
        final, h_prev = jax.lax.scan(lambda h, p: (h + block(h, p), h), x, params)
        return final, (params, h_prev)

    def bwd(res, ct_final):
        params, h_prev = res
        # The residual path alone: every layer's output gets the final cotangent (K = 1, e = 0
        # except at the end), so the reverse cumulative sum is a broadcast.
        w = jnp.broadcast_to(ct_final, h_prev.shape)
        _, vjp = jax.vjp(jax.vmap(block), h_prev, params)
        ct_h, ct_params = vjp(w)
        return ct_params, w[0] + ct_h[0]

    stack.defvjp(fwd, bwd)

    def loss(params, x):
        return jnp.mean((stack(params, x) - target) ** 2)

    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2048)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    params, x, target = problem(args.layers, args.width, args.batch)
    loss, minimal = make_loss(target), make_minimal(target)
    # The same numbers (k=0 is the same gradient both ways): the comparison is like for like.
    ours = jax.jit(hbpjax.highway_value_and_grad(loss, iterations=0))
    reference = jax.jit(jax.value_and_grad(minimal))
    (_, g1), (_, g2) = ours(params, x), reference(params, x)
    agree = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))
    fns = {
        "jax.value_and_grad": jax.jit(jax.value_and_grad(loss)),
        "minimal hand-written k=0 (reference)": reference,
        "hbpjax k=0": ours,
    }
    times = common.time_round_robin({n: (lambda f: lambda: f(params, x))(f) for n, f in fns.items()}, args.repeats)
    med = {n: float(np.median(t)) for n, t in times.items()}
    ref = med["minimal hand-written k=0 (reference)"]
    rows = [[n, f"{1e3 * t:.3f}", f"{100 * (t / ref - 1):+.1f} %"] for n, t in med.items()]
    env = common.environment()
    overhead = med["hbpjax k=0"] / ref - 1
    md = "\n".join([
        "# hbpjax's own overhead at k=0",
        "",
        f"{common.env_line(env)} Residual MLP with two matmuls per layer, L={args.layers}, width "
        f"{args.width}, batch {args.batch}; jitted value and gradient; median of {args.repeats} "
        "interleaved runs after warm-up (`benchmarks/overhead.py`). The minimal version is k=0 "
        "Highway-BP written by hand for this model (a reverse sum and one vmapped VJP).",
        "",
        common.markdown_table(["train step", "ms (median)", "vs minimal"], rows),
        "",
        f"hbpjax k=0 overhead over the minimal backward: {100 * overhead:+.1f} % (goal: within 3 %). "
        f"Largest relative difference of the two gradients: {agree:.1e}.",
    ])
    common.write_results("overhead", md, {"environment": env, "median_s": med, "overhead": overhead, "gradient_agreement": agree})
    print(md)


if __name__ == "__main__":
    main()
