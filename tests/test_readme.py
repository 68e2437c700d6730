"""The Python examples of the README and of the docs pages run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))


def _python_blocks(page: Path):
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_readme_examples_run(capsys):
    blocks = _python_blocks(README)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert "cosine" in capsys.readouterr().out


@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p)], ids=lambda p: p.name)
def test_docs_examples_run(page):
    for code in _python_blocks(page):
        exec(compile(code, str(page), "exec"), {"__name__": "docs"})
