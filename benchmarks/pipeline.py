"""The microbatched layer-parallel schedule, read from the compiled programs, and a cost model.

Part 1 (8 simulated CPU devices): an unmodified ``lax.scan`` over 64 residual layers under
``highway_grad(layer_axis="layers", microbatches=M)``, for D = 2, 4, 8 layer devices and M = 1 .. 16
microbatches. From each compiled program: the forward's ticks (trip count of the loop that passes
the carry on) and collective hops per tick, the exact backward's ticks (``iterations=None``: JAX's
transpose of the same forward), the collectives each highway sweep adds (k = 2 against k = 1), the
loops in the highway backward, the program's size and per-device temporary memory; the bubbles
follow from the ticks (a device works M of T ticks).

Part 2 (one device): the cost model's inputs, timed round-robin in this process: the forward alone,
``jax.value_and_grad`` and the highway step at k = 0 and 2 on the whole batch. Then, per (D, M, k),
the gradient all-reduce time (as a share of one device's data-parallel compute) above which the
layer-parallel highway step beats a data-parallel backprop step, and its time against a pipelined
exact backward (GPipe's schedule).

Run:  python benchmarks/pipeline.py     (about 2 minutes; writes results/pipeline.{md,json})
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hbpjax  # noqa: E402

L, WIDTH, BATCH = 64, 64, 64
DEVICES = (2, 4, 8)
MICROBATCHES = (None, 1, 2, 4, 8, 16)
REPEATS = 30


def problem():
    ks = jax.random.split(jax.random.key(0), 2)
    W = jax.random.normal(ks[0], (L, WIDTH, WIDTH)) * (2.0 / WIDTH) / np.sqrt(L)
    x = jax.random.normal(ks[1], (BATCH, WIDTH))
    return W, x


def loss(W, x):
    """An unmodified scan over the layers: nothing of hbpjax in the model."""
    h, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, W)
    return jnp.mean(h**2)


_COLLECTIVE = re.compile(r" (collective-permute|all-reduce|all-gather|all-to-all|reduce-scatter)(-start)?\(")


def read(text: str) -> dict:
    """While loops (trip count, collectives in the body) and all collectives of compiled HLO."""
    bodies, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = bodies.setdefault(head.group(1), [])
        elif line.strip() == "}":
            current = None
        elif current is not None:
            current.append(line)
    loops = []
    for line in text.splitlines():
        if " while(" in line:
            trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
            body = bodies[re.search(r"body=%?([\w.\-]+)", line).group(1)]
            loops.append((int(trips.group(1)) if trips else None, sum(bool(_COLLECTIVE.search(x)) for x in body)))
    total = sum(bool(_COLLECTIVE.search(x)) for lines in bodies.values() for x in lines)
    return {"loops": loops, "collectives": total, "lines": len(text.splitlines())}


def schedule():
    W0, x0 = problem()
    one = {k: jax.jit(hbpjax.highway_grad(loss, iterations=k))(W0, x0) for k in (None, 2)}
    rows, data = [], []
    for D in DEVICES:
        mesh = jax.make_mesh((D,), ("layers",), devices=jax.devices()[:D], axis_types=(AxisType.Auto,))
        for M in MICROBATCHES:
            with jax.set_mesh(mesh):
                W = jax.device_put(W0, NamedSharding(mesh, P("layers")))
                fn = lambda k: jax.jit(hbpjax.highway_grad(loss, iterations=k, layer_axis="layers", microbatches=M))
                compiled = {k: fn(k).lower(W, x0).compile() for k in (None, 0, 1, 2)}
                got = {k: np.asarray(compiled[k](W, x0)) for k in (None, 2)}
            seen = {k: read(c.as_text()) for k, c in compiled.items()}
            err = max(float(np.linalg.norm(got[k] - one[k]) / np.linalg.norm(one[k])) for k in got)
            ticks = lambda s: [n for n, c in s["loops"] if c]
            if M is None:  # the stages written out one after another: D hops of the whole batch
                fwd_ticks, bwd_ticks, per_tick = D, D, 1
            else:
                fwd_ticks, bwd_ticks = ticks(seen[0])[0], ticks(seen[None])[-1]
                per_tick = max(c for _, c in seen[0]["loops"])
            per_sweep = seen[2]["collectives"] - seen[1]["collectives"]
            # the forward's loops are the ticks (or the D stages' scans) and the chunk's layers: the rest
            # belong to the highway backward (their trip counts)
            # (the exact program runs each forward loop once more, transposed)
            chunk_loops = sum(n == L // D and not c for n, c in seen[None]["loops"]) // 2
            backward_loops = [n for n, c in seen[2]["loops"] if not c]
            for _ in range(chunk_loops):
                backward_loops.remove(L // D)
            m = 1 if M is None else M
            entry = {
                "D": D, "M": M, "forward_ticks": fwd_ticks, "hops_per_tick": per_tick,
                "exact_backward_ticks": bwd_ticks, "collectives_per_sweep": per_sweep,
                "loops_in_highway_backward": backward_loops,
                "forward_bubble": (fwd_ticks - m) / fwd_ticks, "exact_backward_bubble": (bwd_ticks - m) / bwd_ticks,
                "hlo_lines_k2": seen[2]["lines"],
                "temp_mib_k2": compiled[2].memory_analysis().temp_size_in_bytes / 2**20,
                "temp_mib_exact": compiled[None].memory_analysis().temp_size_in_bytes / 2**20,
                "rel_error": err,
            }
            data.append(entry)
            rows.append([
                D, "none" if M is None else M, fwd_ticks, per_tick, f"{entry['forward_bubble']:.0%}",
                bwd_ticks, f"{entry['exact_backward_bubble']:.0%}", per_sweep, ", ".join(map(str, backward_loops)) or "none",
                entry["hlo_lines_k2"], f"{entry['temp_mib_k2']:.2f}", f"{entry['temp_mib_exact']:.2f}", f"{err:.1e}",
            ])
            print(f"D={D} M={M}: ticks {fwd_ticks}, per sweep {per_sweep}", flush=True)
    return rows, data


def inputs():
    """Times on one device (whole batch): forward, backprop, highway k = 0 and 2."""
    W, x = problem()
    fns = {
        "forward": jax.jit(loss),
        "backprop": jax.jit(jax.value_and_grad(loss)),
        "k=0": jax.jit(hbpjax.highway_value_and_grad(loss, iterations=0)),
        "k=2": jax.jit(hbpjax.highway_value_and_grad(loss, iterations=2)),
    }
    with jax.default_device(jax.devices()[0]):
        times = common.time_round_robin({n: (lambda f=f: f(W, x)) for n, f in fns.items()}, REPEATS, warmup=3)
    return {n: float(np.median(t)) for n, t in times.items()}


def cost_model(t: dict):
    """Per (D, M, k): the all-reduce share above which layer-parallel Highway-BP beats data-parallel
    backprop, and its time against GPipe's pipelined exact backward (both layer-parallel)."""
    f = t["forward"] / t["backprop"]
    rows, data = [], []
    for D in (4, 8, 64):
        for M in (4, 16, 64):
            for k in (0, 2):
                h = t[f"k={k}"] / t["backprop"]
                # in units of one device's share of data-parallel backprop compute, T_bp / D
                highway = h + f * (D - 1) / M
                gpipe = 1 + (D - 1) / M
                data.append({"D": D, "M": M, "k": k, "highway": highway, "gpipe": gpipe, "allreduce_break_even": highway - 1})
                rows.append([D, M, k, f"{highway:.2f}", f"{gpipe:.2f}", f"{highway / gpipe:.2f}x", f"{max(highway - 1, 0):.0%}"])
    return f, rows, data


def main():
    env = common.environment()
    sched_rows, sched = schedule()
    times = inputs()
    f, cost_rows, cost = cost_model(times)
    ratio = lambda n: times[n] / times["backprop"]
    md = [
        "# Microbatched layer-parallel schedule",
        "",
        common.env_line(env) + f" {jax.device_count()} simulated devices share the CPU cores.",
        "",
        f"Model: an unmodified `lax.scan` over {L} residual layers (`h + tanh(h @ W)`), width {WIDTH}, batch "
        f"{BATCH}, under `highway_grad(layer_axis=\"layers\", microbatches=M)`, weights sharded over D layer "
        "devices. Everything below is read from the compiled programs (`jax.jit(...).lower(...).compile()`): "
        "the forward's ticks are the trip count of the loop that passes the carry on (hops per tick: the "
        "collectives in its body); the exact backward's (`iterations=None`, JAX's transpose of the same "
        "forward) likewise; collectives per sweep are those of k = 2 minus k = 1; loops in the highway "
        "backward are the while loops of k = 2 beyond the forward's (the exact program's first half). A device works on M of T ticks: "
        "the bubble is (T - M) / T. `none`: no microbatches (the D stages written out one after another, "
        "the whole batch per stage). Rel. error: k = 2 and exact against one device.",
        "",
        common.markdown_table(
            ["D", "M", "forward ticks", "hops / tick", "forward bubble", "exact backward ticks", "exact backward bubble",
             "collectives / highway sweep", "loops in highway backward (trips)", "HLO lines (k=2)", "temp MiB/dev k=2",
             "temp MiB/dev exact", "rel. error"],
            sched_rows,
        ),
        "",
        "The highway backward has no tick loop: every device sweeps its layers for all M microbatches at once",
        "(one microbatch's sweeps, vmapped), so its bubble is 0 and its collectives per sweep do not depend",
        "on M or D. Its one loop (M trips, no collective) adds up the parameters' cotangents microbatch by",
        "microbatch, so a device holds one copy of them, not M. The program does not grow with M (same HLO",
        "size up to shapes, for M >= 2).",
        "",
        "## Cost model",
        "",
        "Inputs, timed on one device in this run (whole batch, medians of "
        f"{REPEATS} round-robin repeats): forward {times['forward'] * 1e3:.2f} ms, backprop "
        f"{times['backprop'] * 1e3:.2f} ms, highway k=0 {times['k=0'] * 1e3:.2f} ms ({ratio('k=0'):.2f}x of backprop's time), "
        f"k=2 {times['k=2'] * 1e3:.2f} ms ({ratio('k=2'):.2f}x). So f = forward / backprop = {f:.2f}, "
        f"h_0 = {ratio('k=0'):.2f}, h_2 = {ratio('k=2'):.2f}.",
        "",
        "Per step, in units of one device's share of data-parallel backprop compute (T_bp / D), with the "
        "work split evenly over devices and microbatches:",
        "",
        "- data-parallel backprop: 1 + a, a = the gradient all-reduce's time in those units;",
        "- layer-parallel, exact pipelined backward (GPipe's schedule): 1 + (D - 1) / M (a bubble in both",
        "  directions);",
        "- layer-parallel Highway-BP with k sweeps: h_k + f (D - 1) / M (a bubble in the forward only; no",
        "  gradient all-reduce: each device owns its layers' parameters).",
        "",
        "Layer-parallel Highway-BP beats data-parallel backprop when a > h_k - 1 + f (D - 1) / M (the last",
        "column: the all-reduce share it needs). Not modelled: the forward's D - 1 carry hops and each",
        "sweep's 2 carry-sized collectives (latency), a smaller microbatch's lower efficiency on an",
        "accelerator, and the per-device memory (layer-parallel holds L / D layers' parameters and",
        "optimizer state, data-parallel all of them). These timings come from a CPU: on an accelerator",
        "h_k and f differ; rerun this script there.",
        "",
        common.markdown_table(
            ["D", "M", "k", "highway (T_bp/D units)", "GPipe exact", "highway / GPipe", "all-reduce share to beat DP"],
            cost_rows,
        ),
    ]
    path = common.write_results("pipeline", "\n".join(md), {"environment": env, "schedule": sched, "times": times, "cost_model": cost})
    print(path.read_text())
    d4 = [row for row in sched_rows if row[0] == 4]
    headers = ["D", "M", "forward ticks", "forward bubble", "exact backward ticks", "exact backward bubble",
               "collectives / highway sweep", "loops in highway backward (trips)", "temp MiB/dev k=2", "temp MiB/dev exact"]
    keep = [0, 1, 2, 4, 5, 6, 7, 8, 10, 11]
    snippet = [
        common.markdown_table(headers, [[row[i] for i in keep] for row in d4]),
        "",
        f"Cost-model inputs from the same run (one device): f = {f:.2f}, h_0 = {ratio('k=0'):.2f}, "
        f"h_2 = {ratio('k=2'):.2f}.",
        "",
        common.markdown_table(
            ["D", "M", "k", "highway (T_bp/D units)", "GPipe exact", "highway / GPipe", "all-reduce share to beat DP"],
            [row for row in cost_rows if row[0] in (8, 64)],
        ),
        "",
        common.env_line(env),
    ]
    common.quote_in_readme("pipeline", "\n".join(snippet))


if __name__ == "__main__":
    main()
