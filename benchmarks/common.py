"""Shared helpers for the benchmark scripts: timing, memory, environment, tables and plots.

Timing rules (the same in every script): everything is jitted and warmed up first (compilation is
never timed), every call ends in ``block_until_ready()``, the methods being compared run
round-robin in one process so machine noise hits all of them alike, and we report medians.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """What the numbers were measured on."""
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
    }


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, progress=None) -> dict[str, np.ndarray]:
    """Times each zero-argument function ``repeats`` times, interleaved; returns seconds per call."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
    return {name: np.asarray(t) for name, t in times.items()}


# glibc told to keep the memory it is given: no ``mmap`` per large allocation, one arena, never
# trimmed. XLA's CPU runtime allocates each execution's temporary buffer anew; with glibc's defaults a
# buffer that large is a fresh ``mmap``, so every page of it is faulted in (and zeroed by the kernel)
# on every call, about 1 us per 4 KiB page on this machine. A program with more temporary memory then
# pays for it in time although it does no more work. Set before the process starts (glibc reads it once).
MEMORY_KEPT_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
    "MALLOC_TOP_PAD_": str(2**30),
}


def memory_kept() -> bool:
    """Whether this process runs with :data:`MEMORY_KEPT_ENV`."""
    return all(os.environ.get(k) == v for k, v in MEMORY_KEPT_ENV.items())


def page_faults_per_call(fn: Callable[[], object], calls: int = 5) -> float:
    """Minor page faults of this process per call of ``fn`` (after one warm-up call)."""
    jax.block_until_ready(fn())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        jax.block_until_ready(fn())
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def compiled_memory(fn: Callable, *args) -> dict:
    """Compiled memory of ``jax.jit(fn)(*args)`` from XLA's buffer assignment, in bytes."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
    }


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, markdown: str, data: dict) -> Path:
    """Writes ``results/<name>.md`` and ``results/<name>.json``; returns the markdown path."""
    RESULTS.mkdir(exist_ok=True)
    md = RESULTS / f"{name}.md"
    md.write_text(markdown.rstrip() + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=float) + "\n")
    return md


def env_line(env: dict) -> str:
    return (
        f"Measured {env['date']} with jax {env['jax']} on {env['devices']} "
        f"({env['cpu_cores']} CPU cores), Python {env['python']}."
    )


ROOT = Path(__file__).resolve().parents[1]


def quote_in_readme(name: str, snippet: str, pages: list[Path] | None = None) -> bool:
    """Replaces the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the README and
    the docs pages that quote ``name``.

    Benchmarks call this after writing their results, so the figures the documents quote always come
    from the latest run of the code as it is. Returns False if no page has the markers.
    """
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if pages is None else pages
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    found = False
    for page in pages:
        text = page.read_text()
        if start not in text or end not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        page.write_text(f"{head}{start}\n{snippet.strip()}\n{end}{tail}")
        found = True
    return found
