"""Train-step time of ``jax.value_and_grad`` vs ``hbpjax.highway_value_and_grad`` on residual stacks.

Configurations (issue #2):
  gru_long   GRU-style gated stack, T=16384, hidden 16, batch 4      (latency-bound)
  mlp_deep   additive residual MLP, L=2048, width 16, batch 4        (latency-bound)
  gru_wide   GRU, T=1024, hidden 128, batch 32                       (compute-bound)

Every method is measured with the forward scan unrolled 1x and 8x (``residual_scan(unroll=...)``,
which is passed to ``lax.scan`` in both methods); speedups are against the *fastest* exact variant.
Also reports the compiled memory (XLA buffer assignment) of exact vs highway on gru_long.

Run:  python benchmarks/core_speed.py [--repeats 9] [--quick]
Writes results/core_speed.{md,json,png}.
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

SWEEPS = (0, 1, 2, 5)
UNROLLS = (1, 8)


def gru_problem(T, H, B, d_in=16, *, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    s = 1.0 / np.sqrt(H)
    params = {
        "Wz": jax.random.normal(ks[0], (d_in, H)) / np.sqrt(d_in),
        "Uz": s * jax.random.normal(ks[1], (H, H)),
        "bz": jnp.zeros(H),
        "Wh": jax.random.normal(ks[2], (d_in, H)) / np.sqrt(d_in),
        "Uh": s * jax.random.normal(ks[3], (H, H)),
        "bh": jnp.zeros(H),
    }
    xs = jax.random.normal(ks[4], (T, B, d_in))
    targets = jax.random.normal(ks[5], (T, B, H))

    def make_loss(unroll):
        def loss(params, xs):
            def cell(h, x):
                u = jax.nn.sigmoid(x @ params["Wz"] + h @ params["Uz"] + params["bz"])
                c = jnp.tanh(x @ params["Wh"] + h @ params["Uh"] + params["bh"])
                return 1.0 - u, u * c

            _, hs = hbpjax.residual_scan(cell, jnp.zeros((B, H)), xs, residual=hbpjax.residual.gated, unroll=unroll)
            return jnp.mean((hs - targets) ** 2)

        return loss

    return make_loss, (params, xs)


def mlp_problem(L, W, B, *, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    params = {
        "W": jax.random.normal(ks[0], (L, W, W)) / np.sqrt(W * L),
        "b": jnp.zeros((L, W)),
    }
    x = jax.random.normal(ks[1], (B, W))
    target = jax.random.normal(ks[2], (B, W))

    def make_loss(unroll):
        def loss(params, x):
            h, _ = hbpjax.residual_scan(lambda h, p: jnp.tanh(h @ p["W"] + p["b"]), x, params, unroll=unroll)
            return jnp.mean((h - target) ** 2)

        return loss

    return make_loss, (params, x)


CONFIGS = {
    "gru_long": ("GRU T=16384, hidden 16, batch 4", "latency", lambda q: gru_problem(4096 if q else 16384, 16, 4)),
    "mlp_deep": ("residual MLP L=2048, width 16, batch 4", "latency", lambda q: mlp_problem(512 if q else 2048, 16, 4)),
    "gru_wide": ("GRU T=1024, hidden 128, batch 32", "compute", lambda q: gru_problem(256 if q else 1024, 128, 32)),
}

#: The goals (docs/performance.md) for the best speedup over backprop (not lower numbers the runs happen to meet):
#: latency-bound stacks k=0 >= 2.5x and k=2 >= 2.0x; compute-bound, k=0 within 10 % of backprop.
GOALS = {"latency": {0: 2.5, 2: 2.0}, "compute": {0: 0.9}}


def method_name(k):
    return "jax.value_and_grad" if k is None else f"highway k={k}"


def run(repeats, quick):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        tqdm = None
    env = common.environment()
    results = {"environment": env, "configs": {}}
    for key, (title, kind, build) in CONFIGS.items():
        make_loss, args = build(quick)
        fns, labels = {}, {}
        for unroll in UNROLLS:
            loss = make_loss(unroll)
            fns[f"forward u{unroll}"] = (lambda f: lambda: f(*args))(jax.jit(loss))
            for k in (None,) + SWEEPS:
                vg = jax.value_and_grad(loss) if k is None else hbpjax.highway_value_and_grad(loss, iterations=k)
                name = f"{method_name(k)} u{unroll}"
                fns[name] = (lambda f: lambda: f(*args))(jax.jit(vg))
                labels[name] = (k, unroll)
        bar = tqdm(total=repeats, desc=key) if tqdm else None
        times = common.time_round_robin(fns, repeats, progress=bar)
        if bar:
            bar.close()
        med = {name: float(np.median(t)) for name, t in times.items()}
        best_exact = min(med[f"{method_name(None)} u{u}"] for u in UNROLLS)
        rows = []
        for name, (k, unroll) in labels.items():
            same = med[f"{method_name(None)} u{unroll}"]
            rows.append(dict(method=method_name(k), k=k, unroll=unroll, ms=1e3 * med[name],
                             speedup_same_unroll=same / med[name], speedup_vs_best_exact=best_exact / med[name]))
        forward = {u: 1e3 * med[f"forward u{u}"] for u in UNROLLS}
        best = {}
        for k in SWEEPS:
            best[k] = max(r["speedup_vs_best_exact"] for r in rows if r["k"] == k)
        goals = check_goals(kind, best)
        results["configs"][key] = dict(title=title, kind=kind, rows=rows, forward_ms=forward,
                                       best_exact_ms=1e3 * best_exact, best_speedup=best, goals=goals)
        print(f"\n{title}: best exact {1e3 * best_exact:.1f} ms; best highway speedups "
              + ", ".join(f"k={k}: {v:.2f}x" for k, v in best.items()))
    results["memory"] = memory(quick)
    return results


def check_goals(kind, best):
    """``{k: (speedup, goal, met)}`` for the goals of this kind of stack."""
    return {k: (best[k], goal, best[k] >= goal) for k, goal in GOALS[kind].items()}


def memory(quick):
    make_loss, args = CONFIGS["gru_long"][2](quick)
    loss = make_loss(1)
    T, B, _ = args[1].shape
    H = args[0]["Uz"].shape[0]
    out = {"config": CONFIGS["gru_long"][0], "carry_stack_bytes": T * B * H * 4}
    out["exact"] = common.compiled_memory(jax.value_and_grad(loss), *args)
    for k in (0, 2):
        out[f"highway k={k}"] = common.compiled_memory(hbpjax.highway_value_and_grad(loss, iterations=k), *args)
    return out


def report(results, repeats, quick):
    env = results["environment"]
    parts = ["# Core speed: `jax.value_and_grad` vs `hbpjax.highway_value_and_grad`", ""]
    parts.append(common.env_line(env) + f" Median of {repeats} interleaved runs after warm-up"
                 + (" (--quick sizes)." if quick else "."))
    parts.append("")
    parts.append("Speedup = time of the fastest exact variant / time of this variant (higher is better).")
    parts += ["", "## Summary (best unroll per method)", "", summary_table(results)]
    for key, c in results["configs"].items():
        rows = [[r["method"], r["unroll"], f"{r['ms']:.2f}", f"{r['speedup_same_unroll']:.2f}x",
                 f"{r['speedup_vs_best_exact']:.2f}x"] for r in c["rows"]]
        parts += ["", f"## {c['title']} ({c['kind']}-bound)", "",
                  common.markdown_table(["method", "unroll", "ms / step", "vs exact, same unroll", "vs best exact"], rows),
                  "", "Forward alone (sequential in both methods, a bound on any speedup): "
                  + ", ".join(f"unroll {u}: {ms:.1f} ms" for u, ms in c["forward_ms"].items()) + "."]
        checks = [f"k={k}: {got:.2f}x (goal {goal}x) {'met' if ok else 'MISSED'}" for k, (got, goal, ok) in c["goals"].items()]
        parts.append("Goals (docs/performance.md): " + "; ".join(checks) + ".")
    m = results["memory"]
    mib = lambda b: f"{b / 2**20:.1f}"
    rows = [[name, mib(v["temp"]), mib(v["argument"]), mib(v["output"])] for name, v in m.items() if isinstance(v, dict)]
    parts += ["", f"## Compiled memory, {m['config']} (XLA buffer assignment, MiB)", "",
              common.markdown_table(["method", "temp", "arguments", "outputs"], rows), "",
              f"One carry-sized stack (T x batch x hidden float32) is {mib(m['carry_stack_bytes'])} MiB."]
    return "\n".join(parts)


def summary_table(results):
    rows = []
    for c in results["configs"].values():
        rows.append([c["title"], c["kind"], f"{c['best_exact_ms']:.1f}"] + [f"{c['best_speedup'][k]:.2f}x" for k in SWEEPS])
    return common.markdown_table(["configuration", "bound", "exact ms"] + [f"k={k}" for k in SWEEPS], rows)


def readme_quote(results):
    m = results["memory"]
    mem = ", ".join(f"{name} {v['temp'] / 2**20:.1f} MiB" for name, v in m.items() if isinstance(v, dict))
    return (summary_table(results) + "\n\n" + common.env_line(results["environment"])
            + f" Compiled temporary memory on the long GRU: {mem} (one carry stack is "
            + f"{m['carry_stack_bytes'] / 2**20:.1f} MiB).")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(results["configs"])
    for i, (key, c) in enumerate(results["configs"].items()):
        xs = np.arange(len(SWEEPS)) + i * width
        ax.bar(xs, [c["best_speedup"][k] for k in SWEEPS], width, label=c["title"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(SWEEPS)) + width * (len(results["configs"]) - 1) / 2)
    ax.set_xticklabels([f"k={k}" for k in SWEEPS])
    ax.set_ylabel("speedup over jax.value_and_grad")
    ax.set_title("Train-step speedup (CPU, " + results["environment"]["date"][:10] + ")")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not for quoting)")
    parser.add_argument("--name", default=None, help="results file stem (default core_speed, or core_speed_quick)")
    args = parser.parse_args()
    results = run(args.repeats, args.quick)
    name = args.name or ("core_speed_quick" if args.quick else "core_speed")
    md = common.write_results(name, report(results, args.repeats, args.quick), results)
    plot(results, md.with_suffix(".png"))
    if not args.quick and common.quote_in_readme("core_speed", readme_quote(results)):
        print("updated the documents' quote of these results")
    print(f"\nwrote {md} and {md.with_suffix('.png')}")
    print(md.read_text())


if __name__ == "__main__":
    main()
