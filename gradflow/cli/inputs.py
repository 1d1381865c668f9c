"""What a command reads and where it writes: the datasets as a stack reads them, a user's model
named on the command line (`--user-model path.py:Class`) and its input shape, and the check that
--out can take the results before anything is computed."""

from __future__ import annotations

import dataclasses
import pathlib

from gradflow.cli.config import DATASETS
from gradflow.nn.config import StackConfig


def _dataset(name: str, num_samples: int, model: StackConfig, seed: int):
    from gradflow import data

    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not one of {DATASETS}")
    recurrent = model.recurrent
    if name == "adding":
        if not recurrent:
            raise ValueError("dataset 'adding' needs a recurrent model (--model.kind rnn|lstm|gru)")
        return data.adding_problem(seq_len=model.seq_len, num_samples=num_samples, seed=seed), "regression"
    ds = data.mnist1d(seed=seed, num_samples=num_samples) if name == "mnist1d" else data.digits(seed=seed)
    layout = lambda x: _examples(model, x, name)  # noqa: E731
    return dataclasses.replace(ds, x_train=layout(ds.x_train), x_test=layout(ds.x_test)), "classification"


def _examples(model: StackConfig, x, source: str):
    """Flat examples (N, F) as `model` reads them: a recurrent stack a sequence of scalars (N, F, 1),
    a 2-D conv stack square images (N, n, n), a Transformer model.num_tokens float tokens (N, T, F / T):
    the atlas's reading of an MNIST-1D signal (`gradflow.atlas.measure`: SIGNAL samples as TOKENS
    tokens); MLPs and 1-D conv stacks (N, F). `source` names the data in errors."""
    n, features = x.shape
    if model.recurrent:
        return x[..., None]
    if model.kind == "conv" and model.spatial_dims == 2:
        side = round(features**0.5)
        if side * side != features:
            raise ValueError(
                f"spatial_dims=2 reads an example as a square image, but a {source} example has {features} "
                "values; use --dataset digits / --input digits (8 x 8 images) or spatial_dims 1"
            )
        return x.reshape(n, side, side)
    if model.kind == "transformer":
        tokens = model.num_tokens
        if features % tokens:
            divisors = [d for d in range(1, features + 1) if features % d == 0]
            raise ValueError(
                f"tokens={tokens} does not divide the {features} values of a {source} example; "
                f"use tokens among {divisors}"
            )
        return x.reshape(n, tokens, features // tokens)
    return x


def load_model(spec: str):
    """A model named on the command line: "path/to/file.py:Name" or "package.module:Name".

    A class is built with no arguments; anything else (an instance) is returned as it is.
    """
    import importlib
    import importlib.util

    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"user_model={spec!r} must be path/to/file.py:Name or package.module:Name")
    if where.endswith(".py"):
        path = pathlib.Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"user_model: no file {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"user_model: cannot import {where!r} ({e})") from e
    if not hasattr(module, name):
        found = sorted(k for k in vars(module) if not k.startswith("_"))
        raise ValueError(f"user_model: {where} has no {name!r}; it defines {', '.join(found)}")
    obj = getattr(module, name)
    return obj() if isinstance(obj, type) else obj


def _user_input(cmd) -> tuple:
    if cmd.input_shape is None or not cmd.input_shape or min(cmd.input_shape) < 1:
        raise ValueError(f"--user-model needs --input-shape with positive sizes, got {cmd.input_shape}")
    return tuple(cmd.input_shape)


def _writable(out: str) -> None:
    """Refuse an output location that cannot take the results, before computing them (checked
    by the process that writes them, process 0 of a multi-process run; every process stops)."""
    from gradflow import distributed

    def probe() -> None:
        path = pathlib.Path(out)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".gradflow-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"--out {out!r} cannot take the results: {e.strerror or e}") from None

    distributed.on_writer(probe)
