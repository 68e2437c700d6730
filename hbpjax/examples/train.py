"""A small training harness shared by the benchmarks, the demo and the notebooks.

A :class:`Method` says how gradients are computed — exact backprop, Highway-BP with ``k`` sweeps,
fixed-point iteration (Highway-BP with ``gamma=1``) or truncated BPTT — and
:func:`train_interleaved` trains one model per method in lockstep under ``nnx.jit``, timing every
step (compilation excluded) and evaluating now and then (:func:`train`: one method).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import hbpjax


@dataclasses.dataclass(frozen=True)
class Method:
    """How the gradient is computed.

    ``kind`` is ``exact``, ``highway`` (``k`` sweeps), ``fpi`` (fixed-point iteration, ``k``
    sweeps), ``tbptt`` (truncated BPTT, ``window``), ``schedule`` (Highway-BP with ``k =
    schedule(step)``, a traced integer: one compilation) or ``adaptive`` (Highway-BP with ``k`` from
    an :class:`hbpjax.AdaptiveIterations` ``controller``). ``gamma``, if given, is the highway
    transform's option (the split of the stacks it finds in a model written without hbpjax).
    """

    kind: str
    k: int | None = None
    window: int | None = None
    schedule: Callable[[int], int] | None = None
    controller: hbpjax.AdaptiveIterations | None = None
    name: str | None = None
    gamma: float | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return {
            "exact": "backprop",
            "highway": f"highway k={self.k}",
            "fpi": f"FPI k={self.k}",
            "tbptt": f"TBPTT {self.window}",
            "schedule": "k schedule",
            "adaptive": "adaptive k",
        }[self.kind]

    def model_kwargs(self) -> dict:
        """Constructor arguments the method needs from the model (``gamma``, ``tbptt``)."""
        if self.kind == "fpi":
            return {"gamma": 1.0}
        if self.kind == "tbptt":
            return {"tbptt": self.window}
        return {}

    def value_and_grad(self, loss_fn: Callable, has_aux: bool = False) -> Callable:
        """``value_and_grad(model, x, y)`` (fixed methods only; see :func:`make_step`)."""
        if self.kind in ("exact", "tbptt"):
            return nnx.value_and_grad(loss_fn, has_aux=has_aux)
        return hbpjax.nnx.value_and_grad(loss_fn, has_aux=has_aux, iterations=self.k, **self.transform_options())

    def transform_options(self) -> dict:
        """Keyword options of the highway transform (``gamma`` where the method sets it)."""
        return {} if self.gamma is None else {"gamma": self.gamma}

    def make_step(self, loss_fn: Callable) -> Step:
        """The method's jitted training step, with the state a schedule or a controller keeps."""
        return Step(self, loss_fn)

    @classmethod
    def parse(cls, text: str) -> Method:
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


class Step:
    """One method's jitted training step: ``step(model, optimizer, x, y, i) -> loss``.

    Fixed methods compile one step. A ``schedule`` passes ``k = schedule(i)`` as a traced integer
    and an ``adaptive`` method carries its controller's state from step to step: one compilation
    each, whatever ``k`` does. ``k_trace`` records the ``k`` every step used (``None`` for exact).
    """

    def __init__(self, method: Method, loss_fn: Callable):
        self.method = method
        self.k_trace: list[int | None] = []
        step: Callable
        if method.kind == "schedule":
            value_and_grad = lambda k: hbpjax.nnx.value_and_grad(loss_fn, iterations=k, **method.transform_options())

            @nnx.jit
            def step(model, optimizer, x, y, k):
                loss, grads = value_and_grad(k)(model, x, y)
                optimizer.update(model, grads)
                return loss

        elif method.kind == "adaptive":
            controller = method.controller
            assert controller is not None
            adaptive_step = controller.value_and_grad(loss_fn)
            self.state = controller.init()

            @nnx.jit
            def step(model, optimizer, x, y, state):
                (loss, grads), state = adaptive_step(state, model, x, y)
                optimizer.update(model, grads)
                return loss, state

        else:
            step = _train_step(method.value_and_grad(loss_fn))
        self._step = step

    def __call__(self, model, optimizer, x, y, i: int):
        kind = self.method.kind
        if kind == "schedule":
            schedule = self.method.schedule
            assert schedule is not None
            k = int(schedule(i))
            self.k_trace.append(k)
            return self._step(model, optimizer, x, y, jnp.int32(k))
        if kind == "adaptive":
            self.k_trace.append(int(self.state.k))
            loss, self.state = self._step(model, optimizer, x, y, self.state)
            return loss
        self.k_trace.append(self.method.k if kind in ("highway", "fpi") else None)
        return self._step(model, optimizer, x, y)


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
    k: list = dataclasses.field(default_factory=list)  # the sweeps each step used (None: exact)

    def final(self, metric: str):
        return self.evals[-1][2][metric] if self.evals else None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def train(
    make_model: Callable[..., nnx.Module],
    method: Method,
    batches: Callable[[int], tuple],
    loss_fn: Callable,
    **options,
) -> tuple[nnx.Module, History]:
    """Trains ``make_model(**method.model_kwargs())`` with Adam; see :func:`train_interleaved`."""
    return train_interleaved(make_model, [method], batches, loss_fn, **options)[method.label]


def train_interleaved(
    make_model: Callable[..., nnx.Module],
    methods: list[Method],
    batches: Callable[[int], tuple],
    loss_fn: Callable,
    *,
    steps: int,
    learning_rate: float = 3e-3,
    evaluate: Callable[[nnx.Module], dict] | None = None,
    eval_every: int = 50,
    progress: bool = True,
    desc: str | None = None,
    agreement_probe: tuple | None = None,
    extra_steps: dict[str, int] | None = None,
) -> dict[str, tuple[nnx.Module, History]]:
    """Trains one model per method, in lockstep: step ``i`` of every method, then step ``i + 1``.

    Each model is ``make_model(**method.model_kwargs())`` (the same initialisation for every method
    when ``make_model`` seeds its own RNGs), trained with Adam on the same batches under
    ``nnx.jit``. The methods take turns at every step, in an order that rotates, so machine noise
    hits all of them alike (as in ``benchmarks/common.time_round_robin``); step times exclude
    compilation (the first step) and evaluation.

    Args:
      make_model: builds a model; receives the method's keyword arguments (``gamma``, ``tbptt``).
      methods: how to compute gradients, one run each.
      batches: ``batches(step) -> (x, y)``.
      loss_fn: ``loss_fn(model, x, y) -> scalar``.
      evaluate: ``evaluate(model) -> {metric: value}``, called in eval mode every ``eval_every``
        steps and at the end.
      agreement_probe: ``(x, y)``: at every evaluation, also record the cosine similarity of the
        method's gradient at the ``k`` it last used to the exact one on this batch (``"cosine"``).
      extra_steps: ``{label: n}``: these methods go on for ``n`` more steps after ``steps`` (still
        taking turns among themselves; evaluated at ``steps`` too, for comparisons at equal steps).

    Returns:
      ``{method.label: (trained model, History)}``.
    """
    runs: dict = {}
    for method in methods:
        model = make_model(**method.model_kwargs())
        optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
        runs[method.label] = (method, model, optimizer, method.make_step(loss_fn), History(method.label), [])
    extra_steps = extra_steps or {}
    total = {label: steps + extra_steps.get(label, 0) for label in runs}
    bar = None
    if progress:
        bar = _progress_bar()(total=sum(total.values()), desc=desc or " / ".join(runs), leave=False)
    for i in range(max(total.values())):
        x, y = batches(i)
        labels = [label for label in runs if i < total[label]]
        for label in labels[i % len(labels):] + labels[: i % len(labels)]:
            _, model, optimizer, step, history, durations = runs[label]
            start = time.perf_counter()
            loss = float(jax.block_until_ready(step(model, optimizer, x, y, i)))
            elapsed = time.perf_counter() - start
            if i == 0:
                history.compile_seconds = elapsed  # compilation plus one step: not training time
            else:
                durations.append(elapsed)
            history.steps.append(i + 1)
            history.wall.append(sum(durations))
            history.loss.append(loss)
            if evaluate is not None and ((i + 1) % eval_every == 0 or i + 1 in (steps, total[label])):
                model.eval()
                metrics = {k: float(v) for k, v in evaluate(model).items()}
                model.train()
                if agreement_probe is not None and step.k_trace[-1] is not None:
                    metrics["cosine"] = gradient_cosines(model, loss_fn, agreement_probe[0], agreement_probe[1], (step.k_trace[-1],))[step.k_trace[-1]][0]
                history.evals.append((i + 1, history.wall[-1], metrics))
            if bar is not None:
                bar.update(1)
                bar.set_postfix({label: f"{loss:.3f}"})
    if bar is not None:
        bar.close()
    out = {}
    for label, (_, model, _, step, history, durations) in runs.items():
        history.step_seconds = float(np.median(durations)) if durations else 0.0
        history.k = step.k_trace
        out[label] = (model, history)
    return out


def _train_step(value_and_grad: Callable) -> Callable:
    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = value_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    return step


def gradient_cosines(model: nnx.Module, loss_fn: Callable, x, y, iterations=(0, 1, 2, 5, 10)) -> dict:
    """Cosine similarity and relative error of highway against exact gradients of an NNX model.

    :func:`hbpjax.gradient_agreement` on the model, as ``{k: (cosine, relative_error)}`` (it
    evaluates every gradient on a copy of the model, so state a forward changes is the same for all).
    """
    report = hbpjax.gradient_agreement(loss_fn, model, x, y, iterations=tuple(iterations))
    return {k: (c, e) for k, c, e in zip(report.iterations, report.cosine, report.relative_error)}


def _progress_bar():
    """tqdm's widget bar where ipywidgets is installed (Colab, JupyterLab), its text bar elsewhere."""
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm
