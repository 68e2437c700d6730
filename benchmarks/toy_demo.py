"""A one-minute look at Highway-BP: highway vs exact gradients on a toy residual stack.

Prints, for a deep residual MLP and a GRU, how close ``hbpjax.highway_grad`` with k sweeps is to
``jax.grad`` (cosine similarity, relative error) and the step time of both, jitted.

Run:  python benchmarks/toy_demo.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import hbpjax


def residual_mlp(L=256, width=16, batch=8):
    ks = jax.random.split(jax.random.key(0), 3)
    params = {"W": jax.random.normal(ks[0], (L, width, width)) / np.sqrt(width * L) * 2, "b": jnp.zeros((L, width))}
    x, y = jax.random.normal(ks[1], (batch, width)), jax.random.normal(ks[2], (batch, width))

    def loss(params):
        h, _ = hbpjax.residual_scan(lambda h, p: jnp.tanh(h @ p["W"] + p["b"]), x, params)
        return jnp.mean((h - y) ** 2)

    return f"residual MLP, L={L}, width {width}", loss, params


def gru(T=2048, hidden=16, batch=4):
    ks = jax.random.split(jax.random.key(1), 4)
    params = {name: jax.random.normal(k, (hidden, hidden)) / np.sqrt(hidden) for name, k in zip(["Wz", "Uz", "Wh", "Uh"], ks)}
    xs = jnp.sin(jnp.arange(T)[:, None, None] / 50.0 + jnp.arange(hidden)) * jnp.ones((T, batch, hidden))

    def loss(params):
        def cell(h, x):
            u = jax.nn.sigmoid(x @ params["Wz"] + h @ params["Uz"])
            return 1.0 - u, u * jnp.tanh(x @ params["Wh"] + h @ params["Uh"])

        _, hs = hbpjax.residual_scan(cell, jnp.zeros((batch, hidden)), xs, residual=hbpjax.residual.gated)
        return jnp.mean((hs[1:] - xs[:-1]) ** 2)

    return f"GRU, T={T}, hidden {hidden}", loss, params


def step_time(fn, *args, repeats=7):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    print(f"hbpjax {hbpjax.__version__}, jax {jax.__version__}, {jax.devices()[0].device_kind}\n")
    for title, loss, params in (residual_mlp(), gru()):
        ks = (0, 1, 2, 4, 8)
        report = hbpjax.gradient_agreement(jax.jit(loss), params, iterations=ks)
        exact = step_time(jax.grad(loss), params)
        print(f"== {title}")
        print(f"   jax.grad step: {1e3 * exact:.1f} ms")
        print("      k   cosine   rel.error   step ms   speedup")
        for k, cos, err in zip(report.iterations, report.cosine, report.relative_error):
            t = step_time(hbpjax.highway_grad(loss, iterations=k), params)
            print(f"   {k:4d}  {cos:7.4f}   {err:9.2e}   {1e3 * t:7.1f}   {exact / t:6.2f}x")
        print()


if __name__ == "__main__":
    main()
