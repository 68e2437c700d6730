"""The package as a user installs it and as CI gates it: lint, types, the docs site, the sdist.

Each runs the tool the project configures (``pyproject.toml``, ``mkdocs.yml``) in a subprocess, so
``make test`` (and CI) fails when any of them would.
"""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd, cwd=ROOT, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def test_ruff_clean():
    _run(sys.executable, "-m", "ruff", "check", "hbpjax")


def test_mypy_clean():
    out = _run(sys.executable, "-m", "mypy", "--no-incremental")  # files = ["hbpjax"] (pyproject.toml)
    assert "Success" in out


def test_docs_site_builds_strict(tmp_path):
    """``make docs``: every page, every public docstring (mkdocstrings) and every notebook render
    with warnings as errors (broken links, undocumented parameters, bad cross-references)."""
    _run(sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"))
    site = tmp_path / "site"
    api = (site / "api" / "index.html").read_text()
    for name in ("hbpjax.highway_grad", "hbpjax.filter_value_and_grad", "hbpjax.nnx.value_and_grad", "hbpjax.linen.ResidualRNN"):
        assert name in api
    assert (site / "notebooks" / "01_quickstart" / "index.html").exists()


def test_public_names_have_full_docstrings():
    """Args (or Attributes), Returns where a function returns, and a runnable example (doctested
    by the test run) on every public name."""
    import inspect

    import hbpjax
    import hbpjax.linen
    import hbpjax.nnx
    import hbpjax.residual

    names = [(hbpjax, n) for n in hbpjax.__all__ if n != "residual"]
    names += [(m, n) for m in (hbpjax.residual, hbpjax.nnx, hbpjax.linen) for n in m.__all__]
    missing = []
    for module, name in names:
        obj = getattr(module, name)
        doc = inspect.getdoc(obj) or ""
        need = ["Examples:", ">>> "]
        if inspect.isclass(obj):
            if not issubclass(obj, Warning):
                need.append("Attributes:" if "Attributes:" in doc else "Args:")
        elif inspect.signature(obj).parameters:
            need += ["Args:", "Returns:"]
        missing += [f"{module.__name__}.{name}: {s}" for s in need if s not in doc]
    assert not missing, "\n".join(missing)


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="builds the sdist from a source checkout")
def test_sdist_holds_its_tests(tmp_path):
    """The sdist has what its tests need, and pytest collects them inside the unpacked archive."""
    _run(sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path))
    (archive,) = tmp_path.glob("hbpjax-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    unpacked = next(p for p in tmp_path.iterdir() if p.is_dir())
    for path in ("conftest.py", "tests/helpers.py", "tests/conftest.py", "hbpjax/py.typed", "hbpjax/_version.py"):
        assert (unpacked / path).exists(), path
    out = _run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests", cwd=unpacked)
    collected = [line for line in out.splitlines() if "::" in line]
    assert len(collected) > 300, out[-2000:]


@pytest.mark.parametrize("module", ["hbpjax.nnx", "hbpjax.linen"])
def test_adapter_without_flax_names_the_extra(module):
    """Without Flax, ``import hbpjax.nnx`` says which extra to install (``import hbpjax`` works)."""
    code = (
        "import sys\n"
        "class NoFlax:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'flax' or name.startswith('flax.'):\n"
        "            raise ImportError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, NoFlax())\n"
        "import hbpjax\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = _run(sys.executable, "-c", code)
    assert f"{module} needs Flax" in out and "pip install 'hbpjax[flax]'" in out
