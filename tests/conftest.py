import atexit
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile


# The suite compiles far more than it runs, so it trades a little run time for compile time:
# - XLA's CPU backend at optimization level 1 (about 25% faster to compile);
# - XLA CPU's classic emitters instead of its MLIR fusion emitters, which compile about twice as
#   fast on this suite's small programs. The flag is probed in a subprocess first: a jaxlib that
#   does not know it aborts at start-up, so there it is left out.
# Both change results by float rounding only (every assertion here has a tolerance or compares
# two runs under the same flags). Set before jax initializes its backend; a level or emitter
# choice already in XLA_FLAGS wins. xdist workers and test subprocesses inherit the environment.
def _fast_compile_flags(flags: str) -> str:
    if "xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=1"
    emitters = "--xla_cpu_use_fusion_emitters=false"
    if "xla_cpu_use_fusion_emitters" not in flags:
        probe = subprocess.run(
            [sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"],
            env={**os.environ, "XLA_FLAGS": f"{flags} {emitters}", "JAX_PLATFORMS": "cpu"},
            capture_output=True,
        )
        if probe.returncode == 0:
            flags += f" {emitters}"
    return flags.strip()


os.environ["XLA_FLAGS"] = _fast_compile_flags(os.environ.get("XLA_FLAGS", ""))

# One XLA compilation cache per test session, shared by the xdist workers and by the subprocesses
# tests start (through the environment): a program one worker compiled, the others load. It is
# created empty by the session's first process and removed when that process exits, so every
# session is a cold start (a cached program never hides a first-run failure); set
# JAX_COMPILATION_CACHE_DIR yourself to keep a cache across sessions. Every program is cached,
# however fast it compiled: the eager ops the tests run (initializers, small array maths) are each
# a short compile that the other worker would repeat.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gradflow-tests-jit-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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
