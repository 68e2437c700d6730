"""Layer-parallel Highway-BP on D in {1, 2, 4, 8} simulated CPU devices: equality, memory, collectives.

For a deep residual MLP (per-layer parameters) and a GRU (shared weights, the layer axis is time),
split over a mesh axis of D devices with ``residual_scan(layer_axis="layers")``, and for the same MLP
written as an unmodified ``lax.scan`` split by ``highway_grad(..., layer_axis="layers")``:

* equality: relative error of the layer-parallel gradient against the single-device one (exact
  and highway k=2);
* memory per device, from XLA's buffer assignment of the compiled train step: arguments
  (parameters + inputs held by one device) and temporaries (activations, cotangents);
* collectives in the compiled HLO: how many cross-device ops the gradient holds, for exact
  backprop (JAX's transpose of the device chain: D-1 sequential hops back; outside and inside loop
  bodies) and for highway (outside the sweeps, and what one sweep adds: k sweeps against k-1).

Simulated devices share the same 2 CPU cores, so their timings say nothing about real hardware:
wall-clock figures are printed only when real accelerators are present.

Run:  python benchmarks/scaling.py      (about a minute; writes results/scaling.{md,json})
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hbpjax  # noqa: E402

DEVICES = (1, 2, 4, 8)
K = 2


def mlp(L=64, width=64, batch=32):
    ks = jax.random.split(jax.random.key(0), 3)
    params = {"W": jax.random.normal(ks[0], (L, width, width)) / np.sqrt(width * L) * 4, "b": jnp.zeros((L, width))}
    x = jax.random.normal(ks[1], (batch, width))

    def loss(params, x, layer_axis=None):
        h, _ = hbpjax.residual_scan(lambda h, p: jnp.tanh(h @ p["W"] + p["b"]), x, params, layer_axis=layer_axis)
        return jnp.mean(h**2)

    return "residual MLP, L=64, width 64, batch 32", loss, params, x, "params", "residual_scan"


def scan_mlp(L=64, width=64, batch=32):
    """The same MLP as an unmodified lax.scan: layer parallelism from the transform's layer_axis."""
    _, _, params, x, _, _ = mlp(L, width, batch)

    def loss(params, x, layer_axis=None):  # nothing of hbpjax in the model
        h, _ = jax.lax.scan(lambda h, p: (h + jnp.tanh(h @ p["W"] + p["b"]), None), x, params)
        return jnp.mean(h**2)

    return "unmodified lax.scan MLP, L=64, width 64, batch 32 (highway_grad(layer_axis=))", loss, params, x, "params", "transform"


def gru(T=256, hidden=64, batch=32, d_in=16):
    ks = jax.random.split(jax.random.key(1), 5)
    shapes = [(d_in, hidden), (hidden, hidden), (d_in, hidden), (hidden, hidden)]
    params = {n: jax.random.normal(k, s) / np.sqrt(s[0]) for n, k, s in zip(["Wz", "Uz", "Wh", "Uh"], ks, shapes)}
    xs = jax.random.normal(ks[4], (T, batch, d_in))

    def loss(params, xs, layer_axis=None):
        def cell(h, x):
            u = jax.nn.sigmoid(x @ params["Wz"] + h @ params["Uz"])
            return 1.0 - u, u * jnp.tanh(x @ params["Wh"] + h @ params["Uh"])

        _, hs = hbpjax.residual_scan(cell, jnp.zeros((batch, hidden)), xs, residual=hbpjax.residual.gated, layer_axis=layer_axis)
        return jnp.mean(hs**2)

    return "GRU, T=256, hidden 64, batch 32 (time chunks)", loss, params, xs, "inputs", "residual_scan"


_OP = re.compile(r"= \S+ (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(?:-start)?\(")


def collectives(hlo: str) -> tuple[Counter, Counter]:
    """(straight-line counts, counts inside while-loop bodies) of collectives in compiled HLO."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    outside, inside, current = Counter(), Counter(), None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if header and line.rstrip().endswith("{"):
            current = header.group(1)
        m = _OP.search(line)
        if m:
            (inside if current in bodies else outside)[m.group(1)] += 1
    return outside, inside


def fmt(counter: Counter) -> str:
    short = {"collective-permute": "permute", "all-reduce": "all-reduce", "all-gather": "all-gather"}
    return ", ".join(f"{n} {short.get(k, k)}" for k, n in sorted(counter.items())) or "none"


def run():
    env = common.environment()
    rows, data = [], {"environment": env, "results": []}
    for build in (mlp, gru, scan_mlp):
        title, loss, params, inputs, sharded, via = build()
        reference = {
            k: jax.jit(hbpjax.highway_grad(loss, (0, 1), iterations=k))(params, inputs) for k in (None, K)
        }
        for D in DEVICES:
            mesh = jax.make_mesh((D,), ("layers",), devices=jax.devices()[:D])
            axis = "layers" if D > 1 else None
            with jax.set_mesh(mesh):
                put = lambda a: jax.device_put(a, NamedSharding(mesh, P("layers") if D > 1 else P()))
                args = (jax.tree.map(put, params), inputs) if sharded == "params" else (params, put(inputs))
                entry = {"model": title, "devices": D}
                if via == "transform":  # the model as written; the transform splits its scan
                    fn_k = lambda k: jax.jit(hbpjax.highway_grad(loss, (0, 1), iterations=k, layer_axis=axis))
                else:
                    fn_k = lambda k: jax.jit(hbpjax.highway_grad(lambda p, x: loss(p, x, layer_axis=axis), (0, 1), iterations=k))
                for k in (None, K):
                    fn = fn_k(k)
                    compiled = fn.lower(*args).compile()
                    grads = compiled(*args)
                    name = "exact" if k is None else f"highway k={k}"
                    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(grads))])
                    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(reference[k])])
                    mem = compiled.memory_analysis()
                    outside, inside = collectives(compiled.as_text())
                    if k:  # a few sweeps are written out as straight-line code: what one more adds
                        fewer = sum(collectives(fn_k(k - 1).lower(*args).compile().as_text()), Counter())
                        inside = outside + inside - fewer
                        outside = fewer - Counter({op: (k - 1) * n for op, n in inside.items()})
                    entry[name] = {
                        "rel_error": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                        "argument_mib": mem.argument_size_in_bytes / 2**20,
                        "temp_mib": mem.temp_size_in_bytes / 2**20,
                        "collectives": dict(outside),
                        "collectives_per_sweep": dict(inside),
                    }
                    if jax.default_backend() != "cpu":  # real devices: timings mean something
                        jax.block_until_ready(compiled(*args))
                        start = time.perf_counter()
                        jax.block_until_ready(compiled(*args))
                        entry[name]["seconds"] = time.perf_counter() - start
                    rows.append([title if D == 1 and k is None else "", D, name, f"{entry[name]['rel_error']:.1e}",
                                 f"{entry[name]['argument_mib']:.2f}", f"{entry[name]['temp_mib']:.2f}",
                                 fmt(outside), fmt(inside)])
                data["results"].append(entry)
                print(f"{title}: D={D} done")
    return rows, data


def main():
    rows, data = run()
    env = data["environment"]
    md = [
        "# Layer-parallel scaling (simulated devices)",
        "",
        common.env_line(env) + f" {jax.device_count()} simulated devices share the CPU cores.",
        "",
        "Relative error is against the same method on one device. Memory is per device (XLA buffer",
        "assignment of the compiled gradient). Collectives are counted in the compiled HLO: for exact,",
        "outside and inside loop bodies; for highway, outside the sweeps, and what each sweep adds (the",
        "compiled gradient with k sweeps against k-1; a few sweeps are written out as straight-line",
        "code rather than a loop, so the count is by difference). The exact backward is",
        "JAX's transpose of the device chain: its permutes run one after another (D-1 hops back); the",
        "highway backward needs, per sweep, one permute (block term across chunk boundaries) and one",
        "all-reduce (the per-device summaries of the prefix scan), whatever D.",
        "",
        "Per-device temporaries of the highway gradient shrink with D (each device holds its chunk's",
        "activations). Those of the exact gradient do not: JAX's transpose of the forward's stage loop",
        "keeps residuals of every stage on every device.",
        "",
        common.markdown_table(
            ["model", "D", "method", "rel. error", "args MiB/dev", "temp MiB/dev", "collectives", "per sweep / in loops"], rows
        ),
        "",
        "Timings on simulated devices are not meaningful and are not reported; on real accelerators"
        " the script adds them to results/scaling.json.",
    ]
    path = common.write_results("scaling", "\n".join(md), data)
    print(path.read_text())


if __name__ == "__main__":
    main()
