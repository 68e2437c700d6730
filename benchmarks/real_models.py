"""k = 0 against backprop on the models people write: Transformers and remat'd stacks, state-space stacks.

Each model is built from the libraries' own modules, as their authors write them (nothing of hbpjax
in it): a scanned pre-LN GPT (``hbpjax.examples.models.ScannedGPT``: ``nnx.scan`` over ``nnx.remat``
with the policies large models use, and without remat), a Linen ViT under
``nn.scan(nn.remat(block))`` and the same ViT as a Python loop, a Linen MLP-Mixer, and Python loops
of state-space blocks: Mamba-2-style (a chunked scan inside each block), S5-style (an associative
scan inside) and Griffin-style (``nnx.remat``-ed blocks, a gated linear recurrence run by
``lax.scan``).

For each, in one process, round-robin, after warm-up: the jitted forward (loss only), the value and
gradient of backprop (``jax.value_and_grad`` / ``nnx.value_and_grad``) and of Highway-BP at k = 0 and
k = 2 (``gamma=0.2``); the compiled temporary memory of each program; and its matmul FLOPs counted
from the compiled program with every loop's body multiplied by its trip count (XLA's own cost
analysis counts a loop's body once); the page faults per call (see ``common.MEMORY_KEPT_ENV``).
Then the same rows are timed again in a child process whose glibc keeps its memory, where no call
pays page faults for its temporary buffer (``--no-kept-pass`` skips it).

Goals (docs/performance.md): k = 0 at >= 1.00x of backprop's speed; k = 2 time <= k = 0 time + 2 x
(k = 0 time - forward time); k = 2's temporary memory <= 1.3x backprop's.

Run:  python benchmarks/real_models.py [--repeats 9] [--only GPT] [--no-kept-pass]
Writes results/real_models.{md,json,png} (and docs/figures/real_models.png, which docs/performance.md shows).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hbpjax  # noqa: E402
from hbpjax.examples import models  # noqa: E402

MiB = 2**20
# ``models.ScannedGPT``'s ``remat``: no remat, or nnx.remat with these policies.
POLICIES = {"none": False, "nothing_saveable": jax.checkpoint_policies.nothing_saveable, "dots_saveable": jax.checkpoint_policies.dots_saveable}


# ------------------------------------------------------------------------------- Flax NNX models


class Mamba2Block(nnx.Module):
    """Pre-norm residual block whose mixer is a selective diagonal SSM computed chunk by chunk: a
    ``lax.scan`` over chunks carries the state; inside a chunk, cumulative decays (as Mamba-2's SSD)."""

    def __init__(self, dim, state, chunk, *, rngs):
        self.chunk, self.state = chunk, state
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.in_proj = nnx.Linear(dim, 2 * dim + 2 * state + 1, rngs=rngs)
        self.out_proj = nnx.Linear(dim, dim, rngs=rngs)
        self.a_log = nnx.Param(jnp.zeros(()))

    def __call__(self, x):
        b, t, d = x.shape
        z, u, B, C, dt = jnp.split(self.in_proj(self.norm(x)), np.cumsum([d, d, self.state, self.state]), axis=-1)
        log_a = -jax.nn.softplus(dt[..., 0]) * jnp.exp(self.a_log[...])  # (b, t)
        n = t // self.chunk
        chunked = lambda a: jnp.moveaxis(a.reshape(b, n, self.chunk, *a.shape[2:]), 1, 0)

        def chunk_step(s, inputs):  # s: (b, state, d)
            la, uc, bc, cc = inputs
            cum = jnp.cumsum(la, axis=1)  # (b, c)
            decay = jnp.exp(cum[:, :, None] - cum[:, None, :]) * jnp.tril(jnp.ones((self.chunk, self.chunk)))
            scores = jnp.einsum("bin,bjn->bij", cc, bc) * decay
            y = jnp.einsum("bij,bjd->bid", scores, uc) + jnp.einsum("bin,bnd->bid", cc * jnp.exp(cum)[..., None], s)
            tail = jnp.exp(cum[:, -1:] - cum)  # decay from each step to the chunk's end
            s = jnp.exp(cum[:, -1])[:, None, None] * s + jnp.einsum("bjn,bjd->bnd", bc * tail[..., None], uc)
            return s, y

        _, y = jax.lax.scan(chunk_step, jnp.zeros((b, self.state, d)), tuple(map(chunked, (log_a, u, B, C))))
        y = jnp.moveaxis(y, 0, 1).reshape(b, t, d)
        return x + self.out_proj(y * jax.nn.silu(z))


class S5Block(nnx.Module):
    """Pre-norm residual block around a diagonal linear SSM run by ``lax.associative_scan`` over time
    (as S5), with a GLU output."""

    def __init__(self, dim, state, *, rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.B = nnx.Linear(dim, state, use_bias=False, rngs=rngs)
        self.C = nnx.Linear(state, dim, use_bias=False, rngs=rngs)
        self.log_lambda = nnx.Param(jnp.log(jnp.linspace(0.5, 0.99, state)))
        self.glu = nnx.Linear(dim, 2 * dim, rngs=rngs)

    def __call__(self, x):
        u = self.B(self.norm(x))
        lam = jnp.broadcast_to(jnp.exp(self.log_lambda[...]), u.shape)
        combine = lambda a, b: (a[0] * b[0], b[0] * a[1] + b[1])
        _, s = jax.lax.associative_scan(combine, (lam, u), axis=1)
        y = jax.nn.gelu(self.C(s))
        a, g = jnp.split(self.glu(y), 2, axis=-1)
        return x + a * jax.nn.sigmoid(g)


class GriffinBlock(nnx.Module):
    """Pre-norm residual block around a real-gated linear recurrent unit (Griffin's RG-LRU) run by
    ``lax.scan`` over time, then an MLP block."""

    def __init__(self, dim, *, rngs):
        self.norm1, self.norm2 = nnx.RMSNorm(dim, rngs=rngs), nnx.RMSNorm(dim, rngs=rngs)
        self.gates = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.a_param = nnx.Param(jnp.full((dim,), 2.0))
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(dim, 3 * dim, rngs=rngs), nnx.Linear(3 * dim, dim, rngs=rngs)

    def __call__(self, x):
        u = self.norm1(x)
        r, i = jnp.split(jax.nn.sigmoid(self.gates(u)), 2, axis=-1)
        log_a = -8.0 * r * jax.nn.softplus(self.a_param[...])
        a = jnp.exp(log_a)
        inputs = jnp.sqrt(1 - a**2) * (i * u)

        def step(h, ax):
            return ax[0] * h + ax[1], ax[0] * h + ax[1]

        _, hs = jax.lax.scan(step, jnp.zeros_like(x[:, 0]), (jnp.swapaxes(a, 0, 1), jnp.swapaxes(inputs, 0, 1)))
        x = x + self.out(jnp.swapaxes(hs, 0, 1))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class LoopSSM(nnx.Module):
    """Embedding, a Python loop of ``blocks`` (each ``nnx.remat``-ed where ``remat``), norm, head."""

    def __init__(self, vocab, dim, blocks, *, remat=False, rngs):
        self.embed, self.blocks, self.remat = nnx.Embed(vocab, dim, rngs=rngs), nnx.List(blocks), remat
        self.norm, self.head = nnx.LayerNorm(dim, rngs=rngs), nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = nnx.remat(lambda b, h: b(h))(block, h) if self.remat else block(h)
        return self.head(self.norm(h))


# ----------------------------------------------------------------------------- Flax Linen models


class ViTBlock(nn.Module):
    """A pre-LN encoder block of Linen modules; returns ``(h, None)`` for ``nn.scan``."""

    heads: int
    mlp: int

    @nn.compact
    def __call__(self, h, _=None):
        h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(h))
        y = nn.Dense(h.shape[-1])(nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(h))))
        return h + y, None


def patches(images, dim: int):
    """4 x 4 patches of ``images`` embedded by a strided ``nn.Conv``, as ``(batch, patches, dim)``
    (inside a compact module)."""
    h = nn.Conv(dim, (4, 4), strides=(4, 4))(images)
    return h.reshape(h.shape[0], -1, dim)


def head(h):
    """Mean pooling and a 10-class classifier (inside a compact module)."""
    return nn.Dense(10)(nn.LayerNorm()(h).mean(axis=1))


class ViT(nn.Module):
    """Patch embedding, ``layers`` encoder blocks (``nn.scan(nn.remat(ViTBlock))`` or a Python loop),
    mean pooling, classifier."""

    layers: int
    dim: int
    heads: int
    mlp: int
    scanned: bool

    @nn.compact
    def __call__(self, images):
        h = patches(images, self.dim)
        h = h + self.param("pos", nn.initializers.normal(0.02), h.shape[1:])
        if self.scanned:
            stack = nn.scan(nn.remat(ViTBlock, policy=jax.checkpoint_policies.nothing_saveable), variable_axes={"params": 0},
                            split_rngs={"params": True}, length=self.layers)
            h, _ = stack(self.heads, self.mlp)(h, None)
        else:
            for _ in range(self.layers):
                h, _ = ViTBlock(self.heads, self.mlp)(h)
        return head(h)


class MixerBlock(nn.Module):
    tokens_mlp: int
    channels_mlp: int

    @nn.compact
    def __call__(self, h):
        y = jnp.swapaxes(nn.LayerNorm()(h), 1, 2)
        y = nn.Dense(h.shape[1])(nn.gelu(nn.Dense(self.tokens_mlp)(y)))
        h = h + jnp.swapaxes(y, 1, 2)
        return h + nn.Dense(h.shape[-1])(nn.gelu(nn.Dense(self.channels_mlp)(nn.LayerNorm()(h))))


class Mixer(nn.Module):
    layers: int
    dim: int

    @nn.compact
    def __call__(self, images):
        h = patches(images, self.dim)
        for _ in range(self.layers):
            h = MixerBlock(self.dim // 2, 2 * self.dim)(h)
        return head(h)


# -------------------------------------------------------------------------------------- the rows


def _nnx_row(model, x, y, ks=(0, 2)):
    """``{method: jitted fn of (state, x, y)}`` and the state, for an NNX model."""
    graphdef, state = nnx.split(model)
    loss = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    grads = {"backprop": nnx.value_and_grad, **{f"k={k}": (lambda f, k=k: hbpjax.nnx.value_and_grad(f, iterations=k, gamma=0.2)) for k in ks}}
    fns = {"forward": jax.jit(lambda s, x, y: loss(nnx.merge(graphdef, s), x, y))}
    for name, transform in grads.items():
        fns[name] = jax.jit(lambda s, x, y, t=transform: t(loss)(nnx.merge(graphdef, s), x, y))
    return fns, (state, x, y)


def _linen_row(module, x, y, ks=(0, 2)):
    params = module.init(jax.random.key(0), x)
    loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(module.apply(p, x), y).mean()
    fns = {"forward": jax.jit(loss), "backprop": jax.jit(jax.value_and_grad(loss))}
    for k in ks:
        fns[f"k={k}"] = jax.jit(hbpjax.highway_value_and_grad(loss, iterations=k, gamma=0.2))
    return fns, (params, x, y)


def rows(quick: bool, ks=(0, 2)):
    """``{name: () -> (fns, args)}`` for every model of the suite, Highway-BP at the sweeps ``ks``."""
    rng = np.random.default_rng(0)
    vocab, T, batch = 96, (64 if quick else 128), (4 if quick else 8)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, T)))
    text = (tokens, jnp.roll(tokens, -1, axis=1))
    images = jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 16))
    L = 4 if quick else 8
    gpt = lambda policy: models.ScannedGPT(vocab, dim=128, heads=4, layers=L, max_len=T, remat=POLICIES[policy], rngs=nnx.Rngs(0))
    ssm_T, ssm_dim = (128, 64) if quick else (256, 64)
    ssm_tokens = jnp.asarray(rng.integers(0, vocab, (4, ssm_T)))
    ssm_text = (ssm_tokens, jnp.roll(ssm_tokens, -1, axis=1))
    r = nnx.Rngs(0)
    return {
        f"scanned GPT (nnx.scan), no remat, L={L}": lambda: _nnx_row(gpt("none"), *text, ks=ks),
        f"scanned GPT, nnx.remat nothing_saveable, L={L}": lambda: _nnx_row(gpt("nothing_saveable"), *text, ks=ks),
        f"scanned GPT, nnx.remat dots_saveable, L={L}": lambda: _nnx_row(gpt("dots_saveable"), *text, ks=ks),
        f"ViT, nn.scan(nn.remat) nothing_saveable, L={L}": lambda: _linen_row(ViT(L, 128, 4, 256, scanned=True), images, labels, ks=ks),
        f"ViT, Python loop, L={L}": lambda: _linen_row(ViT(L, 128, 4, 256, scanned=False), images, labels, ks=ks),
        f"MLP-Mixer (Linen loop), L={L}": lambda: _linen_row(Mixer(L, 128), images, labels, ks=ks),
        "Mamba-2-style loop (chunked scan), L=4": lambda: _nnx_row(
            LoopSSM(vocab, ssm_dim, [Mamba2Block(ssm_dim, 16, 32, rngs=r) for _ in range(4)], rngs=r), *ssm_text, ks=ks),
        "S5-style loop (associative scan), L=4": lambda: _nnx_row(
            LoopSSM(vocab, ssm_dim, [S5Block(ssm_dim, 64, rngs=r) for _ in range(4)], rngs=r), *ssm_text, ks=ks),
        "Griffin-style loop of nnx.remat blocks, L=4": lambda: _nnx_row(
            LoopSSM(vocab, ssm_dim, [GriffinBlock(ssm_dim, rngs=r) for _ in range(4)], remat=True, rngs=r), *ssm_text, ks=ks),
    }


# ----------------------------------------------------------------------- counting the compiled program

_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def matmul_flops(hlo: str) -> float:
    """Matmul FLOPs (2 x multiply-adds of every ``dot``) of an optimized HLO module's text, every
    ``while`` body counted as many times as its known trip count, fusions and calls followed."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%([\w.\-]+) \((.*)\) -> .* \{$", line)
        if head:
            current = comps.setdefault(head.group(2), {"shapes": {}, "lines": []})
            entry = head.group(2) if head.group(1) else entry
            for name, shape in re.findall(r"([\w.\-]+): [a-z]+\d*\[([\d,]*)\]", head.group(3)):
                current["shapes"][name] = shape
        elif current is not None and line.strip().startswith(("%", "ROOT %")):
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ([a-z]+\d*\[[\d,]*\])", line)
            if m:
                current["shapes"][m.group(1)] = _SHAPE.match(m.group(2)).group(1)
            current["lines"].append(line)

    def dims(shape):
        return [int(d) for d in shape.split(",") if d]

    @functools.cache
    def cost(name):
        comp, total = comps[name], 0.0
        for line in comp["lines"]:
            if " dot(" in line:
                out = dims(_SHAPE.search(line.split("=", 1)[1]).group(1))
                lhs = re.search(r" dot\(%([\w.\-]+)", line).group(1)
                contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
                lhs_dims = dims(comp["shapes"].get(lhs, ""))
                total += 2 * np.prod(out) * np.prod([lhs_dims[int(c)] for c in contract.split(",") if c] or [1])
            trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
            for callee in re.findall(r"(?:calls|body|to_apply|branch_computations)=\{?%([\w.\-]+)", line):
                if callee in comps:
                    total += cost(callee) * (int(trips.group(1)) if trips and "body=%" + callee in line else 1)
        return total

    return cost(entry)


# --------------------------------------------------------------------------------------- the run


def measure(name, make, repeats, *, counts=True):
    """Per method: the median ms; with ``counts``, also the page faults per call, temporary memory
    and matmul FLOPs (the kept-memory pass reads the times alone)."""
    fns, args = make()
    compiled = {method: fn.lower(*args).compile() for method, fn in fns.items()}
    result = {method: {} for method in compiled}
    for method, c in compiled.items() if counts else ():
        result[method] = {
            "faults": common.page_faults_per_call(lambda c=c: c(*args)),
            "temp_bytes": int(c.memory_analysis().temp_size_in_bytes),
            "matmul_flops": float(matmul_flops(c.as_text())),
        }
    times = common.time_round_robin({m: (lambda c=c: c(*args)) for m, c in compiled.items()}, repeats)
    for method, t in times.items():
        result[method]["ms"] = float(np.median(t)) * 1e3
    return result


def memory_kept_pass(argv: list[str]) -> dict:
    """The same rows timed again in a child process whose glibc keeps its memory
    (:data:`common.MEMORY_KEPT_ENV`): no page faults per call, so what is left is the programs' work."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kept.json"
        env = {**os.environ, **common.MEMORY_KEPT_ENV}
        subprocess.run([sys.executable, __file__, *argv, "--kept-pass-to", str(out)], env=env, check=True)
        return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="smaller models, 3 repeats (a smoke run)")
    parser.add_argument("--only", default=None, help="only rows whose name contains this")
    parser.add_argument("--no-kept-pass", action="store_true", help="skip timing the rows again with glibc keeping its memory")
    parser.add_argument("--kept-pass-to", default=None, help=argparse.SUPPRESS)  # the child process of that pass
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    data = {"env": common.environment(), "config": vars(args), "results": {}}
    for name, make in rows(args.quick).items():
        if args.only and args.only not in name:
            continue
        data["results"][name] = measure(name, make, repeats, counts=args.kept_pass_to is None)
        print(name, {m: round(v["ms"], 1) for m, v in data["results"][name].items()}, flush=True)
    if not data["results"]:
        raise SystemExit(f"real_models.py: no row's name contains --only {args.only!r}; the rows: {', '.join(rows(args.quick))}.")
    if args.kept_pass_to is not None:
        assert common.memory_kept(), "the kept-memory pass runs with common.MEMORY_KEPT_ENV"
        Path(args.kept_pass_to).write_text(json.dumps(data["results"]))
        return
    if not args.no_kept_pass:
        print("Again with glibc keeping its memory (no page faults per call):", flush=True)
        argv = [a for a in sys.argv[1:] if a != "--no-kept-pass"]
        for name, kept in memory_kept_pass(argv).items():
            data["results"][name]["memory_kept"] = kept
    markdown, worst = report(data)
    print(markdown)
    if not args.quick and not args.only:
        common.write_results("real_models", markdown, data)
        plot(data)
        common.quote_in_readme("real_models", markdown.split("\n", 2)[2])
        common.quote_in_readme("real_models_worst", worst)


def report(data):
    rows_, met_all, worst, worst_kept = [], True, None, None
    for name, r in data["results"].items():
        bp, k0, k2, fwd = (r[m]["ms"] for m in ("backprop", "k=0", "k=2", "forward"))
        speed0, speed2 = _speed(r, None, "k=0"), _speed(r, None, "k=2")
        sweep_ok = k2 <= k0 + 2 * (k0 - fwd)
        mem = r["k=2"]["temp_bytes"] / max(r["backprop"]["temp_bytes"], 1)
        flops = r["k=0"]["matmul_flops"] / r["backprop"]["matmul_flops"]
        met = speed0 >= 1.0 and sweep_ok and mem <= 1.3
        met_all &= met
        worst = (name, speed0) if worst is None or speed0 < worst[1] else worst
        kept = "not run"
        if "memory_kept" in r:
            kept0, kept2 = _speed(r, "memory_kept", "k=0"), _speed(r, "memory_kept", "k=2")
            worst_kept = (name, kept0) if worst_kept is None or kept0 < worst_kept[1] else worst_kept
            kept = f"{kept0:.2f}x / {kept2:.2f}x"
        rows_.append([name, f"{fwd:.1f}", f"{bp:.1f}", f"{k0:.1f} ({speed0:.2f}x)", f"{k2:.1f} ({speed2:.2f}x)",
                      "yes" if sweep_ok else "no", f"{r['backprop']['temp_bytes'] / MiB:.1f}", f"{r['k=2']['temp_bytes'] / MiB:.1f} ({mem:.2f}x)",
                      f"{r['backprop']['matmul_flops'] / 1e9:.2f}", f"{flops:.2f}x",
                      f"{r['backprop']['faults'] / 1e3:.1f}k / {r['k=0']['faults'] / 1e3:.1f}k", kept])
    table = common.markdown_table(
        ["model", "forward ms", "backprop ms", "k=0 ms (speed vs backprop)", "k=2 ms (speed)", "k=2 within 2 sweeps of k=0",
         "backprop temp MiB", "k=2 temp MiB (vs backprop)", "backprop matmul GFLOP", "k=0 matmul FLOPs vs backprop",
         "page faults per call: backprop / k=0", "memory kept: k=0 / k=2 speed"], rows_)
    summary = f"Worst k = 0 row: {worst[0]}, {worst[1]:.2f}x of backprop's speed. All goals met on every row: {'yes' if met_all else 'no'}."
    if worst_kept is not None:
        summary += (f" With glibc keeping its memory (no page faults per call): worst k = 0 row {worst_kept[0]}, "
                    f"{worst_kept[1]:.2f}x.")
    text = "\n".join(["# Real models: k = 0 against backprop", "", table, "", NOTES, "", summary, "", common.env_line(data["env"])])
    return text, f"{summary}\n\n{common.env_line(data['env'])}"


NOTES = """\
Page faults: XLA's CPU runtime allocates every call's temporary buffer anew and, with glibc's
defaults, a buffer that large is a fresh `mmap`: each of its pages is faulted in and zeroed by the
kernel on every call (about 1 us per 4 KiB page here), so a program with more temporary memory is
slower by that much although it does no more work. "memory kept" times the same programs in a child
process started with `common.MEMORY_KEPT_ENV` (glibc keeps what it was given: no faults per call);
backprop is faster there too."""


def plot(data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["results"])
    bars = {"k = 0": (None, "k=0"), "k = 0, memory kept": ("memory_kept", "k=0"), "k = 2": (None, "k=2")}
    bars = {label: [_speed(data["results"][n], pass_, m) for n in names] for label, (pass_, m) in bars.items()}
    bars = {label: speeds for label, speeds in bars.items() if None not in speeds}
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.5))
    y = np.arange(len(names))
    width = 0.8 / len(bars)
    for i, (label, speeds) in enumerate(bars.items()):
        ax.barh(y + (i - (len(bars) - 1) / 2) * width, speeds, width, label=label)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed vs backprop (same run; > 1 is faster)")
    ax.legend()
    fig.tight_layout()
    for where in (common.RESULTS, common.ROOT / "docs" / "figures"):  # the docs page shows it too
        fig.savefig(where / "real_models.png", dpi=120)
    plt.close(fig)


def _speed(result, pass_, method):
    """Backprop's time over ``method``'s, in the main pass (``pass_=None``) or the kept-memory one."""
    r = result if pass_ is None else result.get(pass_)
    return None if r is None else r["backprop"]["ms"] / r[method]["ms"]


if __name__ == "__main__":
    main()
