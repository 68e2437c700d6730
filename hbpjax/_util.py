"""Small helpers shared by the error messages."""

from __future__ import annotations

from typing import Any


def describe(x: Any) -> str:
    """A short description of a value for error messages ("an array of shape (3,)", ...)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}"
    return f"a {type(x).__name__}"
