"""Re-executes the notebooks in place so their committed outputs (plots, tables) match the code.

Runs every notebook (or the ones named) in full mode, that is with ``HBPJAX_QUICK`` unset, in a
fresh kernel, skipping the cells tagged ``skip-execution`` (the Colab ``%pip install`` cell), and
writes the outputs back into the file. Progress-bar output is stored as it finally reads on
screen: consecutive stream outputs are merged and carriage-return overwrites applied. ``make test``
executes the notebooks separately, in quick mode, without touching the files.

Run:  .venv/bin/python notebooks/execute.py [01_quickstart.ipynb ...]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def execute(path: Path, timeout: int = 3600) -> float:
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    skipped = {i for i, c in enumerate(book.cells) if "skip-execution" in c.metadata.get("tags", [])}
    run = nbformat.from_dict(dict(book, cells=[c for i, c in enumerate(book.cells) if i not in skipped]))
    start = time.perf_counter()
    NotebookClient(run, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    outputs = iter(run.cells)
    book.cells = [c if i in skipped else next(outputs) for i, c in enumerate(book.cells)]
    for cell in book.cells:
        if cell.cell_type == "code":
            cell.outputs = _collapse_streams(cell.outputs)
    nbformat.write(book, path)
    return time.perf_counter() - start


def _collapse_streams(outputs: list) -> list:
    """Merges consecutive stdout/stderr outputs and applies ``\\r`` like a terminal does."""
    import nbformat

    merged: list = []
    for out in outputs:
        if out.output_type == "stream" and merged and merged[-1].output_type == "stream" and merged[-1].name == out.name:
            merged[-1].text += out.text
        else:
            merged.append(out)
    result = []
    for out in merged:
        if out.output_type == "stream":
            # What a terminal shows of each line: its last carriage-return segment that wrote anything.
            lines = [([s for s in line.split("\r") if s] or [""])[-1].rstrip() for line in out.text.split("\n")]
            text = "\n".join(line for line in lines if line)
            if not text:
                continue
            out = nbformat.v4.new_output("stream", name=out.name, text=text + "\n")
        result.append(out)
    return result


def main(names: list[str]) -> None:
    os.environ.pop("HBPJAX_QUICK", None)  # full mode: the sizes a reader should see
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("[0-9]*.ipynb"))
    for path in paths:
        print(f"{path.name}: {execute(path):.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
