"""Choosing k while training: fixed k=10 against a k schedule and the adaptive controller.

On the character-level GRU (sequence 256) and the pixel-by-pixel digits GRU (sequence 64) of
``training.py``, four methods train the same model from the same initialisation on the same
batches, taking their steps in turn, for three seeds:

* ``backprop`` (exact), the reference;
* ``highway k=10``: a fixed number of sweeps;
* ``k schedule``: ``k = schedule(step)`` rising over training (2, then 5, then 10: agreement drops
  as training goes on), a traced integer (``optax.piecewise_constant_schedule``): one compilation;
* ``adaptive k``: :class:`hbpjax.AdaptiveIterations` (target cosine 0.99, measured every 25
  steps, k in [1, 16]).

Reported per task: the final validation metric (mean and spread over seeds), the training
wall-clock (sum of step times, compilation excluded; the adaptive method's measuring steps
included), the k each step used, and the gradient's cosine to exact at every evaluation.
Goal (docs/choosing_k.md): the schedule or the controller reaches backprop's metric within the
fidelity targets (char GRU: validation loss within 2 %; pixel GRU: accuracy within 2 points) in
less wall-clock than fixed k=10.

Run:  python benchmarks/k_schedule.py [--quick] [--seeds 3]
Writes results/k_schedule.{md,json} and results/k_schedule_<task>.png.
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
from hbpjax.examples import data, models, train  # noqa: E402


def cross_entropy(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def methods(steps):
    schedule = optax.piecewise_constant_schedule(2, {steps // 3: 2.5, (2 * steps) // 3: 2.0})  # 2, 5, 10
    controller = hbpjax.AdaptiveIterations(target=0.99, every=25, k_init=2, k_min=1, k_max=16)
    return [
        train.Method("exact"),
        train.Method("highway", k=10),
        train.Method("schedule", schedule=lambda i: int(schedule(i)), name="k schedule 2-5-10"),
        train.Method("adaptive", controller=controller, name="adaptive k (target 0.99)"),
    ]


def char_task(seed, steps, quick):
    corpus, _ = data.char_corpus()
    rng = np.random.default_rng(seed)
    seq_len, batch = (64, 16) if quick else (256, 32)
    batches = [corpus.batch(rng, batch, seq_len) for _ in range(steps)]
    val = [corpus.batch(np.random.default_rng(100), 64, seq_len, split="val") for _ in range(4)]

    def evaluate(model):
        return {"val_loss": float(np.mean([float(nnx.jit(cross_entropy)(model, x, y)) for x, y in val]))}

    return dict(
        make_model=lambda **kw: models.CharRNN(corpus.vocab_size, hidden=128, cell="gru", rngs=nnx.Rngs(seed), **kw),
        batches=lambda i: batches[i], evaluate=evaluate, probe=val[0], lr=3e-3,
    )


def pixel_task(seed, steps, quick):
    x_train, y_train, x_test, y_test = data.pixel_digits()
    order = np.random.default_rng(seed).integers(0, len(x_train), (steps, 64))

    def evaluate(model):
        logits = nnx.jit(lambda m, x: m(x))(model, x_test)
        return {"test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y_test))}

    return dict(
        make_model=lambda **kw: models.SequenceModel(1, 10, hidden=64, cell="gru", rngs=nnx.Rngs(seed), **kw),
        batches=lambda i: (x_train[order[i]], y_train[order[i]]), evaluate=evaluate,
        probe=(x_train[:128], y_train[:128]), lr=5e-3,
    )


TASKS = {
    "char_gru": dict(build=char_task, steps=300, metric="val_loss", higher_is_better=False, target="within 2 %"),
    "pixel_gru": dict(build=pixel_task, steps=800, metric="test_accuracy", higher_is_better=True, target="within 2 points"),
}


def meets(task, value, reference):
    if TASKS[task]["higher_is_better"]:
        return value >= reference - 0.02
    return value <= 1.02 * reference


def run_task(task, seeds, quick):
    spec = TASKS[task]
    steps = max(spec["steps"] // 10, 30) if quick else spec["steps"]
    runs = []
    for seed in range(seeds):
        setup = spec["build"](seed, steps, quick)
        start = time.perf_counter()
        out = train.train_interleaved(
            setup["make_model"], methods(steps), setup["batches"], cross_entropy, steps=steps,
            learning_rate=setup["lr"], evaluate=setup["evaluate"], eval_every=max(steps // 4, 1),
            agreement_probe=setup["probe"], desc=f"{task} seed {seed}",
        )
        print(f"  {task} seed {seed}: {time.perf_counter() - start:.0f} s")
        runs.append({label: history for label, (_, history) in out.items()})
    return steps, runs


def summarise(task, steps, runs):
    spec = TASKS[task]
    metric = spec["metric"]
    labels = list(runs[0])
    rows, data_out = [], {}
    reference = float(np.mean([r["backprop"].final(metric) for r in runs]))
    for label in labels:
        finals = np.array([r[label].final(metric) for r in runs])
        walls = np.array([r[label].wall[-1] for r in runs])
        ks = [k for k in runs[0][label].k if k is not None]
        cos = [e[2].get("cosine") for e in runs[0][label].evals if "cosine" in e[2]]
        data_out[label] = {
            "final": finals.tolist(), "wall_s": walls.tolist(), "k_trace_seed0": runs[0][label].k,
            "cosine_seed0": cos, "meets_target": bool(meets(task, finals.mean(), reference)),
        }
        k_summary = "-" if not ks else (f"{ks[0]}" if len(set(ks)) == 1 else f"{ks[0]} → {ks[-1]} (mean {np.mean(ks):.1f})")
        rows.append([
            label, f"{finals.mean():.4f} ± {finals.std():.4f}", f"{walls.mean():.1f} ± {walls.std():.1f}",
            k_summary, ", ".join(f"{c:.3f}" for c in cos) or "-",
            "reference" if label == "backprop" else ("yes" if data_out[label]["meets_target"] else "no"),
        ])
    table = common.markdown_table(
        ["method", f"final {metric} (mean ± std, {len(runs)} seeds)", "training s (mean ± std)",
         "k (seed 0)", "cosine to exact at each evaluation (seed 0)", f"{spec['target']} of backprop"],
        rows,
    )
    fixed = data_out["highway k=10"]
    faster = [
        label for label in labels[2:]
        if data_out[label]["meets_target"] and np.mean(data_out[label]["wall_s"]) < np.mean(fixed["wall_s"])
    ]
    data_out["goal_met_by"] = faster
    return table, data_out


def plot(task, runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = TASKS[task]["metric"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label in runs[0]:
        h = runs[0][label]
        smooth = np.convolve(h.loss, np.ones(10) / 10, mode="valid")
        axes[0].plot(np.asarray(h.wall)[9:], smooth, label=label)
        axes[1].plot([e[0] for e in h.evals], [e[2][metric] for e in h.evals], "o-", label=label)
        if any(k is not None for k in h.k):
            axes[2].plot(h.steps, [np.nan if k is None else k for k in h.k], label=label)
    axes[0].set(xlabel="training wall-clock (s)", ylabel="training loss (10-step mean)", title=f"{task}, seed 0")
    axes[1].set(xlabel="step", ylabel=metric)
    axes[2].set(xlabel="step", ylabel="k (sweeps)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs; results/k_schedule_quick.*")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(TASKS), default=list(TASKS))
    args = parser.parse_args()
    env = common.environment()
    name = "k_schedule_quick" if args.quick else "k_schedule"
    lines = [
        "# Choosing k while training: fixed k=10, a schedule, the adaptive controller",
        "",
        common.env_line(env) + " Same initialisation and batches for every method within a seed; "
        "methods take their steps in turn; wall-clock = sum of step times, compilation excluded.",
        "",
    ]
    results = {"env": env, "tasks": {}}
    for task in args.only:
        start = time.perf_counter()
        steps, runs = run_task(task, args.seeds, args.quick)
        table, summary = summarise(task, steps, runs)
        png = common.RESULTS / f"{name}_{task}.png"
        plot(task, runs, png)
        results["tasks"][task] = {"steps": steps, "methods": summary, "minutes": (time.perf_counter() - start) / 60}
        met = summary["goal_met_by"]
        lines += [
            f"## {task} ({steps} steps, {results['tasks'][task]['minutes']:.1f} min)", "", table, "",
            "Goal (reach backprop's metric within the target, in less wall-clock than fixed k=10): "
            + (f"met by {', '.join(met)}." if met else "not met."), "", f"![{task}]({png.name})", "",
        ]
        print("\n".join(lines[-8:]))
    path = common.write_results(name, "\n".join(lines), results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
