import jax
import pytest

# Silent broadcasting bugs fail loudly (as in equinox's test suite).
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)
