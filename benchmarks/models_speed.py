"""Train-step speed of every example model: backprop vs Highway-BP, forward and backward apart.

For each model and size, in one process, round-robin, after warm-up: the jitted forward (loss only)
and the jitted value-and-gradient of exact backprop and of Highway-BP with k in {0, 1, 2, 5, 10}.
Backward time = train-step time - forward time. Also the sequential depth of the backward (L for
backprop, about (k+1)(1 + log2 L) for Highway-BP) and the compiled temporary memory.

Latency-bound settings (long sequences, narrow state) are where Highway-BP gains on this CPU;
in compute-bound ones every sweep costs a full backward's worth of work (a VJP of every layer), and
on 2 CPU cores that work is not free: expect k >= 1 to be slower there. Timings include the
model's non-residual parts (embeddings, heads, losses), which both methods share.

Run:  python benchmarks/models_speed.py [--repeats 15] [--quick] [--only GPT]
Writes results/models_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hbpjax  # noqa: E402
from hbpjax.examples import data, models  # noqa: E402

KS = (0, 1, 2, 5, 10)


def ce(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def configs(quick):
    corpus, _ = data.char_corpus()
    V = corpus.vocab_size
    rng = np.random.default_rng(0)
    text = lambda b, t: corpus.batch(rng, b, t)
    scale = (lambda t: max(t // 8, 64)) if quick else (lambda t: t)
    images = data.digits()[0][:64], data.digits()[1][:64]
    adding = lambda t: data.adding_task(rng, 8, t)
    mse = lambda m, x, y: ((m(x)[:, 0] - y) ** 2).mean()
    return [
        # name, bound, depth L, model factory, loss, batch
        ("char GRU, hidden 16, T=16384, batch 2", "latency", scale(16384),
         lambda: models.CharRNN(V, hidden=16, rngs=nnx.Rngs(0)), ce, text(2, scale(16384))),
        ("char GRU, hidden 32, T=4096, batch 4", "latency", scale(4096),
         lambda: models.CharRNN(V, hidden=32, rngs=nnx.Rngs(0)), ce, text(4, scale(4096))),
        ("adding task GRU, hidden 16, T=4096, batch 8", "latency", scale(4096),
         lambda: models.SequenceModel(2, 1, hidden=16, rngs=nnx.Rngs(0)), mse, adding(scale(4096))),
        ("minGRU (linear RNN), hidden 32, T=4096, batch 4", "latency", scale(4096),
         lambda: models.CharRNN(V, hidden=32, cell="mingru", rngs=nnx.Rngs(0)), ce, text(4, scale(4096))),
        ("char LSTM, hidden 128, T=256, batch 32", "compute", 256,
         lambda: models.CharRNN(V, hidden=128, cell="lstm", rngs=nnx.Rngs(0)), ce, text(32, 256)),
        ("3 stacked GRUs, hidden 96, T=256, batch 32", "compute", 256,
         lambda: models.CharRNN(V, hidden=96, layers=3, rngs=nnx.Rngs(0)), ce, text(32, 256)),
        ("pre-act ResNet, 2 x 16 blocks, digits, batch 64", "compute", 16,
         lambda: models.PreActResNet(blocks_per_stage=16, rngs=nnx.Rngs(0)), ce, images),
        ("post-ReLU ResNet, 2 x 16 blocks, digits, batch 64", "compute", 16,
         lambda: models.PostReLUResNet(blocks_per_stage=16, rngs=nnx.Rngs(0)), ce, images),
        ("GPT pre-LN, 8 layers, dim 64, T=64, batch 16", "compute", 8,
         lambda: models.GPT(V, dim=64, layers=8, max_len=64, rngs=nnx.Rngs(0)), ce, text(16, 64)),
        ("post-LN Transformer, 8 layers, dim 64, T=64, batch 16", "compute", 8,
         lambda: models.PostLNTransformer(V, dim=64, layers=8, max_len=64, rngs=nnx.Rngs(0)), ce, text(16, 64)),
    ]


def depth(L, k):
    return L if k is None else int((min(k, L - 1) + 1) * (1 + math.ceil(math.log2(L))))


def readme_quote(out) -> str:
    """The table docs/performance.md quotes: every model this script runs, train-step speedup and k=2 memory."""
    rows = []
    for m in out["models"]:
        ms, mem = m["ms"], m["temp_mib"]
        rows.append([m["model"], m["bound"]] + [f"{ms['backprop'] / ms[f'k={k}']:.2f}x" for k in (0, 2, 10)]
                    + [f"{mem['k=2']:.1f} / {mem['backprop']:.1f} MiB"])
    table = common.markdown_table(["model", "bound", "k=0", "k=2", "k=10", "temp memory k=2 / backprop"], rows)
    return table + "\n\n" + common.env_line(out["environment"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="run only the models whose name contains this text")
    args = parser.parse_args()
    from tqdm import tqdm

    env = common.environment()
    out, rows = {"environment": env, "models": []}, []
    for name, bound, L, make, loss_fn, (x, y) in tqdm([c for c in configs(args.quick) if args.only in c[0]], desc="models"):
        model = make()
        # The NNX gradient transforms inside one jax.jit over the split model: they differentiate the
        # nnx.Param leaves and handle the non-parameter state (a raw jax.grad over nnx.merge cannot
        # mutate it), and the whole step stays a plain jitted function for compiled_memory.
        graphdef, state = nnx.split(model)

        def jitted(transform):
            return jax.jit(lambda state, x, y: transform(loss_fn)(nnx.merge(graphdef, state), x, y))

        fns = {"forward": jitted(lambda f: f), "backprop": jitted(nnx.value_and_grad)}
        for k in KS:
            fns[f"k={k}"] = jitted(lambda f, k=k: hbpjax.nnx.value_and_grad(f, iterations=k))
        times = common.time_round_robin({n: (lambda f: lambda: f(state, x, y))(f) for n, f in fns.items()}, args.repeats)
        med = {n: float(np.median(t)) for n, t in times.items()}
        mem = {n: common.compiled_memory(fns[n], state, x, y)["temp"] / 2**20 for n in ("backprop", "k=2")}
        entry = {"model": name, "bound": bound, "L": L, "ms": {n: 1e3 * v for n, v in med.items()}, "temp_mib": mem}
        out["models"].append(entry)
        fwd = med["forward"]
        for n in ["backprop"] + [f"k={k}" for k in KS]:
            k = None if n == "backprop" else int(n[2:])
            rows.append([name if n == "backprop" else "", bound if n == "backprop" else "", n,
                         f"{1e3 * med[n]:.1f}", f"{1e3 * fwd:.1f}", f"{1e3 * max(med[n] - fwd, 0):.1f}",
                         f"{med['backprop'] / med[n]:.2f}x", depth(L, k),
                         f"{mem[n]:.1f}" if n in mem else ""])
    md = ["# Model speed: backprop vs Highway-BP", "", common.env_line(env) + f" Median of {args.repeats} round-robin runs after warm-up.", "",
          "Train step = jitted value and gradient. Backward = train step - forward. Depth = sequential",
          "steps of the backward (L for backprop, (k+1)(1+log2 L) for Highway-BP). Memory = compiled",
          "temporaries (XLA buffer assignment), shown for backprop and k=2.", "",
          common.markdown_table(["model", "bound", "method", "step ms", "forward ms", "backward ms", "speedup", "depth", "temp MiB"], rows)]
    path = common.write_results("models_speed" + ("_quick" if args.quick else ""), "\n".join(md), out)
    if not args.quick and common.quote_in_readme("models_speed", readme_quote(out)):
        print("updated the documents' quote of these results")
    print(path.read_text())


if __name__ == "__main__":
    main()
