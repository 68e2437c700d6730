"""Where the time of the residual-MLP train step goes (the configuration of core_speed.py).

Times, jitted and in one process (median after warm-up), the pieces of one train step of the
additive residual MLP ``h <- h + tanh(h @ W_l + b_l)`` (L=2048, width 16, batch 4):

* the forward alone (sequential in both methods);
* exact backprop (``jax.value_and_grad``) and Highway-BP with k=0;
* the parts of the highway backward: linearizing all layers at once (``jax.vjp`` of the vmapped
  block) with its VJP, the residual-path prefix scan, and the per-layer weight gradient, a batched
  ``(L, b, i) x (L, b, j) -> (L, i, j)`` product, both as XLA's batched dot and as a broadcast
  multiply and sum (the same numbers).

Run:  .venv/bin/python benchmarks/profile_mlp.py      writes results/profile_mlp.{md,json}
"""

from __future__ import annotations

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np
from core_speed import mlp_problem

import hbpjax
from hbpjax._backward import prefix as _prefix


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2048)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=50)
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
        # The backward's prefix scan w[j] = u[j] + K[j+1] w[j+1], here with the additive K = 1.
        return _prefix.solve(_prefix.prepare(jnp.ones_like(u)), u)

    parts = {
        "forward (jax.jit(loss))": (jax.jit(loss), params, x),
        "train step, jax.value_and_grad": (jax.jit(jax.value_and_grad(loss)), params, x),
        "train step, highway_value_and_grad k=0": (
            jax.jit(hbpjax.highway_value_and_grad(loss, iterations=0)), params, x),
        "  all layers' linearization + VJP (vmap)": (linearize_and_vjp, hs, params, hs),
        "  residual-path prefix scan (prepare + solve)": (residual_path_scan, hs),
        "  weight gradient as batched dot (einsum lbi,lbj->lij)": (
            jax.jit(lambda a, b: jnp.einsum("lbi,lbj->lij", a, b)), hs, hs),
        "  weight gradient as broadcast multiply + sum": (
            jax.jit(lambda a, b: (a[:, :, :, None] * b[:, :, None, :]).sum(1)), hs, hs),
    }
    times = common.time_round_robin({n: (lambda f, *a: lambda: f(*a))(*p) for n, p in parts.items()}, args.repeats)
    rows = [[name, f"{1e3 * float(np.median(t)):.2f}"] for name, t in times.items()]
    env = common.environment()
    markdown = "\n".join([
        "# Where the residual-MLP train step spends its time",
        "",
        f"{common.env_line(env)} L={L}, width {W}, batch {B}; median of {args.repeats} interleaved runs "
        "after warm-up (`benchmarks/profile_mlp.py`).",
        "",
        common.markdown_table(["part", "ms"], rows),
    ])
    common.write_results("profile_mlp", markdown, {"environment": env, "ms": {r[0].strip(): float(r[1]) for r in rows}})
    print(markdown)


if __name__ == "__main__":
    main()
