import importlib.util
import pathlib
import sys

import jax
import pytest

# Silent broadcasting bugs fail loudly (as in equinox's test suite).
jax.config.update("jax_numpy_rank_promotion", "raise")

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def load_experiment():
    """Import experiments/<name>.py by path (experiments/ is not a package) and return the module."""

    def load(name: str):
        module_name = f"_experiments_{name}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses (flax modules) look their module up here
        spec.loader.exec_module(module)
        return module

    return load
