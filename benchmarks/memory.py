"""Compiled memory of the Highway-BP backward, and what is in it.

1. Compiled temporary memory (XLA's buffer assignment, ``memory_analysis()``) of one jitted
   value-and-gradient step, backprop against Highway-BP k=0, k=2 and k=2 with
   ``save_linearization=False``, on the long GRU of ``core_speed.py`` and on the char GRU, the
   char LSTM, the pre-activation ResNet and the GPT of ``models_speed.py``; and the train step's time for each
   (interleaved), so the cost of ``save_linearization=False`` is measured beside what it saves.
2. An accounting of the long GRU's k=2 step: every buffer of at least half a carry-sized stack that
   is alive at the step's memory peak, read off XLA's own dump of the compiled program (its buffer
   live ranges), with the operation that makes it.

Run:  python benchmarks/memory.py [--repeats 7] [--name memory]   writes results/<name>.{md,json}
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NO_SAVE = "k=2, save_linearization=False"

ROLES = [  # (pattern in the op name, what the buffer is), first match wins
    ("while/body", "sweep temporary (inside a loop over the sweeps)"),
    ("jvp()/while", "the carries the forward saved (the layers' inputs)"),
    ("jit(prepare)", "prefix-scan preparation (products of K over spans)"),
    ("jit(solve)", "a solve of the prefix scan"),
    ("transpose(jvp(transpose(jvp(vmap", "a sweep's VJP of all layers (J^T y and the products it sums)"),
    ("linearization", "linearization of the layers (the values the VJP of all layers reads)"),
    ("transpose(jvp())/add", "right-hand side of the scan (b from outside, or b + the blocks' terms)"),
    ("concatenate", "the sweeps' estimate y, shifted to the layers' outputs (what the VJPs read)"),
    ("jvp()/sub", "the loss's own forward value (h - target)"),
    ("broadcast_in_dim", "forward outputs / saved carries"),
]


def measure(repeats):
    import jax
    from flax import nnx

    sys.path.insert(0, str(HERE))
    import common
    import models_speed
    from core_speed import gru_problem

    import hbpjax

    MiB = 2**20
    problems = {}  # model -> {variant: (value-and-grad function, args)}
    make_loss, args = gru_problem(16384, 16, 4)
    loss = make_loss(1)
    problems["GRU T=16384, hidden 16, batch 4 (core_speed)"] = {
        "backprop": (jax.value_and_grad(loss), args),
        "k=0": (hbpjax.highway_value_and_grad(loss, iterations=0), args),
        "k=2": (hbpjax.highway_value_and_grad(loss, iterations=2), args),
        NO_SAVE: (hbpjax.highway_value_and_grad(loss, iterations=2, save_linearization=False), args),
    }
    for name, _, _, make, loss_fn, (x, y) in models_speed.configs(False):
        if not any(w in name for w in ("char GRU, hidden 16", "char LSTM", "pre-act ResNet", "GPT pre-LN")):
            continue
        graphdef, state = nnx.split(make())
        step = lambda t, graphdef=graphdef, loss_fn=loss_fn: (lambda state, x, y: t(loss_fn)(nnx.merge(graphdef, state), x, y))
        problems[name] = {
            "backprop": (step(nnx.value_and_grad), (state, x, y)),
            "k=0": (step(lambda f: hbpjax.nnx.value_and_grad(f, iterations=0)), (state, x, y)),
            "k=2": (step(lambda f: hbpjax.nnx.value_and_grad(f, iterations=2)), (state, x, y)),
            NO_SAVE: (step(lambda f: hbpjax.nnx.value_and_grad(f, iterations=2, save_linearization=False)), (state, x, y)),
        }
    memory, times, mem_rows, time_rows = {}, {}, [], []
    for name, variants in problems.items():
        memory[name] = {n: common.compiled_memory(f, *a)["temp"] / MiB for n, (f, a) in variants.items()}
        jitted = {n: (lambda f, a: lambda: f(*a))(jax.jit(f), a) for n, (f, a) in variants.items()}
        times[name] = {n: 1e3 * float(np.median(t)) for n, t in common.time_round_robin(jitted, repeats).items()}
        m, t = memory[name], times[name]
        mem_rows.append([name, f"{m['backprop']:.1f}"] + [f"{m[n]:.1f} ({m[n] / m['backprop']:.2f}x)" for n in list(m)[1:]])
        time_rows.append([name, f"{t['backprop']:.1f}"] + [f"{t[n]:.1f} ({t['backprop'] / t[n]:.2f}x)" for n in list(t)[1:]])
        print(name, {n: round(v, 1) for n, v in m.items()}, {n: round(v, 1) for n, v in t.items()}, flush=True)
    return memory, times, mem_rows, time_rows


def accounting():
    """Buffers alive at the memory peak of the long GRU's k=2 step, from XLA's dump."""
    with tempfile.TemporaryDirectory() as dump:
        env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
        code = (
            "import sys; sys.path.insert(0, %r)\n"
            "import jax, hbpjax\nfrom core_speed import gru_problem\n"
            "make_loss, args = gru_problem(16384, 16, 4)\n"
            "def loss(*a): return make_loss(1)(*a)\n"
            "jax.jit(hbpjax.highway_value_and_grad(loss, iterations=2)).lower(*args).compile()\n" % str(HERE)
        )
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        live = sorted(glob.glob(f"{dump}/*jit_loss*cpu_after_optimizations-live-range.txt"))[-1]
        hlo = live.replace("-live-range.txt", ".txt")
        return _peak(open(live).read(), open(hlo).read())


def _peak(live_text, hlo_text):
    ranges = [(m.group(1) + (m.group(2) if m.group(2) not in (None, "{}") else ""), int(m.group(3)), int(m.group(4)))
              for m in re.finditer(r"^\s+(\S+?)(\{[^}]*\})?:(\d+)-(\d+)$", live_text.split("BufferLiveRange")[1], re.M)]
    shapes = dict(re.findall(r"%([\w.\-]+) = (\S+) ", hlo_text))
    # Tuple-shaped results (a while loop's carries): one buffer per element, named "name{i}".
    for name, elements in re.findall(r"%([\w.\-]+) = \(([^()]*)\) ", hlo_text):
        for i, element in enumerate(re.findall(r"[a-z]\w*\[[\d,]*\]", elements)):
            shapes[f"{name}{{{i}}}"] = element
    params = set(re.findall(r"%([\w.\-]+) = (?:\([^()]*\)|\S+) parameter\(", hlo_text))
    consts = set(re.findall(r"%([\w.\-]+) = \S+ constant\(", hlo_text))

    def size(name):
        m = re.match(r"(f32|s32|f64)\[([\d,]*)\]", shapes.get(name, ""))
        if not m or name.split("{")[0] in params or name in consts:
            return 0
        n = 1
        for d in filter(None, m.group(2).split(",")):
            n *= int(d)
        return n * (8 if m.group(1) == "f64" else 4)

    end = max(e for _, _, e in ranges) + 1
    total = [0] * end
    for name, s, e in ranges:
        for t in range(s, e + 1):
            total[t] += size(name)
    peak = max(range(end), key=total.__getitem__)
    out = []
    for name, s, e in ranges:
        if s <= peak <= e and size(name) >= 2**21:
            meta = re.search(r"%" + re.escape(name.split("{")[0]) + r" = [^\n]*op_name=\"([^\"]*)\"", hlo_text)
            op = meta.group(1) if meta else ""
            role = next((r for p, r in ROLES if p in op), "other")
            out.append((size(name) / 2**20, name, op, role))
    return total[peak] / 2**20, sorted(out, key=lambda r: (r[3], -r[0]))


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant (interleaved)")
    parser.add_argument("--name", default="memory",
                        help="results file name; anything but 'memory' leaves the documents' quote alone "
                        "(for a run with another jax version)")
    options = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import common

    memory, times, mem_rows, time_rows = measure(options.repeats)
    peak, buffers = accounting()
    env = common.environment()
    headers = ["model", "backprop", "k=0", "k=2", NO_SAVE]
    md = [
        "# Backward memory: Highway-BP against backprop, and what it holds",
        "",
        common.env_line(env) + " Compiled temporary memory (MiB) of one jitted value-and-gradient step "
        "(`memory_analysis()`; inputs and outputs not included); in brackets the ratio to backprop. The "
        "goal (docs/performance.md) is k=2 within 1.3x of backprop.",
        "",
        common.markdown_table(headers, mem_rows),
        "",
        f"Train-step time (ms, median of {options.repeats} interleaved runs after warm-up, same process); in "
        "brackets the speedup over backprop:",
        "",
        common.markdown_table(headers, time_rows),
        "",
        f"## What the long GRU's k=2 step holds at its memory peak ({peak:.1f} MiB of temporaries)",
        "",
        "Every buffer of 2 MiB or more alive at the peak (a carry-sized stack, T x batch x hidden float32, "
        "is 4 MiB), from XLA's dump of the compiled program (buffer live ranges), with the operation "
        "that makes it. Buffers not listed are smaller (the plan's upper levels, solve temporaries).",
        "",
        common.markdown_table(["MiB", "what it is", "made by (XLA op name)"], [[f"{s:.1f}", r, f"`{op[-90:]}`"] for s, _, op, r in buffers]),
    ]
    path = common.write_results(options.name, "\n".join(md), {
        "environment": env, "temp_mib": memory, "step_ms": times, "peak_mib": peak,
        "peak_buffers": [dict(mib=s, name=n, op=o, role=r) for s, n, o, r in buffers]})
    quote = "\n".join([
        "Temporary memory, MiB (ratio to backprop):", "", common.markdown_table(headers, mem_rows), "",
        "Train-step time, ms (speedup over backprop):", "", common.markdown_table(headers, time_rows), "",
        common.env_line(env),
    ])
    if options.name == "memory" and common.quote_in_readme("memory", quote):
        print("updated the documents' quote of these results")
    print(path.read_text())


if __name__ == "__main__":
    main()
