"""How a transform reaches the arrays it differentiates: the adapter protocol.

Three kinds of arguments are differentiated the way their libraries do it: plain pytrees of arrays
(``jax.grad``), pytrees whose other leaves are static, such as an Equinox Module (the
floating-point arrays are differentiated, as ``eqx.filter_grad`` does), and Flax NNX modules
(``nnx.grad``: their ``nnx.Param``s, state written back). An :class:`Adapter` says, for one kind,
how ``argnums`` are checked, which JAX transform differentiates the converted function, how the
function is traced and planned, and how the arguments split into arrays and the rest (so a
gradient can be taken again on the same state, under ``jax.jit`` or ``lax.cond``). The transforms,
:func:`hbpjax.gradient_agreement` and :class:`hbpjax.AdaptiveIterations` all go through it;
:func:`for_arguments` picks the adapter for a call's arguments.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._analysis.conversion import Conversion
from .options import Options, as_int, describe


class Adapter:
    """Plain JAX: the differentiated arguments are pytrees of arrays (``jax.grad``'s conventions).

    The base of the protocol; :class:`Filter` and ``hbpjax.nnx``'s adapter override what differs.
    """

    def normalize(self, name: str, argnums):
        """``argnums`` checked at wrap time, as ``jax.grad`` does: an int or a non-empty int sequence."""
        return normalize_argnums(name, argnums)

    def check(self, name: str, argnums, args: tuple, *, allow_int: bool, holomorphic: bool) -> None:
        """Call-time checks on the differentiated positional arguments."""
        check_args(name, argnums, args, allow_int, holomorphic)

    def prepare(self, fun: Callable, argnums, args: tuple) -> tuple[Callable, tuple]:
        """The function and arguments to differentiate: these as they are."""
        return fun, args

    def jax_transform(self, fun: Callable, argnums, *, has_aux: bool, holomorphic: bool, allow_int: bool) -> Callable:
        """The JAX transform that differentiates the converted function."""
        return jax.value_and_grad(fun, argnums, has_aux=has_aux, holomorphic=holomorphic, allow_int=allow_int)

    def conversion(self, fun: Callable, options: Options, args: tuple, kwargs: dict, argnums):
        """``fun`` traced and planned on these arguments (:class:`hbpjax._analysis.conversion.Conversion`)."""
        nums = (argnums,) if isinstance(argnums, int) else argnums
        return Conversion(fun, options, args, kwargs, differentiated=nums)

    def arrays(self, args: tuple, kwargs: dict) -> tuple[Any, Callable[[Any], tuple[tuple, dict]]]:
        """``(arrays, rebuild)``: the call's arguments as a pytree of arrays, and how to rebuild
        arguments from it (fresh ones each time, for state a function mutates)."""
        return (args, kwargs), lambda arrays: arrays

    def value_and_grad(self, fun: Callable, argnums, has_aux: bool, *, options: Options) -> Callable:
        """The highway value and gradient of ``fun`` for arguments of this kind."""
        from .transform import ValueAndGrad

        return ValueAndGrad(fun, argnums, has_aux, options=options, adapter=self)


class Filter(Adapter):
    """The floating-point arrays of the differentiated arguments; every other leaf (an activation
    function, an int, a flag) is static, as ``eqx.filter_grad`` treats them. Gradients are ``None``
    where a leaf is not a floating-point array."""

    def check(self, name, argnums, args, *, allow_int, holomorphic) -> None:
        check_args(name, argnums, args, allow_int=True, holomorphic=holomorphic)

    def prepare(self, fun, argnums, args):
        nums = (argnums,) if isinstance(argnums, int) else argnums
        args = list(args)
        trees = {}
        for a in nums:
            args[a], trees[a] = partition(args[a])

        @functools.wraps(fun)
        def of_arrays(*args, **kwargs):
            args = list(args)
            for a, tree in trees.items():
                args[a] = combine(args[a], tree)
            return fun(*args, **kwargs)

        return of_arrays, tuple(args)

    def arrays(self, args, kwargs):
        # Arrays are traced, every other leaf (Python numbers included) is static: as eqx.filter_jit.
        leaves, tree = jax.tree.flatten((args, kwargs))
        dynamic = lambda leaf: isinstance(leaf, (jax.Array, np.ndarray, np.generic))
        static = [None if dynamic(leaf) else leaf for leaf in leaves]
        arrays = [leaf if dynamic(leaf) else None for leaf in leaves]

        def rebuild(arrays):
            return jax.tree.unflatten(tree, [s if a is None else a for a, s in zip(arrays, static)])

        return arrays, rebuild


def for_arguments(args: tuple, argnums) -> Adapter:
    """The adapter for a call: NNX when a differentiated argument is an ``nnx.Module``, plain JAX
    when every leaf of the differentiated arguments is a floating-point number or array, else a
    filter (an Equinox Module with an activation function, an int or a bool among its fields)."""
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and any(isinstance(args[a], nnx.Module) for a in nums if -len(args) <= a < len(args)):
        from .nnx_adapter import Adapter as NnxAdapter

        return NnxAdapter()
    leaves = [leaf for a in nums if -len(args) <= a < len(args) for leaf in jax.tree.leaves(args[a])]
    if all(is_array_like(leaf) and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves):
        return Adapter()
    return Filter()


def run_jitted(fun: Callable, adapter: Adapter, args: tuple, kwargs: dict):
    """``fun(*args, **kwargs)`` under ``jax.jit`` over the arguments' arrays (what ``adapter.arrays``
    gives), on fresh copies of them: the arguments themselves are left as they were."""
    arrays, rebuild = adapter.arrays(args, kwargs)

    def call(arrays):
        a, kw = rebuild(arrays)
        return fun(*a, **kw)

    return jax.jit(call)(jax.tree.map(lambda a: a, arrays))


# ------------------------------------------------------------------------------------- checks


def is_array_like(x) -> bool:
    """Whether ``jax.grad`` accepts ``x`` as a leaf: an array, a NumPy scalar or a Python number."""
    return hasattr(x, "dtype") or isinstance(x, (int, float, complex))


def _is_inexact_array(x) -> bool:
    """Equinox's ``is_inexact_array``: a floating-point (or complex) JAX or NumPy array."""
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)


def partition(tree):
    """``(diff, tree)``: the inexact arrays of ``tree`` (``None`` elsewhere), and ``tree`` itself."""
    return jax.tree.map(lambda x: x if _is_inexact_array(x) else None, tree), tree


def combine(diff, tree):
    """``tree`` with the arrays of ``diff`` (from :func:`partition`) in place of its own."""
    return jax.tree.map(lambda d, x: x if d is None else d, diff, tree, is_leaf=lambda v: v is None)


def normalize_argnums(name: str, argnums) -> int | tuple[int, ...]:
    """Checks ``argnums`` at wrap time, as ``jax.grad`` does: an int or a non-empty int sequence."""
    try:
        if isinstance(argnums, Sequence) and not isinstance(argnums, str):
            out = tuple(as_int(a) for a in argnums)
        else:
            return as_int(argnums)
    except TypeError:
        raise TypeError(f"{name}: `argnums` must be an int or a sequence of ints; got {argnums!r}.") from None
    if not out:
        raise ValueError(f"{name}: `argnums` must name at least one argument; got {argnums!r}.")
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: `argnums` must not repeat an argument; got {argnums!r}.")
    return out


def check_args(name: str, argnums, args, allow_int: bool, holomorphic: bool = False) -> None:
    """Call-time checks on the differentiated positional arguments."""
    nums = (argnums,) if isinstance(argnums, int) else argnums
    for a in nums:
        if not -len(args) <= a < len(args):
            raise TypeError(
                f"{name}: differentiating with respect to argnums={argnums} requires at least "
                f"{max(a + 1, -a)} positional arguments to be passed by the caller, but got only "
                f"{len(args)} positional arguments. Pass the argument positionally or change argnums."
            )
    if allow_int or holomorphic:
        return
    for a in nums:
        for path, leaf in jax.tree_util.tree_flatten_with_path(args[a])[0]:
            if not is_array_like(leaf):
                raise TypeError(
                    f"{name}: argument {a} has a leaf{jax.tree_util.keystr(path)} that is not an array: "
                    f"{describe(leaf)}. To differentiate the arrays of a pytree holding other things (an "
                    "Equinox Module), use hbpjax.filter_grad / hbpjax.filter_value_and_grad, or move the "
                    "leaf out of the differentiated argument."
                )
            dtype = jnp.result_type(leaf) if not hasattr(leaf, "dtype") else leaf.dtype
            if not jnp.issubdtype(dtype, jnp.inexact):
                raise TypeError(
                    f"{name}: argument {a} has a leaf{jax.tree_util.keystr(path)} of dtype "
                    f"{dtype}, but gradients need real or complex floating-point inputs. Cast it "
                    "to float, move it out of argnums, or pass allow_int=True (float0 gradients)."
                )
