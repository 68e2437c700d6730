"""``gradient_agreement`` reports cosine similarity and relative error per number of sweeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbpjax
from helpers import gru_stack


def test_agreement_matches_a_direct_computation():
    with jax.enable_x64(True):
        loss, args = gru_stack(jax.random.key(0), T=9)
        report = hbpjax.gradient_agreement(loss, *args, iterations=(0, 2, 9), argnums=(0, 2))
        exact = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.grad(loss, (0, 2))(*args))])
        for k, cos, err in zip(report.iterations, report.cosine, report.relative_error):
            g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.jit(hbpjax.highway_grad(loss, (0, 2), iterations=k))(*args))])
            assert cos == pytest.approx(g @ exact / np.linalg.norm(g) / np.linalg.norm(exact), rel=1e-12)
            assert err == pytest.approx(np.linalg.norm(g - exact) / np.linalg.norm(exact), rel=1e-9, abs=1e-15)
        assert report.iterations == (0, 2, 9)
        assert report.relative_error[-1] < 1e-12 and report.cosine[-1] == pytest.approx(1.0, abs=1e-12)
        assert report.relative_error[0] > report.relative_error[1] > report.relative_error[2]
        assert report.exact_norm == pytest.approx(np.linalg.norm(exact))
        table = str(report)
        assert "cosine" in table and len(table.splitlines()) == 2 + 3


def test_agreement_with_aux_and_a_single_k():
    loss, args = gru_stack(jax.random.key(1), dtype=jnp.float32, T=5)
    report = hbpjax.gradient_agreement(lambda *a: (loss(*a), 0.0), *args, iterations=5, has_aux=True)
    assert report.iterations == (5,) and report.cosine[0] == pytest.approx(1.0, abs=1e-5)


def test_errors_agreement():
    with pytest.raises(ValueError, match=r"hbpjax.gradient_agreement: `iterations` must be >= 0"):
        hbpjax.gradient_agreement(lambda x: x, 1.0, iterations=(1, -2))
    with pytest.raises(ValueError, match=r"hbpjax.gradient_agreement: .*None"):
        hbpjax.gradient_agreement(lambda x: x, 1.0, iterations=(None,))
    with pytest.raises(TypeError, match=r"hbpjax.gradient_agreement: `fun` must be callable"):
        hbpjax.gradient_agreement("loss", 1.0)
