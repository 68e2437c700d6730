"""Where the time of the residual-MLP train step goes (the configuration of core_speed.py).

Times, jitted and in one process (median after warm-up), the pieces of one train step of the
additive residual MLP ``h <- h + tanh(h @ W_l + b_l)`` (L=2048, width 16, batch 4):

* the forward alone (sequential in both methods);
* exact backprop (``jax.value_and_grad``) and Highway-BP with k=0;
* the parts of the highway backward: linearizing all layers at once (``jax.vjp`` of the vmapped
  block) with its VJP, the residual-path prefix scan, and the per-layer weight gradient, a batched
  ``(L, b, i) x (L, b, j) -> (L, i, j)`` product, both as XLA's batched dot and as a broadcast
  multiply and sum (the same numbers).

Run:  .venv/bin/python benchmarks/profile_mlp.py      writes results/profile_mlp.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import hbpjax
from core_speed import mlp_problem

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(f, *args, repeats=50):
    jax.block_until_ready(f(*args))  # compile
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2048)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    L, W, B = args.layers, args.width, args.batch

    make_loss, (params, x) = mlp_problem(L, W, B)  # exactly core_speed.py's problem
    loss = make_loss(1)
    hs = jax.random.normal(jax.random.key(3), (L, B, W))  # stand-ins for saved carries and cotangents

    def block(h, p):
        return jnp.tanh(h @ p["W"] + p["b"])

    @jax.jit
    def linearize_and_vjp(hs, params, cts):
        _, vjp = jax.vjp(jax.vmap(block), hs, params)
        return vjp(cts)

    @jax.jit
    def residual_path_scan(u):
        # w[j] = u[j] + w[j+1]: the additive residual's prefix scan, as highway_grad runs it.
        return jax.lax.associative_scan(jnp.add, u, reverse=True)

    rows = [
        ("forward (jax.jit(loss))", median_ms(jax.jit(loss), params, x)),
        ("train step, jax.value_and_grad", median_ms(jax.jit(jax.value_and_grad(loss)), params, x)),
        (
            "train step, highway_value_and_grad k=0",
            median_ms(jax.jit(hbpjax.highway_value_and_grad(loss, iterations=0)), params, x),
        ),
        ("  all layers' linearization + VJP (vmap)", median_ms(linearize_and_vjp, hs, params, hs)),
        ("  residual-path prefix scan", median_ms(residual_path_scan, hs)),
        (
            "  weight gradient as batched dot (einsum lbi,lbj->lij)",
            median_ms(jax.jit(lambda a, b: jnp.einsum("lbi,lbj->lij", a, b)), hs, hs),
        ),
        (
            "  weight gradient as broadcast multiply + sum",
            median_ms(jax.jit(lambda a, b: (a[:, :, :, None] * b[:, :, None, :]).sum(1)), hs, hs),
        ),
    ]
    device = jax.devices()[0]
    lines = [
        "# Where the residual-MLP train step spends its time",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} with jax {jax.__version__} on {device.platform}, "
        f"L={L}, width {W}, batch {B}. Median of 50 runs after warm-up (`benchmarks/profile_mlp.py`).",
        "",
        "| part | ms |",
        "|---|---|",
        *[f"| {name} | {ms:.2f} |" for name, ms in rows],
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile_mlp.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
