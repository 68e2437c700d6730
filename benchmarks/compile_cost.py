"""What finding and converting the stacks costs at compile time: hbpjax against ``jax.grad``.

For models written as users write them, at L = 4, 8, 16, 32 layers:

- ``flax_loop_transformer``: a pre-LN Transformer in plain Flax NNX, a Python loop of blocks
  (``nnx.MultiHeadAttention``, ``nnx.LayerNorm``, ``nnx.Linear``), as Flax's lm1b example writes it;
- ``equinox_loop_transformer``: the same in Equinox (``eqx.nn.MultiheadAttention``,
  ``eqx.nn.LayerNorm``, ``eqx.nn.MLP``), a Python loop over a list of blocks, as Equinox's BERT
  example writes it, under ``hbpjax.filter_grad`` / ``eqx.filter_grad``;
- ``loop_resnet``: hbpjax's example pre-activation ResNet written as a Python loop (``LoopResNet``);
- ``ssm_loop``: a stacked state-space model: a Python loop of blocks that each run a diagonal
  linear recurrence (``lax.scan`` over time) between two ``nnx.Linear`` (LRU / S5-style);
- ``scanned_gpt``: hbpjax's example ``ScannedGPT`` (``nnx.scan`` over ``nnx.remat``'d layers).

Each (model, L, gradient) point runs in a process of its own: it builds the model, then times
``jax.jit(grad).lower`` (trace and lower) and ``.compile`` of one gradient (``jax.grad`` / ``nnx.grad`` /
``eqx.filter_grad``, or hbpjax's with ``iterations=2``), and reads the process's peak resident
memory (``ru_maxrss``) after compiling and before (what building the model and importing took).
Goals: hbpjax's trace + compile within 1.5x of the plain gradient's, and its peak host memory
within 1.2x, at every point; a point where the plain gradient itself does not fit is reported so.

Run:  python benchmarks/compile_cost.py [--layers 4 8 16 32] [--only ssm_loop ...]
Writes results/compile_cost.{md,json,png} (and docs/figures/compile_cost.png, which docs/performance.md shows).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("flax_loop_transformer", "equinox_loop_transformer", "loop_resnet", "ssm_loop", "scanned_gpt")
METHODS = ("plain", "hbpjax")
DIM, HEADS, SEQ, BATCH = 64, 4, 32, 4


def _flax_loop_transformer(L):
    import jax.numpy as jnp
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm1, self.norm2 = nnx.LayerNorm(DIM, rngs=rngs), nnx.LayerNorm(DIM, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
            self.fc1, self.fc2 = nnx.Linear(DIM, 4 * DIM, rngs=rngs), nnx.Linear(4 * DIM, DIM, rngs=rngs)

        def __call__(self, h, mask):
            h = h + self.attn(self.norm1(h), mask=mask)
            return h + self.fc2(nnx.gelu(self.fc1(self.norm2(h))))

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(rngs) for _ in range(L)])

        def __call__(self, h):
            mask = nnx.make_causal_mask(jnp.ones(h.shape[:2]))
            for block in self.blocks:
                h = block(h, mask)
            return h

    return _nnx_case(Model(nnx.Rngs(0)), (BATCH, SEQ, DIM))


def _equinox_loop_transformer(L):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    class Block(eqx.Module):
        norm1: eqx.nn.LayerNorm
        norm2: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        mlp: eqx.nn.MLP
        drop: eqx.nn.Dropout

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.norm1, self.norm2 = eqx.nn.LayerNorm(DIM), eqx.nn.LayerNorm(DIM)
            self.attn = eqx.nn.MultiheadAttention(HEADS, DIM, key=k1)
            self.mlp = eqx.nn.MLP(DIM, DIM, 4 * DIM, 1, activation=jax.nn.gelu, key=k2)
            self.drop = eqx.nn.Dropout(0.1, inference=True)

        def __call__(self, h):
            n = jax.vmap(self.norm1)(h)
            h = h + self.drop(self.attn(n, n, n))
            return h + jax.vmap(self.mlp)(jax.vmap(self.norm2)(h))

    class Model(eqx.Module):
        blocks: list
        num_layers: int

        def __init__(self, key):
            self.blocks = [Block(k) for k in jax.random.split(key, L)]
            self.num_layers = L

        def __call__(self, h):
            for block in self.blocks:
                h = jax.vmap(block)(h)
            return h

    import hbpjax

    model = Model(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, DIM))
    arrays, static = eqx.partition(model, eqx.is_array)

    def loss(model, x):
        return jnp.mean(jnp.sin(model(x)))

    def gradient(transform):  # a function of arrays, as eqx.filter_jit makes it
        return jax.jit(lambda arrays, x: transform(loss)(eqx.combine(arrays, static), x))

    grads = {"plain": eqx.filter_grad, "hbpjax": lambda f: hbpjax.filter_grad(f, iterations=2)}
    return {method: (lambda t=t: gradient(t)) for method, t in grads.items()}, (arrays, x)


def _loop_resnet(L):
    from hbpjax.examples import models
    from flax import nnx

    model = models.LoopResNet(channels=(16,), blocks_per_stage=L, rngs=nnx.Rngs(0))
    return _nnx_case(model, (16, 8, 8, 1))


def _ssm_loop(L):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class SSM(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(DIM, rngs=rngs)
            self.inp, self.out = nnx.Linear(DIM, DIM, rngs=rngs), nnx.Linear(DIM, DIM, rngs=rngs)
            self.decay = nnx.Param(jnp.linspace(-2.0, 2.0, DIM))

        def __call__(self, h):
            u = self.inp(self.norm(h))
            a = jax.nn.sigmoid(self.decay[...])

            def step(s, u_t):
                s = a * s + u_t
                return s, s

            _, states = jax.lax.scan(step, jnp.zeros_like(u[:, 0]), jnp.swapaxes(u, 0, 1))
            return h + self.out(nnx.gelu(jnp.swapaxes(states, 0, 1)))

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([SSM(rngs) for _ in range(L)])

        def __call__(self, h):
            for block in self.blocks:
                h = block(h)
            return h

    return _nnx_case(Model(nnx.Rngs(0)), (BATCH, 4 * SEQ, DIM))


def _scanned_gpt(L):
    import jax
    from hbpjax.examples import models
    from flax import nnx

    import jax.numpy as jnp
    import optax

    model = models.ScannedGPT(96, dim=DIM, heads=HEADS, layers=L, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, 96)

    def loss(model, tokens):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(tokens)[:, :-1], tokens[:, 1:]))

    return _nnx_gradients(model, loss, tokens, gamma=0.2)


def _nnx_case(model, shape):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import hbpjax

    x = jax.random.normal(jax.random.key(1), shape)

    def loss(model, x):
        return jnp.mean(jnp.sin(model(x)))

    return _nnx_gradients(model, loss, x)


def _nnx_gradients(model, loss, x, **options):
    """``nnx.grad`` and ``hbpjax.nnx.grad`` of ``loss(model, x)`` as jitted functions of the model's
    state (what ``nnx.jit`` compiles)."""
    import jax
    from flax import nnx

    import hbpjax

    graphdef, state = nnx.split(model)

    def gradient(transform):
        return jax.jit(lambda state, x: transform(loss)(nnx.merge(graphdef, state), x))

    grads = {"plain": nnx.grad, "hbpjax": lambda f: hbpjax.nnx.grad(f, iterations=2, **options)}
    return {method: (lambda t=t: gradient(t)) for method, t in grads.items()}, (state, x)


BUILDERS = {
    "flax_loop_transformer": _flax_loop_transformer, "equinox_loop_transformer": _equinox_loop_transformer,
    "loop_resnet": _loop_resnet, "ssm_loop": _ssm_loop, "scanned_gpt": _scanned_gpt,
}


def point(model: str, layers: int, method: str) -> dict:
    """One measurement, in this process: trace + lower, compile, peak resident memory."""
    import warnings

    warnings.simplefilter("ignore")
    makers, args = BUILDERS[model](layers)
    fn = makers[method]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    lowered = fn.lower(*args)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compiled = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"trace_lower_s": traced, "compile_s": compiled, "total_s": traced + compiled, "peak_mib": peak, "before_mib": before}


def _run(model, layers, method, timeout):
    command = [sys.executable, str(Path(__file__).resolve()), "--point", model, str(layers), method]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if done.returncode != 0:
        lines = (done.stderr or "").strip().splitlines()
        return {"error": lines[-1][:120] if lines else f"exit code {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per point")
    parser.add_argument("--point", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.point:
        model, layers, method = options.point
        print(json.dumps(point(model, int(layers), method)))
        return
    sys.path.insert(0, str(HERE))
    import common

    results = {}
    for model in options.only:
        for layers in options.layers:
            row = {method: _run(model, layers, method, options.timeout) for method in METHODS}
            results[f"{model}/{layers}"] = row
            print(model, layers, row, flush=True)
    _report(results, options, common)


def _ratio(row, key):
    plain, ours = row["plain"], row["hbpjax"]
    if "error" in plain or "error" in ours:
        return None
    return ours[key] / plain[key]


def _report(results, options, common):
    env = common.environment()
    rows, met_time, met_memory, points = [], 0, 0, 0
    for key, row in results.items():
        model, layers = key.split("/")
        plain, ours = row["plain"], row["hbpjax"]
        if "error" in plain:
            rows.append([model, layers, f"did not fit ({plain['error']})", "", "", "", "", ""])
            continue
        if "error" in ours:
            rows.append([model, layers, f"{plain['total_s']:.1f}", f"failed ({ours['error']})", "", "", "", ""])
            continue
        t, m = _ratio(row, "total_s"), _ratio(row, "peak_mib")
        points += 1
        met_time += t <= 1.5
        met_memory += m <= 1.2
        rows.append([
            model, layers, f"{plain['trace_lower_s']:.1f} + {plain['compile_s']:.1f}",
            f"{ours['trace_lower_s']:.1f} + {ours['compile_s']:.1f}", f"{t:.2f}x",
            f"{plain['peak_mib']:.0f}", f"{ours['peak_mib']:.0f}", f"{m:.2f}x",
        ])
    table = common.markdown_table(
        ["model", "L", "plain: trace+lower + compile s", "hbpjax k=2: trace+lower + compile s", "time vs plain",
         "plain peak MiB", "hbpjax peak MiB", "memory vs plain"], rows,
    )
    summary = (
        f"Goals: hbpjax's trace + compile within 1.5x of the plain gradient's at {met_time} of {points} points; "
        f"its peak host memory within 1.2x at {met_memory} of {points}."
    )
    md = "\n".join([
        "# Compile cost: hbpjax against the plain gradient", "",
        common.env_line(env) + " One process per point: build the model, then `jax.jit(grad).lower(...)` "
        "and `.compile()` of one gradient; peak resident memory of the process (`ru_maxrss`) after compiling.",
        "", table, "", summary, "",
    ])
    common.write_results("compile_cost", md, {"environment": env, "results": results})
    common.quote_in_readme("compile_cost", "\n".join([table, "", summary, "", common.env_line(env)]))
    _plot(results, options)
    print(md)


def _plot(results, options):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for model in options.only:
        xs, times, memory = [], [], []
        for layers in options.layers:
            row = results.get(f"{model}/{layers}")
            if row is None or _ratio(row, "total_s") is None:
                continue
            xs.append(layers)
            times.append(_ratio(row, "total_s"))
            memory.append(_ratio(row, "peak_mib"))
        left.plot(xs, times, marker="o", label=model)
        right.plot(xs, memory, marker="o", label=model)
    for axis, title, goal in ((left, "trace + compile, hbpjax / plain", 1.5), (right, "peak host memory, hbpjax / plain", 1.2)):
        axis.axhline(goal, color="grey", linestyle="--", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("layers L")
        axis.set_title(title)
    left.legend(fontsize=8)
    fig.tight_layout()
    for where in (HERE / "results", HERE.parent / "docs" / "figures"):  # the docs page shows it too
        fig.savefig(where / "compile_cost.png", dpi=120)


if __name__ == "__main__":
    main()
