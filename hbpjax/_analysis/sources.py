"""Where an equation comes from: the user's line that traced it, and the named scopes around it."""

from __future__ import annotations

import functools
import importlib.util
import os
import re

from jax.extend import core

#: The directory of the hbpjax package.
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scope(eqn: core.JaxprEqn) -> str:
    """The equation's name stack as a string (``"outer/inner"``, transforms as ``"vmap(...)"``)."""
    source = getattr(eqn, "source_info", None)
    return str(getattr(source, "name_stack", "") or "")


def in_scope(eqn: core.JaxprEqn, name: str) -> bool:
    """Whether the equation was traced inside ``jax.named_scope(name)`` (at any depth)."""
    return re.search(r"(^|[/(])" + re.escape(name) + r"($|[/)\[])", scope(eqn)) is not None


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    """Directories of the libraries between the user's code and a traced equation."""
    dirs = [_PACKAGE]  # hbpjax/ itself (hbpjax/examples/ is user code: see below)
    for module in ("jax", "jaxlib", "flax", "optax", "equinox"):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            dirs.append(os.path.dirname(spec.origin))
    return tuple(os.path.join(d, "") for d in dirs)


def user_source(eqn: core.JaxprEqn) -> str:
    """``file:line`` of the innermost frame of the user's code that traced ``eqn``, the file as
    :func:`shown`."""
    traceback = getattr(getattr(eqn, "source_info", None), "traceback", None)
    frames = list(getattr(traceback, "frames", None) or [])
    examples = os.path.join(_PACKAGE, "examples", "")
    for frame in frames:  # innermost first
        name = frame.file_name
        library = name.startswith(_library_dirs()) and not name.startswith(examples)
        if not library and not name.startswith("<frozen "):
            return f"{shown(frame.file_name)}:{frame.line_num}"
    if frames:
        return f"{shown(frames[0].file_name)}:{frames[0].line_num}"
    return "<unknown>"


def shown(path: str) -> str:
    """A source file as a user reads it: relative to the working directory where it lies below it,
    else relative to the directory holding the hbpjax package (``hbpjax/examples/models.py``);
    a notebook cell (IPython runs each from a file of its own) as ``<cell>``."""
    if os.path.basename(os.path.dirname(path)).startswith("ipykernel_"):
        return "<cell>"
    for base in (os.getcwd(), os.path.dirname(_PACKAGE)):
        if path.startswith(os.path.join(base, "")):
            return os.path.relpath(path, base)
    return path
