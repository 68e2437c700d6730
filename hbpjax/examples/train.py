"""A small training harness shared by the benchmarks, the demo and the notebooks.

A :class:`Method` says how gradients are computed — exact backprop, Highway-BP with ``k`` sweeps,
fixed-point iteration (Highway-BP with ``gamma=1``) or truncated BPTT — and :func:`train` runs one
model with one method under ``nnx.jit``, timing every step (compilation excluded) and evaluating
now and then.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx

import hbpjax


@dataclasses.dataclass(frozen=True)
class Method:
    """How the gradient is computed. ``kind`` is ``exact``, ``highway``, ``fpi`` or ``tbptt``."""

    kind: str
    k: int | None = None
    window: int | None = None

    @property
    def label(self) -> str:
        return {
            "exact": "backprop",
            "highway": f"highway k={self.k}",
            "fpi": f"FPI k={self.k}",
            "tbptt": f"TBPTT {self.window}",
        }[self.kind]

    def model_kwargs(self) -> dict:
        """Constructor arguments the method needs from the model (``gamma``, ``tbptt``)."""
        if self.kind == "fpi":
            return {"gamma": 1.0}
        if self.kind == "tbptt":
            return {"tbptt": self.window}
        return {}

    def value_and_grad(self, loss_fn: Callable, has_aux: bool = False) -> Callable:
        if self.kind in ("exact", "tbptt"):
            return nnx.value_and_grad(loss_fn, has_aux=has_aux)
        return hbpjax.nnx.value_and_grad(loss_fn, has_aux=has_aux, iterations=self.k)

    @classmethod
    def parse(cls, text: str) -> "Method":
        """``exact``, ``k=2`` / ``highway:2``, ``fpi:10``, ``tbptt:16``."""
        text = text.strip()
        if text in ("exact", "backprop"):
            return cls("exact")
        if text.startswith("k="):
            return cls("highway", k=int(text[2:]))
        kind, _, value = text.partition(":")
        if kind in ("highway", "fpi"):
            return cls(kind, k=int(value))
        if kind == "tbptt":
            return cls("tbptt", window=int(value))
        raise ValueError(f"unknown method {text!r}: use exact, k=N, fpi:N or tbptt:W")


@dataclasses.dataclass
class History:
    """What one training run produced."""

    label: str
    steps: list = dataclasses.field(default_factory=list)
    wall: list = dataclasses.field(default_factory=list)  # cumulative seconds of training steps
    loss: list = dataclasses.field(default_factory=list)
    evals: list = dataclasses.field(default_factory=list)  # (step, wall, {metric: value})
    compile_seconds: float = 0.0
    step_seconds: float = 0.0  # median time of one step

    def final(self, metric: str):
        return self.evals[-1][2][metric] if self.evals else None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def train(
    make_model: Callable[..., nnx.Module],
    method: Method,
    batches: Callable[[int], tuple],
    loss_fn: Callable,
    *,
    steps: int,
    learning_rate: float = 3e-3,
    evaluate: Callable[[nnx.Module], dict] | None = None,
    eval_every: int = 50,
    progress: bool = True,
    desc: str | None = None,
) -> tuple[nnx.Module, History]:
    """Trains ``make_model(**method.model_kwargs())`` with Adam for ``steps`` steps.

    Args:
      make_model: builds the model; receives the method's keyword arguments (``gamma``, ``tbptt``).
      method: how to compute gradients.
      batches: ``batches(step) -> (x, y)``.
      loss_fn: ``loss_fn(model, x, y) -> scalar``.
      evaluate: ``evaluate(model) -> {metric: value}``, called in eval mode every ``eval_every``
        steps and at the end (its time is not counted in ``wall``).
    """
    model = make_model(**method.model_kwargs())
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    value_and_grad = method.value_and_grad(loss_fn)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = value_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    history = History(method.label)
    bar = None
    if progress:
        bar = _progress_bar()(total=steps, desc=desc or method.label, leave=False)
    durations, wall = [], 0.0
    for i in range(steps):
        x, y = batches(i)
        start = time.perf_counter()
        loss = float(jax.block_until_ready(step(model, optimizer, x, y)))
        elapsed = time.perf_counter() - start
        if i == 0:
            history.compile_seconds = elapsed  # compilation plus one step: not training time
        else:
            durations.append(elapsed)
            wall += elapsed
        history.steps.append(i + 1)
        history.wall.append(wall)
        history.loss.append(loss)
        if evaluate is not None and ((i + 1) % eval_every == 0 or i + 1 == steps):
            model.eval()
            history.evals.append((i + 1, wall, {k: float(v) for k, v in evaluate(model).items()}))
            model.train()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
    if bar is not None:
        bar.close()
    history.step_seconds = float(np.median(durations)) if durations else 0.0
    return model, history


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


def gradient_cosines(model: nnx.Module, loss_fn: Callable, x, y, iterations=(0, 1, 2, 5, 10)) -> dict:
    """Cosine similarity and relative error of highway against exact gradients of an NNX model.

    The NNX counterpart of :func:`hbpjax.gradient_agreement`: ``{k: (cosine, relative_error)}``.
    Models whose state changes during a forward (BatchNorm statistics, RNG counters) are evaluated
    on copies, so every gradient sees the same state.
    """
    exact = flat(nnx.jit(nnx.grad(loss_fn))(nnx.clone(model), x, y))
    out = {}
    for k in iterations:
        g = flat(nnx.jit(hbpjax.nnx.grad(loss_fn, iterations=k))(nnx.clone(model), x, y))
        cos = float(g @ exact / (np.linalg.norm(g) * np.linalg.norm(exact)))
        out[k] = (cos, float(np.linalg.norm(g - exact) / np.linalg.norm(exact)))
    return out


def _progress_bar():
    """tqdm's widget bar where ipywidgets is installed (Colab, JupyterLab), its text bar elsewhere."""
    try:
        import ipywidgets  # noqa: F401

        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm
