"""The package's shape, read from its source (``hbpjax/examples`` aside): small modules, classes and
functions, few positional parameters, a short top level, and JAX's primitive names in the one
primitives table (plus the row kinds of ``find_stacks``, where ``"scan"`` is a kind of stack)."""

import ast
import pathlib

import jax.extend.core.primitives as jax_primitives
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "hbpjax"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "examples" not in p.relative_to(PACKAGE).parts)

#: Primitive names JAX exports, and those of call-like primitives it does not (or not in every version).
PRIMITIVE_NAMES = {getattr(jax_primitives, n).name for n in dir(jax_primitives) if n.endswith("_p")} | {
    "pjit", "jit", "remat", "remat2", "checkpoint", "closed_call", "core_call", "custom_jvp_call",
    "custom_vjp_call", "one_minus_square", "copy_p", "add_any", "while", "cond", "scan",
}


def _docstring(node) -> ast.Constant | None:
    body = getattr(node, "body", None) if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) else None
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        return body[0].value
    return None


def _parsed():
    for path in MODULES:
        source = path.read_text()
        yield path.relative_to(PACKAGE), source.splitlines(), ast.parse(source)


def test_modules_classes_and_functions_are_small():
    too_big = []
    for name, lines, tree in _parsed():
        if len(lines) > 450:
            too_big.append(f"module {name}: {len(lines)} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200:
                too_big.append(f"class {name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                doc = _docstring(node)
                doc_lines = 0 if doc is None else doc.end_lineno - doc.lineno + 1
                span = lines[node.lineno - 1 : node.end_lineno]
                code = len(span) - doc_lines - sum(1 for line in span if not line.strip())
                if code > 60:
                    too_big.append(f"function {name}:{node.lineno} {node.name}: {code} lines of code")
                positional = len(node.args.posonlyargs) + len(node.args.args)
                if positional > 6:
                    too_big.append(f"function {name}:{node.lineno} {node.name}: {positional} positional parameters")
    assert not too_big, "\n".join(too_big)


def test_top_level_is_short():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 12, modules


def test_primitive_names_live_in_the_primitives_table():
    found = {}
    for name, _, tree in _parsed():
        docs = {id(_docstring(n)) for n in ast.walk(tree) if _docstring(n) is not None}
        strings = {
            n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
        }
        if strings & PRIMITIVE_NAMES:
            found[str(name)] = sorted(strings & PRIMITIVE_NAMES)
    assert set(found) <= {"_analysis/primitives.py", "_analysis/findings.py"}, found
    assert found.get("_analysis/findings.py", ["scan"]) == ["scan"], found  # StackInfo.kind


@pytest.mark.parametrize("layer", ["_front", "_analysis", "_backward"])
def test_each_layer_is_a_subpackage(layer):
    assert (PACKAGE / layer / "__init__.py").exists()
