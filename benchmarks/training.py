"""Training and gradient fidelity: exact backprop vs Highway-BP, fixed-point iteration and TBPTT.

Each experiment trains one model on one offline task with every method, from the same
initialisation and the same batches, and records loss against steps and against wall-clock
(compilation excluded) plus the task metric. It also measures gradient fidelity — cosine similarity
and relative error of the highway (and FPI) gradient to the exact one for several k — at
initialisation and after training (on the exactly trained model).

Experiments (``--only`` picks some; ``--quick`` shortens every run for a smoke test):
  digits_preact    pre-activation ResNet on sklearn digits (test accuracy)
  digits_postrelu  post-ReLU ResNet on sklearn digits
  pixel_gru        GRU on pixel-by-pixel digits, sequence 64 (test accuracy)
  char_gru         character-level GRU LM, sequence 256 (validation loss)
  char_lstm        character-level LSTM LM, sequence 256
  char_stacked     3 stacked GRU layers with residual connections, sequence 256
  char_mingru      2 stacked minGRU (linear diagonal recurrence) layers: exact at k=0
  gpt              GPT-2-style pre-LN Transformer (gamma 0.2), sequence 64
  postln           post-LN Transformer (gamma 0.8), sequence 64
  adding           the adding problem, sequence 256, GRU

Run:  python benchmarks/training.py [--only char_gru pixel_gru] [--quick]
Writes results/training.{md,json}, results/fidelity.md and results/training_<experiment>.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from hbpjax.examples import data, models, train  # noqa: E402

M = train.Method.parse
FIDELITY_K = (0, 1, 2, 5, 10)


def cross_entropy(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def image_experiment(model_cls, methods, steps, depth):
    x_train, y_train, x_test, y_test = data.digits()
    order = np.random.default_rng(0).integers(0, len(x_train), (steps, 64))

    def evaluate(model):
        logits = nnx.jit(lambda m, x: m(x))(model, x_test)
        return {"test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y_test)), "test_loss": float(cross_entropy(model, x_test, y_test))}

    return dict(
        make_model=lambda **kw: model_cls(blocks_per_stage=depth, rngs=nnx.Rngs(0), **kw),
        batches=lambda i: (x_train[order[i]], y_train[order[i]]),
        loss_fn=cross_entropy, evaluate=evaluate, metric="test_accuracy", higher_is_better=True,
        methods=methods, steps=steps, lr=3e-3, probe=(x_train[:128], y_train[:128]), depth=depth,
    )


def pixel_experiment(methods, steps):
    x_train, y_train, x_test, y_test = data.pixel_digits()
    order = np.random.default_rng(0).integers(0, len(x_train), (steps, 64))

    def evaluate(model):
        logits = nnx.jit(lambda m, x: m(x))(model, x_test)
        return {"test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y_test)), "test_loss": float(cross_entropy(model, x_test, y_test))}

    return dict(
        make_model=lambda **kw: models.SequenceModel(1, 10, hidden=64, cell="gru", rngs=nnx.Rngs(0), **kw),
        batches=lambda i: (x_train[order[i]], y_train[order[i]]),
        loss_fn=cross_entropy, evaluate=evaluate, metric="test_accuracy", higher_is_better=True,
        methods=methods, steps=steps, lr=5e-3, probe=(x_train[:128], y_train[:128]), depth=64,
    )


def char_experiment(make, methods, steps, seq_len=256, batch=32, lr=3e-3, depth=None):
    corpus, _ = data.char_corpus()
    rng = np.random.default_rng(0)
    train_batches = [corpus.batch(rng, batch, seq_len) for _ in range(steps)]
    val = [corpus.batch(np.random.default_rng(1), 64, seq_len, split="val") for _ in range(4)]

    def evaluate(model):
        return {"val_loss": float(np.mean([float(nnx.jit(cross_entropy)(model, x, y)) for x, y in val]))}

    return dict(
        make_model=lambda **kw: make(corpus.vocab_size, **kw), batches=lambda i: train_batches[i],
        loss_fn=cross_entropy, evaluate=evaluate, metric="val_loss", higher_is_better=False,
        methods=methods, steps=steps, lr=lr, probe=val[0], depth=depth or seq_len,
    )


def adding_experiment(methods, steps, length=256):
    rng = np.random.default_rng(0)
    batches = [data.adding_task(rng, 64, length) for _ in range(steps)]
    test = data.adding_task(np.random.default_rng(1), 512, length)

    def mse(model, x, y):
        return jnp.mean((model(x)[:, 0] - y) ** 2)

    return dict(
        make_model=lambda **kw: models.SequenceModel(2, 1, hidden=64, cell="gru", rngs=nnx.Rngs(0), **kw),
        batches=lambda i: batches[i], loss_fn=mse, evaluate=lambda m: {"test_mse": float(nnx.jit(mse)(m, *test))},
        metric="test_mse", higher_is_better=False, methods=methods, steps=steps, lr=3e-3, probe=test, depth=length,
    )


RNN_METHODS = [M("exact"), M("k=0"), M("k=1"), M("k=2"), M("k=5"), M("k=10"), M("fpi:10"), M("tbptt:16"), M("tbptt:64")]


def experiments(quick: bool):
    s = (lambda n: max(n // 10, 4)) if quick else (lambda n: n)
    gru = lambda vocab, **kw: models.CharRNN(vocab, hidden=128, cell="gru", rngs=nnx.Rngs(0), **kw)
    return {
        "digits_preact": lambda: image_experiment(
            models.PreActResNet, [M("exact"), M("k=0"), M("k=1"), M("k=2"), M("k=4"), M("k=8"), M("fpi:4")], s(300), 8),
        "digits_postrelu": lambda: image_experiment(
            models.PostReLUResNet, [M("exact"), M("k=0"), M("k=2"), M("k=4"), M("fpi:4")], s(300), 8),
        "pixel_gru": lambda: pixel_experiment(
            [M("exact"), M("k=0"), M("k=2"), M("k=5"), M("k=10"), M("fpi:10"), M("tbptt:16")], s(800)),
        "char_gru": lambda: char_experiment(gru, RNN_METHODS, s(300)),
        "char_lstm": lambda: char_experiment(
            lambda v, **kw: models.CharRNN(v, hidden=128, cell="lstm", rngs=nnx.Rngs(0), **kw),
            [M("exact"), M("k=2"), M("k=10"), M("fpi:10"), M("tbptt:16")], s(300)),
        "char_stacked": lambda: char_experiment(
            lambda v, **kw: models.CharRNN(v, hidden=96, cell="gru", layers=3, rngs=nnx.Rngs(0), **kw),
            [M("exact"), M("k=2"), M("k=10"), M("fpi:10")], s(150)),
        "char_mingru": lambda: char_experiment(
            lambda v, **kw: models.CharRNN(v, hidden=128, cell="mingru", layers=2, rngs=nnx.Rngs(0), **kw),
            [M("exact"), M("k=0"), M("fpi:2")], s(300)),
        "gpt": lambda: char_experiment(
            lambda v, **kw: models.GPT(v, dim=64, layers=3, max_len=64, rngs=nnx.Rngs(0), **kw),
            [M("exact"), M("k=0"), M("k=1"), M("k=2"), M("fpi:2")], s(200), seq_len=64, depth=3),
        "postln": lambda: char_experiment(
            lambda v, **kw: models.PostLNTransformer(v, dim=64, layers=3, max_len=64, rngs=nnx.Rngs(0), **kw),
            [M("exact"), M("k=0"), M("k=1"), M("k=2"), M("fpi:2")], s(200), seq_len=64, lr=1e-3, depth=3),
        "adding": lambda: adding_experiment([M("exact"), M("k=0"), M("k=2"), M("k=10"), M("fpi:10"), M("tbptt:16")], s(400)),
    }


def fidelity(spec, model, ks, with_fpi=True):
    """Cosine and relative error of highway (and FPI) gradients to exact ones on ``model``."""
    x, y = spec["probe"]
    highway = train.gradient_cosines(model, spec["loss_fn"], x, y, ks)
    if not with_fpi:
        return {"highway": highway}
    # FPI is the same sweeps with gamma = 1: a model built with gamma=1 and the same parameters.
    fpi_model = spec["make_model"](gamma=1.0)
    nnx.update(fpi_model, nnx.state(model))
    fpi = train.gradient_cosines(fpi_model, spec["loss_fn"], x, y, ks)
    return {"highway": highway, "fpi": fpi}


def run_experiment(name, spec, quick):
    histories, final_models = {}, {}
    init_fid = fidelity(spec, spec["make_model"](), FIDELITY_K, with_fpi=False)
    # Every method in lockstep (turns rotating), so machine noise hits them alike.
    runs = train.train_interleaved(
        spec["make_model"], spec["methods"], spec["batches"], spec["loss_fn"], steps=spec["steps"],
        learning_rate=spec["lr"], evaluate=spec["evaluate"], eval_every=max(spec["steps"] // 6, 1), desc=name,
    )
    for method in spec["methods"]:
        model, history = runs[method.label]
        histories[method.label] = history
        if method.kind == "exact":
            final_models["exact"] = model
        print(f"  {name:>15} {method.label:>12}: {spec['metric']} {history.final(spec['metric']):.4f}, "
              f"{1e3 * history.step_seconds:.1f} ms/step")
    trained_fid = fidelity(spec, final_models["exact"], FIDELITY_K)
    return histories, {"init": init_fid, "trained": trained_fid}


def plot(name, spec, histories, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, h in histories.items():
        smooth = np.convolve(h.loss, np.ones(10) / 10, mode="valid")
        style = "-" if label == "backprop" else ("--" if label.startswith("FPI") else (":" if label.startswith("TBPTT") else "-"))
        axes[0].plot(np.arange(len(smooth)) + 10, smooth, style, label=label)
        axes[1].plot(np.asarray(h.wall)[9:], smooth, style, label=label)
        steps, _, metrics = zip(*h.evals)
        axes[2].plot(steps, [m[spec["metric"]] for m in metrics], style + ("o" if style == "-" else ""), label=label, ms=3)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training wall-clock (s)")
    for ax in axes[:2]:
        ax.set_ylabel("training loss (10-step average)")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel(spec["metric"])
    axes[2].legend(fontsize=7)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="experiment names (default: all)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps: a smoke test, not for quoting")
    args = parser.parse_args()
    table = experiments(args.quick)
    names = args.only or list(table)
    suffix = "_quick" if args.quick else ""
    results_path = common.RESULTS / f"training{suffix}.json"
    stored = json.loads(results_path.read_text()) if results_path.exists() else {}
    stored["environment"] = common.environment()
    for name in names:
        start = time.perf_counter()
        spec = table[name]()
        histories, fid = run_experiment(name, spec, args.quick)
        plot(name, spec, histories, common.RESULTS / f"training_{name}{suffix}.png")
        stored[name] = {
            "metric": spec["metric"], "higher_is_better": spec["higher_is_better"], "steps": spec["steps"],
            "depth": spec["depth"], "runs": {label: h.as_dict() for label, h in histories.items()},
            "fidelity": fid, "minutes": (time.perf_counter() - start) / 60,
            "measured": common.env_line(stored["environment"]),
        }
        results_path.write_text(json.dumps(stored, indent=1, default=float))
        print(f"{name}: {stored[name]['minutes']:.1f} min")
    write_reports(stored, suffix)


def write_reports(stored, suffix=""):
    env = stored["environment"]
    # Each experiment says when it ran (``--only`` reruns some); the header says when the last did.
    lines = ["# Training fidelity", "", common.env_line(env)[:-1] + " (the last run; each experiment below says when it ran).", "",
             "Every method trains the same model from the same initialisation on the same batches with Adam.",
             "Step time is the median of all steps after the first (compilation excluded). Speedup is",
             "against backprop in the same run. Plots: `training_<experiment>.png` (loss vs step, loss vs",
             "wall-clock, metric vs step).", ""]
    fid_lines = ["# Gradient fidelity", "", common.env_line(env)[:-1] + " (the last run; each experiment below says when it ran).", "",
                 "Cosine similarity (and relative error) of the Highway-BP and fixed-point-iteration (FPI,",
                 "gamma = 1) gradients to the exact gradient, per number of sweeps k, on a probe batch: at",
                 "initialisation and after training (the model trained with backprop).", ""]
    for name, entry in stored.items():
        if name == "environment":
            continue
        metric = entry["metric"]
        runs = entry["runs"]
        base = runs.get("backprop")
        rows = []
        for label, h in runs.items():
            final = h["evals"][-1][2][metric]
            diff = "" if base is None else f"{final - base['evals'][-1][2][metric]:+.4f}"
            speed = "" if base is None else f"{base['step_seconds'] / h['step_seconds']:.2f}x"
            rows.append([label, f"{final:.4f}", diff, f"{1e3 * h['step_seconds']:.1f}", speed, f"{h['wall'][-1]:.0f}"])
        measured = entry.get("measured", common.env_line(env))
        lines += [f"## {name} ({entry['steps']} steps, depth {entry['depth']}, {entry['minutes']:.1f} min)", "", measured, "",
                  common.markdown_table(["method", f"final {metric}", "vs backprop", "ms/step", "speedup", "train s"], rows),
                  "", f"![{name}](training_{name}{suffix}.png)", ""]
        frows = []
        for when in ("init", "trained"):
            for kind in ("highway", "fpi"):
                if kind not in entry["fidelity"][when]:
                    continue
                cells = entry["fidelity"][when][kind]
                frows.append([when, "Highway-BP" if kind == "highway" else "FPI"]
                             + [f"{cells[str(k)][0]:.3f} ({cells[str(k)][1]:.2f})" if str(k) in cells
                                else f"{cells[k][0]:.3f} ({cells[k][1]:.2f})" for k in FIDELITY_K])
        fid_lines += [f"## {name}", "", measured, "", common.markdown_table(["when", "method"] + [f"k={k}" for k in FIDELITY_K], frows), ""]
    (common.RESULTS / f"training{suffix}.md").write_text("\n".join(lines) + "\n")
    (common.RESULTS / f"fidelity{suffix}.md").write_text("\n".join(fid_lines) + "\n")


if __name__ == "__main__":
    main()
