"""`make demo`: train one real task with `nnx.grad` and with `hbpjax.nnx.grad`, side by side.

The model is written with Flax's own modules only (``nnx.Embed``, ``nnx.RNN(nnx.GRUCell)``,
``nnx.Linear``): nothing in it knows about hbpjax. Swapping ``nnx.value_and_grad`` for
``hbpjax.nnx.value_and_grad`` in the train step is the whole change; the GRU's scan is found and
its backward runs as Highway-BP.

Default: a character-level language model on long sequences of the standard library's
documentation (``pydoc_data.topics``; no network), a latency-bound setting (narrow state, long
sequence) where Highway-BP is faster on a CPU. Both runs start from the same initialisation, see
the same batches and take their steps in turn (interleaved timing). Prints a table (step time,
speedup, losses at the same step, the training wall-clock until the validation loss first reaches
backprop's final one, gradient cosine to exact backprop) and writes a loss-vs-wall-clock plot.
Highway-BP trains ``--extra`` (default 0.5) times ``--steps`` longer, so that its time to backprop's
final loss is measured even when it needs more steps to get there.

Run:  python benchmarks/demo.py [--task char|pixel] [--k 2] [--steps 150] [--extra 0.5] [--seq-len 8192] [--quote-readme]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hbpjax  # noqa: E402
from hbpjax.examples import data, train  # noqa: E402


class CharLM(nnx.Module):
    """A character-level language model made of Flax's own modules, as anyone would write it."""

    def __init__(self, vocab_size: int, hidden: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, hidden, rngs=rngs)
        self.rnn = nnx.RNN(nnx.GRUCell(hidden, hidden, rngs=rngs))
        self.head = nnx.Linear(hidden, vocab_size, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.rnn(self.embed(tokens)))


class PixelClassifier(nnx.Module):
    """Flax's ``nnx.RNN(nnx.GRUCell)`` over a digit's 64 pixels, read at the last step."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.rnn = nnx.RNN(nnx.GRUCell(1, hidden, rngs=rngs))
        self.head = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.rnn(x)[:, -1])


def char_task(args):
    corpus, name = data.char_corpus(online=False)
    rng = np.random.default_rng(0)
    batches = [corpus.batch(rng, args.batch, args.seq_len) for _ in range(args.steps + int(args.extra * args.steps))]
    val = [corpus.batch(np.random.default_rng(1), args.batch, args.seq_len, split="val") for _ in range(2)]

    def make_model():
        return CharLM(corpus.vocab_size, args.hidden, rngs=nnx.Rngs(0))

    def loss_fn(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    def evaluate(model):
        return {"val_loss": np.mean([float(nnx.jit(loss_fn)(model, x, y)) for x, y in val])}

    title = f"char-level LM, Flax nnx.RNN(nnx.GRUCell), on {name}: hidden {args.hidden}, batch {args.batch}, sequence {args.seq_len}"
    return title, make_model, (lambda i: batches[i % len(batches)]), loss_fn, evaluate, val[0]


def pixel_task(args):
    x_train, y_train, x_test, y_test = data.pixel_digits()
    rng = np.random.default_rng(0)
    order = [rng.integers(0, len(x_train), args.batch) for _ in range(args.steps + int(args.extra * args.steps))]

    def make_model():
        return PixelClassifier(args.hidden, rngs=nnx.Rngs(0))

    def loss_fn(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    def evaluate(model):
        logits = nnx.jit(lambda m, x: m(x))(model, x_test)
        return {"val_loss": float(loss_fn(model, x_test, y_test)), "accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y_test))}

    title = f"pixel-by-pixel digits (sequence 64), Flax nnx.RNN(nnx.GRUCell), hidden {args.hidden}"
    return title, make_model, (lambda i: (x_train[order[i]], y_train[order[i]])), loss_fn, evaluate, (x_test[:256], y_test[:256])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["char", "pixel"], default="char")
    parser.add_argument("--k", type=int, default=2, help="Highway-BP sweeps")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--extra", type=float, default=0.5,
                        help="Highway-BP trains this fraction of --steps longer, to measure its time to backprop's final loss")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default=str(common.RESULTS / "demo"), help="output stem (.md and .png)")
    parser.add_argument("--quote-readme", action="store_true", help="also quote the table in README.md (maintainers)")
    args = parser.parse_args()
    if args.task == "pixel" and args.seq_len == 8192:
        args.batch, args.hidden = 64, 64

    env = common.environment()
    print(f"hbpjax {hbpjax.__version__} | jax {env['jax']} | {env['devices']} | {env['cpu_cores']} cores")
    title, make_model, batches, loss_fn, evaluate, probe = (char_task if args.task == "char" else pixel_task)(args)
    print(title)
    print(hbpjax.find_stacks(lambda m, x, y: loss_fn(m, x, y), make_model(), *batches(0)))
    start = time.perf_counter()
    methods = [train.Method("exact"), train.Method("highway", k=args.k)]
    runs = train.train_interleaved(
        make_model, methods, batches, loss_fn, steps=args.steps, learning_rate=args.lr, evaluate=evaluate,
        eval_every=max(args.steps // 15, 1), extra_steps={methods[1].label: int(args.extra * args.steps)},
    )
    print(f"  {args.steps} steps of each in {time.perf_counter() - start:.0f} s, taking turns; compile + first step: "
          + ", ".join(f"{label} {h.compile_seconds:.1f} s" for label, (_, h) in runs.items()))

    # Gradient agreement of highway with exact backprop, on the exact run's final model.
    x, y = probe
    cosines = train.gradient_cosines(runs["backprop"][0], loss_fn, x, y, iterations=(args.k,))
    base = runs["backprop"][1].step_seconds
    # Time to target: training wall-clock until the validation loss first reaches backprop's final
    # one (Highway-BP may train longer, --extra, to get there); the other columns are at --steps.
    target = runs["backprop"][1].final("val_loss")
    reached = {label: next((wall for _, wall, m in h.evals if m["val_loss"] <= target), None) for label, (_, h) in runs.items()}
    at_steps = lambda h: next(m for step, _, m in h.evals if step == args.steps)
    rows = []
    for label, (_, h) in runs.items():
        cos = "1 (reference)" if label == "backprop" else f"{cosines[args.k][0]:.4f}"
        metrics = at_steps(h)
        extra = f" | {metrics['accuracy']:.3f}" if "accuracy" in metrics else ""
        steps_taken = h.steps[-1]
        when = (f"not reached in {steps_taken} steps" if reached[label] is None
                else f"{reached[label]:.1f} s ({reached[label] / reached['backprop']:.2f}x)")
        rows.append(f"| {label} | {1e3 * h.step_seconds:.1f} | {base / h.step_seconds:.2f}x | "
                    f"{np.mean(h.loss[args.steps - 5 : args.steps]):.3f} | {metrics['val_loss']:.3f}{extra} | {when} | {cos} |")
    header = f"| method | step ms (median) | speedup | train loss at step {args.steps} | val loss at step {args.steps}"
    header += " | test accuracy" if args.task == "pixel" else ""
    header += f" | time to val loss {target:.3f} (backprop's final) | gradient cosine to backprop |"
    table = "\n".join([header, "|" + "---|" * (header.count("|") - 1)] + rows)
    print("\n" + table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, (_, h) in runs.items():
        smooth = np.convolve(h.loss, np.ones(5) / 5, mode="valid")
        ax.plot(np.asarray(h.wall)[4:], smooth, label=f"{label} ({1e3 * h.step_seconds:.0f} ms/step)")
    ax.set_xlabel("training wall-clock (s, compilation excluded)")
    ax.set_ylabel("training loss (5-step average)")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)
    md = [f"# Demo: {title}", "", common.env_line(env) + f" {args.steps} steps, Adam lr {args.lr}.", "", table, "",
          f"![loss vs wall-clock]({out.with_suffix('.png').name})"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    if args.quote_readme:
        common.quote_in_readme("demo", "\n".join(md[2:-1]))


if __name__ == "__main__":
    main()
