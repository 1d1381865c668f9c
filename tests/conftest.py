import importlib.util
import os
import pathlib
import sys

# The suite compiles far more than it runs. XLA's CPU backend at optimization level 1 compiles
# about 25% faster and changes results by float rounding only (every assertion here has a
# tolerance or compares two runs under the same flags): the suite takes 9 minutes on 2 cores
# instead of 11. Set before jax initializes its backend; a level in XLA_FLAGS already wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

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
