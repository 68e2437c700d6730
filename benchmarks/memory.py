"""Compiled memory of the Highway-BP backward, and what is in it.

1. Compiled temporary memory (XLA's buffer assignment, ``memory_analysis()``) of one jitted
   value-and-gradient step, backprop against Highway-BP k=0, k=2 and k=2 with
   ``save_linearization=False``, on the long GRU of ``core_speed.py`` and on the char GRU, the
   pre-activation ResNet and the GPT of ``models_speed.py``.
2. An accounting of the long GRU's k=2 step: every buffer of at least half a carry-sized stack that
   is alive at the step's memory peak, read off XLA's own dump of the compiled program (its buffer
   live ranges), with the operation that makes it.

Run:  python benchmarks/memory.py        writes results/memory.{md,json}
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

ROLES = [  # (pattern in the op name, what the buffer is)
    ("while/body", "sweep temporary (the VJP of all layers, the right-hand side, the scan)"),
    ("jit(plan)", "prefix-scan plan (products of K over spans)"),
    ("jit(solve)", "a solve of the prefix scan (w)"),
    ("jvp(jvp(vmap", "linearization residual (what the VJP of all layers reads)"),
    ("concatenate", "K of the next layer (shifted)"),
    ("jvp()/sub", "the loss's own forward value (h - target)"),
    ("broadcast_in_dim", "forward outputs / saved carries"),
]


def measure():
    import jax
    from flax import nnx

    sys.path.insert(0, str(HERE))
    import common
    import models_speed
    from core_speed import gru_problem

    import hbpjax

    MiB = 2**20
    rows, data = [], {}
    make_loss, args = gru_problem(16384, 16, 4)
    loss = make_loss(1)
    variants = {
        "backprop": jax.value_and_grad(loss),
        "k=0": hbpjax.highway_value_and_grad(loss, iterations=0),
        "k=2": hbpjax.highway_value_and_grad(loss, iterations=2),
        "k=2, save_linearization=False": hbpjax.highway_value_and_grad(loss, iterations=2, save_linearization=False),
    }
    mem = {n: common.compiled_memory(f, *args)["temp"] / MiB for n, f in variants.items()}
    data["GRU T=16384, hidden 16, batch 4 (core_speed)"] = mem
    for name, _, _, make, loss_fn, (x, y) in models_speed.configs(False):
        if not any(w in name for w in ("char GRU, hidden 16", "pre-act ResNet", "GPT pre-LN")):
            continue
        graphdef, state = nnx.split(make())
        step = lambda t: (lambda state, x, y: t(loss_fn)(nnx.merge(graphdef, state), x, y))
        transforms = {
            "backprop": nnx.value_and_grad,
            "k=0": lambda f: hbpjax.nnx.value_and_grad(f, iterations=0),
            "k=2": lambda f: hbpjax.nnx.value_and_grad(f, iterations=2),
            "k=2, save_linearization=False": lambda f: hbpjax.nnx.value_and_grad(f, iterations=2, save_linearization=False),
        }
        data[name] = {n: common.compiled_memory(step(t), state, x, y)["temp"] / MiB for n, t in transforms.items()}
    for name, m in data.items():
        b = m["backprop"]
        rows.append([name, f"{b:.1f}"] + [f"{m[n]:.1f} ({m[n] / b:.2f}x)" for n in list(m)[1:]])
    return data, rows


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
    ranges = [(m.group(1), int(m.group(3)), int(m.group(4)))
              for m in re.finditer(r"^\s+(\S+?)(\{[^}]*\})?:(\d+)-(\d+)$", live_text.split("BufferLiveRange")[1], re.M)]
    shapes = dict(re.findall(r"%([\w.\-]+) = (\S+) ", hlo_text))
    params = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(", hlo_text))
    consts = set(re.findall(r"%([\w.\-]+) = \S+ constant\(", hlo_text))

    def size(name):
        m = re.match(r"(f32|s32|f64)\[([\d,]*)\]", shapes.get(name, ""))
        if not m or name in params or name in consts:
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
            meta = re.search(r"%" + re.escape(name) + r" = [^\n]*op_name=\"([^\"]*)\"", hlo_text)
            op = meta.group(1) if meta else ""
            role = next((r for p, r in ROLES if p in op), "other")
            out.append((size(name) / 2**20, name, op, role))
    return total[peak] / 2**20, sorted(out, key=lambda r: (r[3], -r[0]))


def main():
    sys.path.insert(0, str(HERE))
    import common

    data, rows = measure()
    peak, buffers = accounting()
    env = common.environment()
    md = [
        "# Backward memory: Highway-BP against backprop, and what it holds",
        "",
        common.env_line(env) + " Compiled temporary memory (MiB) of one jitted value-and-gradient step "
        "(`memory_analysis()`; inputs and outputs not included); in brackets the ratio to backprop. The "
        "goal was k=2 within 1.3x of backprop.",
        "",
        common.markdown_table(["model", "backprop", "k=0", "k=2", "k=2, save_linearization=False"], rows),
        "",
        f"## What the long GRU's k=2 step holds at its memory peak ({peak:.1f} MiB of temporaries)",
        "",
        "Every buffer of 2 MiB or more alive at the peak (a carry-sized stack, T x batch x hidden float32, "
        "is 4 MiB), from XLA's dump of the compiled program (buffer live ranges), with the operation "
        "that makes it. Buffers not listed are smaller (the plan's upper levels, solve temporaries).",
        "",
        common.markdown_table(["MiB", "what it is", "made by (XLA op name)"], [[f"{s:.1f}", r, f"`{op[-90:]}`"] for s, _, op, r in buffers]),
    ]
    path = common.write_results("memory", "\n".join(md), {"environment": env, "temp_mib": data, "peak_mib": peak,
                                                           "peak_buffers": [dict(mib=s, name=n, op=o, role=r) for s, n, o, r in buffers]})
    print(path.read_text())


if __name__ == "__main__":
    main()
