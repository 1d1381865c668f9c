import jax.numpy as jnp
import numpy as np
import pytest

from gradflow.numerics import stable_norm


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e20, 1e30])
def test_stable_norm_matches_float64_where_naive_float32_fails(scale):
    x64 = np.array([3.0, -4.0, 0.0, 12.0]) * scale  # norm 13 * scale
    x32 = jnp.asarray(x64, jnp.float32)
    assert float(stable_norm(x32)) == pytest.approx(13 * scale, rel=1e-6)
    if scale in (1e-30, 1e30):
        naive = float(jnp.linalg.norm(x32))
        assert naive == 0.0 or not np.isfinite(naive)  # the failure this module exists for


def test_edge_cases():
    assert float(stable_norm(jnp.zeros(3))) == 0.0
    assert np.isnan(float(stable_norm(jnp.array([1.0, np.nan]))))
    assert float(stable_norm(jnp.array([1.0, np.inf]))) == np.inf
