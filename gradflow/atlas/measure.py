"""The atlas's measurements of one group of configurations: spectra at initialization, a short
vmapped training run, and for recurrent cells the Jacobian and gradient through time."""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import data, distributed, initializers, signal, spectra
from gradflow.atlas.grid import (
    _ARCH_FIELDS,
    AtlasConfig,
    Case,
    NetCase,
    RecurrentCase,
    mean_field_rate,
    sigma_w,
)
from gradflow.atlas.verdict import _finite_spread, _log_rms, verdict
from gradflow.nn import ConvStack, GRUStack, LSTMStack, MLPStack, RNNStack, TransformerStack
from gradflow.nn.chains import walk
from gradflow.nn.config import TOKENS
from gradflow.numerics import stable_norm
from gradflow.optim import OptimConfig
from gradflow.train import Hparams, TrainConfig, init_variables, run_keys, sweep
from gradflow.train.hparams import scale_kernels

# The atlas's programs are small and run for seconds, so their time is mostly XLA compilation.
# LLVM optimization level 1 instead of 2 compiles them ~25% faster on CPU, with the same run
# time and results measured on the default grid.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def _model(case: Case, width: int) -> MLPStack:
    kernel = initializers.orthogonal(1.0) if case.init == "orthogonal" else initializers.gaussian(1.0)
    return MLPStack(
        depth=case.depth,
        width=width,
        activation=case.activation,
        kernel_init=kernel,
        **_ARCH_FIELDS[case.arch],
    )


class _InitCache:
    """The initial variables of the atlas's stacks, shared by the groups that have the same ones.

    An `MLPStack`'s parameters do not depend on its activation (for the activations of the
    atlas), so every activation of one (depth, architecture, weight family) starts from the same
    draw, made by one compiled call instead of one per group and program (random-number
    generation is a large part of the compile time of these small programs).
    """

    def __init__(self, seed: int, x: jax.Array):
        self._key, _ = run_keys(seed)
        self._x = x
        self._values: dict[tuple, Any] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def __call__(self, case: Case, width: int) -> Any:
        family = (case.arch, case.depth, width, case.init == "orthogonal")
        with self._lock:
            lock = self._locks.setdefault(family, threading.Lock())
        with lock:
            if family not in self._values:
                model = _model(dataclasses.replace(case, activation="tanh"), width)
                init = jax.jit(init_variables, static_argnums=0, compiler_options=COMPILER_OPTIONS)
                self._values[family] = init(model, self._key, self._x)
            return self._values[family]


def _finite_output(step, shared, p, h):
    """`walk` observer: whether a layer's output is finite."""
    h = step(shared, p, h)
    return h, jnp.all(jnp.isfinite(h))


def _spectra_group(
    model: MLPStack, variables: Any, x_spec: jax.Array, scales: np.ndarray, bn: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-layer log singular values (S, L, N) at initialization for each weight scale, whether
    each forward pass stayed finite (S,), and the mean square of the blocks' input h_0 (for the
    mean-field trajectory): chain and spectra in one compiled, vmapped call, from the
    initialization the training run starts from."""

    def one(scale, variables):
        c = model.chain(variables, x_spec if bn else x_spec[0], train=bn)
        (seg,), h0 = c.segments, c.h0
        p = dict(seg.params)
        p["params"] = scale_kernels(p["params"], scale)  # the blocks' own kernels
        step = lambda p_l, h: seg.step(seg.shared, p_l, h)  # noqa: E731
        _, (finite,) = walk(((seg.step, seg.depth),), (seg.shared,), (p,), h0, observe=_finite_output)
        return spectra.log_singular_values(step, p, h0), jnp.all(finite), jnp.mean(h0**2)

    # the scales sharded over every device of every process, like the training sweep below
    logs, finite, m0 = distributed.vmap_sharded(
        one, (np.asarray(scales, x_spec.dtype),), (variables,), compiler_options=COMPILER_OPTIONS
    )
    return logs, finite, float(m0[0])


def _measure_group(
    group: list[Case], cfg: AtlasConfig, ds: data.Dataset, inits: _InitCache
) -> tuple[list[dict], dict]:
    """Spectra at init and a vmapped training run for cases sharing one structure."""
    head = group[0]
    model = _model(head, cfg.width)
    scales = np.asarray([sigma_w(c.activation, c.init, cfg.width) for c in group], np.float32)
    variables = inits(head, cfg.width)
    x_spec = jnp.asarray(ds.x_train[: cfg.spectra_batch])
    bn = head.arch == "batchnorm"
    logs, finite, m0 = _spectra_group(model, variables, x_spec, scales, bn)

    if cfg.epochs == 0:
        return _rows(group, cfg, scales, logs, finite, None, ds, m0), {
            f"{c.name}/log_sv": logs[j] for j, c in enumerate(group)
        }
    tcfg = TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, optim=OptimConfig("adam", cfg.lr)
    )
    n = len(group)
    hp = Hparams(seed=[cfg.seed] * n, lr=[cfg.lr] * n, weight_scale=scales, clip_value=[1.0] * n)
    arrays = (ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    with np.errstate(all="ignore"):
        res = sweep(
            model, tcfg, arrays, hp, init_variables=variables, compiler_options=COMPILER_OPTIONS
        )  # sharded over jax.devices() when there are several
    arrays_out = {f"{c.name}/log_sv": logs[j] for j, c in enumerate(group)}
    arrays_out.update(
        {f"{c.name}/grad_norm": np.asarray(res.epochs["grad_norm"][j]) for j, c in enumerate(group)}
    )
    return _rows(group, cfg, scales, logs, finite, res.epochs, ds, m0), arrays_out


def _rows(
    group: list[Case],
    cfg: AtlasConfig,
    scales: np.ndarray,
    logs: np.ndarray,
    finite: np.ndarray,
    epochs: dict | None,
    ds: data.Dataset,
    m0: float,
) -> list[dict]:
    bn = group[0].arch == "batchnorm"
    rows = []
    for j, case in enumerate(group):
        end = logs[j, -1]
        first, ratio, acc, diverged = None, None, None, False
        if epochs is not None:
            first = np.asarray(epochs["grad_norm"][j])[0]  # (L,) mean over the first epoch
            with np.errstate(all="ignore"):
                if np.all(np.isfinite(first[[0, -1]])) and first[-1] > 0:
                    ratio = float(np.log(first[0] / first[-1]))
            last = float(np.asarray(epochs["test_accuracy"][j])[-1])
            diverged = bool(np.any(np.asarray(epochs["nonfinite_step"][j]) >= 0))
            acc = None if diverged or not math.isfinite(last) else last
        log_rms = _log_rms(end)
        rate = mean_field_rate(case, cfg.width, m0)
        row = {
            "name": case.name,
            "kind": "feedforward",
            **dataclasses.asdict(case),
            "sigma_w": float(scales[j]),
            "log_sigma_max": float(end[0]),
            "log_sigma_min": float(end[-1]),
            "log_rms_sigma": log_rms,
            "log_spread": _finite_spread(end),
            "measured_rate": 2.0 * log_rms / case.depth,
            "mean_field_rate": rate,
            "log_grad_ratio": ratio,
            "grad_norm_first_epoch": None if first is None else [float(v) for v in first],
            "final_accuracy": acc,
            # what the accuracy is judged against: a classifier that guesses, on this many examples
            "chance_accuracy": 1.0 / ds.num_classes,
            "test_examples": int(len(ds.y_test)),
            "diverged": diverged,
            "spectra_map": f"batch map (B={cfg.spectra_batch})" if bn else "per example",
        }
        row["forward_finite"] = bool(finite[j])
        row["label"] = verdict(log_rms, ratio, row["log_spread"], overflow=not finite[j])
        rows.append(row)
    return rows


def _recurrent_model(cell: str, hidden: int) -> nn.Module:
    if cell == "rnn":  # the classic vanilla RNN: Gaussian (LeCun) recurrent weights
        return RNNStack(hidden=hidden, recurrent_kernel_init=nn.initializers.lecun_normal())
    if cell == "rnn_orthogonal":
        return RNNStack(hidden=hidden)
    if cell.startswith("lstm"):
        return LSTMStack(hidden=hidden)
    return GRUStack(hidden=hidden)


def _measure_recurrent(case: RecurrentCase, cfg: AtlasConfig) -> tuple[dict, dict]:
    """d s_T / d s_0 through time on an adding-problem sequence, and the gradient through time."""
    ds = data.adding_problem(seq_len=case.seq_len, num_samples=64, seed=cfg.seed, num_test=8)
    x, y = jnp.asarray(ds.x_train[:16]), jnp.asarray(ds.y_train[:16])
    model = _recurrent_model(case.cell, cfg.width)
    key = jax.random.key(cfg.seed)
    variables = model.init(key, x)
    if case.cell == "lstm_chrono":
        cell = initializers.chrono_lstm(
            model.cell_params(variables), case.seq_len, jax.random.fold_in(key, 1)
        )
        variables = model.with_cell_params(variables, cell)
    res = spectra.model_spectra(model, variables, x[0])
    logs = res.log_singular_values  # (T, N)

    # ||dL/ds_t|| for every t in one backward pass (zero perturbations of every state).
    c = model.chain(variables, x)

    def loss(s_T):
        out = c.readout(s_T)[..., 0]
        return jnp.mean((out - y.reshape(out.shape)) ** 2)

    (g,) = c.state_gradients(loss)[1]
    gnorm = np.asarray(jax.vmap(stable_norm)(g.reshape(case.seq_len, -1)))  # no underflow at 1e-19
    with np.errstate(all="ignore"):
        ratio = float(np.log(gnorm[0] / gnorm[-1])) if gnorm[-1] > 0 else None
    end = logs[-1]
    log_rms = _log_rms(end)
    row = {
        "name": case.name,
        "kind": "recurrent",
        **dataclasses.asdict(case),
        "log_sigma_max": float(end[0]),
        "log_sigma_min": float(end[-1]),
        "log_rms_sigma": log_rms,
        "log_spread": _finite_spread(end),
        "measured_rate": 2.0 * log_rms / case.seq_len,
        "mean_field_rate": None,
        "log_grad_ratio": ratio,
        "grad_norm_through_time": [float(v) for v in gnorm],
        "final_accuracy": None,
        "diverged": False,
        "spectra_map": "through time",
    }
    # Through time the largest singular value is what carries a gradient back: label by it.
    row["label"] = verdict(float(end[0]), ratio, row["log_spread"])
    return row, {f"{case.name}/log_sv": logs, f"{case.name}/grad_norm": gnorm}


SIGNAL = 40
"""The length of an MNIST-1D signal (`gradflow.data.mnist1d`): the atlas CNNs' positions."""
# The atlas's Transformers read an MNIST-1D signal as TOKENS tokens of SIGNAL / TOKENS samples:
# the CLI's transformer kind's reading (`gradflow.nn.config.TOKENS`), one constant for both.


def net_channels(width: int) -> int:
    """The atlas CNNs' channels: half the MLP width (N = SIGNAL positions x C per block state)."""
    return max(2, width // 2)


def _net_model(case: NetCase, width: int) -> nn.Module:
    if case.net.startswith("cnn"):
        kernel = (
            initializers.delta_orthogonal(1.0)
            if case.net == "cnn_delta_orthogonal"
            else initializers.gaussian(1.0)
        )
        return ConvStack(
            depth=case.depth,
            channels=net_channels(width),
            kernel_size=3,
            spatial_dims=1,
            padding="circular",
            add_channel=True,
            activation="tanh",  # sigma_w = 1, sigma_b = 0: tanh's edge of chaos
            kernel_init=kernel,
            input_init=initializers.delta_orthogonal(1.0) if case.net == "cnn_delta_orthogonal" else kernel,
        )
    fields = {
        "transformer_pre_ln": dict(ln="pre"),
        "transformer_post_ln": dict(ln="post"),
        "attention_only": dict(ln=None, residual=False, activation=None),
    }[case.net]
    return TransformerStack(depth=case.depth, width=width, heads=4, max_len=TOKENS, **fields)


def _net_inputs(case: NetCase, x: np.ndarray) -> np.ndarray:
    """MNIST-1D signals (N, SIGNAL) as the net takes them: sequences, or TOKENS tokens (N, T, SIGNAL / T)."""
    return x if case.net.startswith("cnn") else x.reshape(len(x), TOKENS, SIGNAL // TOKENS)


def _measure_net(case: NetCase, cfg: AtlasConfig, ds: data.Dataset) -> tuple[dict, dict]:
    """A conv or attention net: spectra of d h_l / d h_0 over its blocks at initialization, the
    tokens' rank-collapse residual (Transformers), and a short training run (as the MLPs')."""
    model = _net_model(case, cfg.width)
    x_train, x_test = _net_inputs(case, ds.x_train), _net_inputs(case, ds.x_test)
    key, _ = run_keys(cfg.seed)
    init = jax.jit(init_variables, static_argnums=0, compiler_options=COMPILER_OPTIONS)
    variables = init(model, key, jnp.asarray(x_train[: cfg.batch_size]))
    x0 = jnp.asarray(x_train[0])
    # The verdict reads the last block's spectrum only: the layers below it cost their QRs and
    # no Jacobi sweeps (a 12-block CNN of 320 states: 0.4 s instead of 4.3 s on one CPU core).
    res = spectra.model_spectra(model, variables, x0, method="exact", depths=[case.depth])
    logs = res.log_singular_values  # (1, N): J_L
    c = model.chain(variables, x0)
    states = c.states()[0]
    finite = bool(jnp.all(jnp.isfinite(states)))
    token_residual = None
    if not case.net.startswith("cnn"):
        token_residual = float(signal.token_measures(model, variables, x0)["residual"][-1])
    first, ratio, acc, diverged = None, None, None, False
    arrays = {f"{case.name}/log_sv": logs}
    if cfg.epochs:
        tcfg = TrainConfig(
            epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, optim=OptimConfig("adam", cfg.lr)
        )
        hp = Hparams(seed=[cfg.seed], lr=[cfg.lr], weight_scale=[1.0], clip_value=[1.0])
        with np.errstate(all="ignore"):
            out = sweep(
                model,
                tcfg,
                (x_train, ds.y_train, x_test, ds.y_test),
                hp,
                shard=False,  # one run: on each process's own device, not copied to every device
                init_variables=variables,
                compiler_options=COMPILER_OPTIONS,
            )
        grad = np.asarray(out.epochs["grad_norm"][0])
        first = grad[0]
        with np.errstate(all="ignore"):
            if np.all(np.isfinite(first[[0, -1]])) and first[-1] > 0:
                ratio = float(np.log(first[0] / first[-1]))
        last = float(np.asarray(out.epochs["test_accuracy"][0])[-1])
        diverged = bool(np.any(np.asarray(out.epochs["nonfinite_step"][0]) >= 0))
        acc = None if diverged or not math.isfinite(last) else last
        arrays[f"{case.name}/grad_norm"] = grad
    end = logs[-1]
    log_rms = _log_rms(end)
    cnn = case.net.startswith("cnn")
    row = {
        "name": case.name,
        "kind": "net",
        **dataclasses.asdict(case),
        "sigma_w": 1.0 if cnn else None,
        "log_sigma_max": float(end[0]),
        "log_sigma_min": float(end[-1]),
        "log_rms_sigma": log_rms,
        "log_spread": _finite_spread(end),
        "measured_rate": 2.0 * log_rms / case.depth,
        # a circular CNN's mean field is the fully connected one (Xiao et al. 2018)
        "mean_field_rate": (
            mean_field_rate(
                Case("tanh", "critical", "plain", case.depth), cfg.width, float(jnp.mean(c.h0**2))
            )
            if cnn
            else None
        ),
        "log_grad_ratio": ratio,
        "grad_norm_first_epoch": None if first is None else [float(v) for v in first],
        "token_residual": token_residual,
        "final_accuracy": acc,
        "chance_accuracy": 1.0 / ds.num_classes,
        "test_examples": int(len(ds.y_test)),
        "diverged": diverged,
        "spectra_map": f"per example, N = {int(res.widths[-1])}",
        "forward_finite": finite,
    }
    row["label"] = verdict(
        log_rms, ratio, row["log_spread"], overflow=not finite, token_residual=token_residual
    )
    return row, arrays
