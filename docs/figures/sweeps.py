"""Draws docs/figures/sweeps.png, the figure of docs/how_it_works.md (run it from the repository root).

Left: one sweep. Every layer's vector-Jacobian product with the block runs at once (vertical
arrows), then one prefix scan carries the cotangents along the residual path (the arrow below).
Right: what k sweeps give, measured: the relative error of each layer's weight gradient against
`jax.grad` (float64) on a 24-layer residual tanh MLP, for k = 0, 1, 2, 4, 8. Layers near the loss
are reached by few long paths and converge first; k >= L is exact.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import hbpjax

L, WIDTH = 24, 16


def loss(w, x):
    h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, w)
    return jnp.sum(jnp.sin(h))


def errors():
    with jax.enable_x64(True):
        w = jax.random.normal(jax.random.key(0), (L, WIDTH, WIDTH), jnp.float64) / jnp.sqrt(WIDTH)
        x = jax.random.normal(jax.random.key(1), (8, WIDTH), jnp.float64)
        exact = jax.grad(loss)(w, x)
        norm = jnp.linalg.norm(exact.reshape(L, -1), axis=1)
        out = {}
        for k in (0, 1, 2, 4, 8):
            got = hbpjax.highway_grad(loss, iterations=k)(w, x)
            out[k] = np.asarray(jnp.linalg.norm((got - exact).reshape(L, -1), axis=1) / norm)
        return out


def schematic(ax):
    n = 6
    for i in range(n):
        ax.add_patch(plt.Rectangle((i * 1.6, 1.0), 1.0, 0.8, fc="#c5cae9", ec="#283593"))
        ax.text(i * 1.6 + 0.5, 1.4, f"$J_{{{i + 1}}}^T$", ha="center", va="center")
        ax.annotate("", (i * 1.6 + 0.5, 0.55), (i * 1.6 + 0.5, 1.0), arrowprops=dict(arrowstyle="->", color="#283593"))
    ax.annotate("", (-0.2, 0.35), (n * 1.6 - 0.4, 0.35), arrowprops=dict(arrowstyle="->", lw=2, color="#c62828"))
    ax.text(n * 0.8 - 0.3, 0.05, "one prefix scan along the residual path ($K_i$)", ha="center", color="#c62828")
    ax.text(n * 0.8 - 0.3, 2.1, "all layers' VJPs at once", ha="center", color="#283593")
    ax.set_xlim(-0.5, n * 1.6)
    ax.set_ylim(-0.2, 2.4)
    ax.set_title("one sweep (repeated k times)")
    ax.axis("off")


def main():
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.1, 1]})
    schematic(left)
    for k, err in errors().items():
        right.semilogy(range(1, L + 1), err + 1e-17, marker=".", label=f"k = {k}")
    right.set_xlabel("layer (the loss reads layer L)")
    right.set_ylabel("relative error of dL/dW_i")
    right.set_title(f"k sweeps against jax.grad (L = {L}, float64)")
    right.legend(fontsize=8)
    fig.tight_layout()
    out = Path(__file__).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
