"""The vanishing/exploding atlas: where gradients vanish or explode, and what each remedy does.

For every configuration of a grid (activation x initialization x architecture x depth, plus
recurrent cells through time) the atlas measures, on MNIST-1D inputs:
- at initialization, the per-layer singular-value spectra of the input-output Jacobian
  J_l = d h_l / d h_0 of the blocks (`gradflow.spectra`, exact in log space; the BatchNorm
  batch map for BatchNorm stacks, since at initialization its per-example map is the identity);
- the mean-field prediction beside it: log chi_1 per layer (`gradflow.theory`; for BatchNorm the
  large-batch gradient growth of Yang et al. 2019; 0 for ReZero, whose blocks start as I);
- a short training run (Adam, vmapped over the initializations that share a structure,
  `gradflow.train.sweep`), recording per-layer gradient norms every step and the final accuracy;
and labels each configuration vanishing / exploding / healthy from the numbers (`verdict`).

Results are written as they are produced: one JSON line per configuration in
`results.jsonl` and one `.npz` of per-layer spectra per structure group, so a crash loses no
finished group, and a rerun with the same config skips what is already there.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import data, initializers, spectra, theory
from gradflow._checks import check_subset
from gradflow.nn import GRUStack, LSTMStack, MLPStack, RNNStack
from gradflow.numerics import stable_norm
from gradflow.optim import OptimConfig
from gradflow.train import Hparams, TrainConfig, init_variables, run_keys, scale_kernels, sweep

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu")
INITS = ("naive_small", "naive_large", "glorot", "he", "orthogonal", "critical")
ARCHS = ("plain", "batchnorm", "layernorm", "rezero")
CELLS = ("rnn", "rnn_orthogonal", "lstm", "lstm_chrono", "gru")
GRIDS = ("default", "full")

_ARCH_FIELDS = {
    "plain": {},
    "batchnorm": {"norm": "batch"},
    "layernorm": {"norm": "layer"},
    "rezero": {"residual": "rezero"},
}
_LOG100 = math.log(100.0)
# The atlas's programs are small and run for seconds, so their time is mostly XLA compilation.
# LLVM optimization level 1 instead of 2 compiles them ~25% faster on CPU, with the same run
# time and results measured on the default grid (3m53s -> 3m21s wall on 2 cores).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
ISOMETRIC_SPREAD = 16.0
VERDICT_RULE = (
    "vanishing if the RMS singular value of the end-to-end Jacobian at init is below 1e-2, or the "
    "first layer's gradient is below 1e-2 of the last layer's; exploding if either is above 1e2 "
    "(the Jacobian decides when they disagree), or when the forward activations themselves "
    "overflow float32; otherwise healthy, 'near-isometric' when all "
    "singular values lie within a factor e^16 of each other, else 'spreads' (dead ReLU units "
    "make the spread infinite). Recurrent nets are judged by the largest singular value through "
    "time, the direction a gradient can still come back along."
)


@dataclasses.dataclass(frozen=True)
class AtlasConfig:
    """What the atlas measures.

    Attributes:
      grid: "default" (a curated grid that covers every value of every axis and finishes in a
        few minutes on a 2-core CPU) or "full" (the whole cross product of the axes below: a
        GPU-sized run).
      activations, inits, archs, depths: the axes of the feed-forward grid.
      cells, seq_lens: recurrent cells (through time, on adding-problem sequences) and lengths.
      width: hidden width of the MLPs (and of the recurrent cells).
      epochs, batch_size, lr, train_samples: the short training run (Adam) on MNIST-1D;
        epochs=0 measures at initialization only.
      spectra_batch: batch size of the BatchNorm batch map whose Jacobian is measured.
      seed: seed of data, initialization and shuffling.
    """

    grid: str = "default"
    activations: tuple[str, ...] = ACTIVATIONS
    inits: tuple[str, ...] = INITS
    archs: tuple[str, ...] = ARCHS
    depths: tuple[int, ...] = (10, 50, 200)
    cells: tuple[str, ...] = CELLS
    seq_lens: tuple[int, ...] = (200,)
    width: int = 32
    epochs: int = 2
    batch_size: int = 50
    lr: float = 1e-3
    train_samples: int = 2000
    spectra_batch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise ValueError(f"grid={self.grid!r} is not one of {GRIDS}")
        check_subset("activations", self.activations, ACTIVATIONS)
        check_subset("inits", self.inits, INITS)
        check_subset("archs", self.archs, ARCHS)
        check_subset("cells", self.cells, CELLS)
        for name in ("depths", "seq_lens"):
            values = getattr(self, name)
            if not values or any(int(v) < 2 for v in values):
                raise ValueError(f"{name} must be a non-empty list of integers >= 2, got {values}")
        if int(self.epochs) < 0:
            raise ValueError(f"epochs must be >= 0 (0 skips training), got {self.epochs}")
        for name in ("width", "batch_size", "train_samples", "spectra_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_samples < 10 * self.batch_size // 8:
            raise ValueError(f"train_samples={self.train_samples} leaves no full batch of {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class Case:
    """One feed-forward configuration."""

    activation: str
    init: str
    arch: str
    depth: int

    @property
    def name(self) -> str:
        return f"{self.activation}-{self.init}-{self.arch}-L{self.depth}"


@dataclasses.dataclass(frozen=True)
class RecurrentCase:
    """One recurrent configuration (gradients through time)."""

    cell: str
    seq_len: int

    @property
    def name(self) -> str:
        return f"{self.cell}-T{self.seq_len}"


def cases(cfg: AtlasConfig) -> tuple[list[Case], list[RecurrentCase]]:
    """The configurations of `cfg`'s grid (feed-forward, recurrent)."""
    rec = [RecurrentCase(c, int(t)) for c in cfg.cells for t in cfg.seq_lens]
    if cfg.grid == "full":
        ff = [
            Case(a, i, arch, int(d))
            for arch in cfg.archs
            for a in cfg.activations
            for d in cfg.depths
            for i in cfg.inits
        ]
        return ff, rec
    # The default grid (18 compiled programs, one per group of `_groups`): every activation x
    # Gaussian init at the middle depth, orthogonal for tanh and relu; the classic cases at the
    # other depths; BatchNorm, LayerNorm and ReZero for relu/He at the deepest.
    depths = sorted(int(d) for d in cfg.depths)
    mid, deep = depths[len(depths) // 2], depths[-1]
    ff: list[Case] = [
        Case(a, i, "plain", mid)
        for a in cfg.activations
        for i in cfg.inits
        if i != "orthogonal" or a in ("tanh", "relu")
    ]
    classic = [("sigmoid", "naive_small"), ("sigmoid", "glorot"), ("tanh", "orthogonal")]
    classic += [("relu", "he"), ("relu", "glorot"), ("relu", "naive_large")]
    ff += [Case(a, i, "plain", d) for d in depths if d != mid for a, i in classic]
    ff += [Case("relu", "he", arch, deep) for arch in ("batchnorm", "layernorm", "rezero")]
    keep = [c for c in ff if c.activation in cfg.activations and c.init in cfg.inits and c.arch in cfg.archs]
    return list(dict.fromkeys(keep)), rec


def sigma_w(activation: str, init: str, width: int) -> float:
    """The weight scale sigma_w (Var W = sigma_w^2 / fan_in) of an initialization at `width`.

    naive_small / naive_large: N(0, 0.01^2) and N(0, 1) whatever the width (the classic naive
    choices); glorot: 2 / (fan_in + fan_out) = 1 / width for square layers; he: 2 / fan_in;
    critical and orthogonal: the order-to-chaos value chi_1 = 1 at sigma_b = 0
    (`theory.critical_sigma_w`; orthogonal weights are scaled by it).
    """
    if init == "naive_small":
        return 0.01 * math.sqrt(width)
    if init == "naive_large":
        return math.sqrt(width)
    if init == "glorot":
        return 1.0
    if init == "he":
        return math.sqrt(2.0)
    return float(theory.critical_sigma_w(activation, 0.0))


def mean_field_rate(case: Case, width: int) -> float | None:
    """Predicted log mean squared singular value of J_l per layer (None where no theory applies)."""
    if case.arch == "rezero":
        return 0.0  # alpha = 0 at init: every block is the identity
    if case.arch == "batchnorm":
        return float(jnp.log(theory.batchnorm_gradient_growth(case.activation)))
    if case.arch == "layernorm":
        return None
    return float(jnp.log(theory.chi1(case.activation, sigma_w(case.activation, case.init, width), 0.0)))


def verdict(log_rms: float, log_grad_ratio: float | None, log_spread: float, overflow: bool = False) -> str:
    """The label of a configuration from its numbers.

    log_rms: log of the RMS singular value of the end-to-end Jacobian at init (1/2 log mean
    sigma^2); log_grad_ratio: log of first-layer / last-layer gradient norm in training (or
    through time); log_spread: log sigma_max / sigma_min; overflow: the forward pass itself
    left float32's range (inf/nan activations), so the Jacobian there is meaningless.
    - "exploding (activations overflow)" if overflow;
    - "vanishing" if the RMS singular value is below 1e-2, or the first layer's gradient is
      below 1e-2 of the last layer's (a factor 100 over the depth);
    - "exploding" if either is above 1e2;
    - otherwise "healthy", qualified "(near-isometric)" when all singular values lie within a
      factor e^16 (~1e7, float32's precision) of each other, else "(spreads)": a Gaussian
      tanh net at criticality spreads over e^130 by depth 50 at width 32, an orthogonal one
      stays within e^12; dead ReLU units make the spread infinite.
    The Jacobian decides when the two disagree.
    """
    if overflow:
        return "exploding (activations overflow)"
    g = log_grad_ratio if log_grad_ratio is not None and math.isfinite(log_grad_ratio) else 0.0
    if log_rms < -_LOG100 or (log_rms <= _LOG100 and g < -_LOG100):
        return "vanishing"
    if log_rms > _LOG100 or g > _LOG100:
        return "exploding"
    if log_spread < ISOMETRIC_SPREAD:
        return "healthy (near-isometric)"
    return "healthy (spreads)"


def _model(case: Case, width: int) -> MLPStack:
    kernel = initializers.orthogonal(1.0) if case.init == "orthogonal" else initializers.gaussian(1.0)
    return MLPStack(
        depth=case.depth,
        width=width,
        activation=case.activation,
        kernel_init=kernel,
        **_ARCH_FIELDS[case.arch],
    )


def _log_rms(logs: np.ndarray) -> float:
    x = 2.0 * np.asarray(logs, np.float64)
    m = np.max(x)
    if not np.isfinite(m):
        return float(m)
    return 0.5 * float(m + np.log(np.mean(np.exp(x - m))))


def _finite_spread(logs: np.ndarray) -> float:
    logs = np.asarray(logs)
    return float(logs[0] - logs[-1]) if np.isfinite(logs[-1]) else math.inf


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


def _spectra_group(
    model: MLPStack, variables: Any, x_spec: jax.Array, scales: np.ndarray, bn: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer log singular values (S, L, N) at initialization for each weight scale, and
    whether each forward pass stayed finite (S,): chain and spectra in one compiled, vmapped
    call, from the initialization the training run starts from."""

    def one(scale, variables):
        c = model.chain(variables, x_spec if bn else x_spec[0], train=bn)
        (seg,), h0 = c.segments, c.h0
        p = dict(seg.params)
        p["params"] = scale_kernels(p["params"], scale)  # the blocks' own kernels
        step = lambda p_l, h: seg.step(seg.shared, p_l, h)  # noqa: E731

        def fwd(carry, p_l):
            h, ok = carry
            h = step(p_l, h)
            return (h, ok & jnp.all(jnp.isfinite(h))), None

        (_, finite), _ = jax.lax.scan(fwd, (h0, jnp.asarray(True)), p)
        return spectra.log_singular_values(step, p, h0), finite

    logs, finite = jax.jit(jax.vmap(one, in_axes=(0, None)), compiler_options=COMPILER_OPTIONS)(
        jnp.asarray(scales, x_spec.dtype), variables
    )
    return np.asarray(logs), np.asarray(finite)


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
    logs, finite = _spectra_group(model, variables, x_spec, scales, bn)

    if cfg.epochs == 0:
        return _rows(group, cfg, scales, logs, finite, None), {
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
    return _rows(group, cfg, scales, logs, finite, res.epochs), arrays_out


def _rows(
    group: list[Case],
    cfg: AtlasConfig,
    scales: np.ndarray,
    logs: np.ndarray,
    finite: np.ndarray,
    epochs: dict | None,
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
        rate = mean_field_rate(case, cfg.width)
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
            "diverged": diverged,
            "spectra_map": f"batch map (B={cfg.spectra_batch})" if bn else "per example",
        }
        row["forward_finite"] = bool(finite[j])
        row["label"] = verdict(log_rms, ratio, row["log_spread"], overflow=not finite[j])
        rows.append(row)
    return rows


def chrono_lstm(params: Any, t_max: int, key: jax.Array) -> Any:
    """Chrono initialization of an LSTMStack's gates (Tallec & Ollivier 2018).

    Forget-gate biases log U(1, t_max - 1) and input-gate biases their negatives, so that the
    cell keeps its memory for ~t_max steps at initialization (the gated path through c that
    lets an LSTM carry gradients through time).
    """
    cell = params["cell"]
    b = jnp.log(jax.random.uniform(key, cell["hf"]["bias"].shape, minval=1.0, maxval=max(t_max - 1, 2)))
    cell = {**cell, "hf": {**cell["hf"], "bias": b}, "hi": {**cell["hi"], "bias": -b}}
    return {**params, "cell": cell}


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
        variables = {"params": chrono_lstm(variables["params"], case.seq_len, jax.random.fold_in(key, 1))}
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


def _workers() -> int:
    """Groups measured concurrently: one per CPU core (at most 4), or GRADFLOW_ATLAS_WORKERS."""
    env = os.environ.get("GRADFLOW_ATLAS_WORKERS")
    return max(1, int(env)) if env else max(1, min(4, os.cpu_count() or 1))


def _groups(ff: list[Case]) -> list[list[Case]]:
    """Cases that share a compiled program: same activation, arch, depth and weight family."""
    out: dict[tuple, list[Case]] = {}
    for c in ff:
        out.setdefault((c.activation, c.arch, c.depth, c.init == "orthogonal"), []).append(c)
    return list(out.values())


def run(
    cfg: AtlasConfig,
    out: str | pathlib.Path = "runs/atlas",
    *,
    progress: bool | None = None,
    on_row: Callable[[dict], None] | None = None,
    only: tuple[Sequence[Case], Sequence[RecurrentCase]] | None = None,
) -> list[dict]:
    """Measure every configuration of `cfg`, writing results as it goes, and return the rows.

    Writes `out/config.json`, appends one JSON line per configuration to `out/results.jsonl`,
    and saves per-group arrays to `out/arrays/<group>.npz` (per-layer log singular values and
    per-layer gradient norms). Rows already in results.jsonl for the same config are reused.
    `only` replaces the grid by explicit (feed-forward, recurrent) cases.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out = pathlib.Path(out)
    (out / "arrays").mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(cfg)
    if only is not None:
        config["only"] = [c.name for c in (*only[0], *only[1])]
    cfg_path, rows_path = out / "config.json", out / "results.jsonl"
    done: dict[str, dict] = {}
    if (
        cfg_path.exists()
        and json.loads(cfg_path.read_text()) == json.loads(json.dumps(config))
        and rows_path.exists()
    ):
        for line in rows_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["name"]] = row
    else:
        rows_path.write_text("")
    cfg_path.write_text(json.dumps(config, indent=2))

    ff, rec = cases(cfg) if only is None else (list(only[0]), list(only[1]))
    groups = _groups(ff)
    ds = data.mnist1d(seed=cfg.seed, num_samples=int(cfg.train_samples / 0.8))
    if progress is None:
        import sys

        progress = sys.stdout.isatty()
    rows: list[dict] = []
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        disable=not progress,
    )
    with bar:
        task = bar.add_task("atlas", total=len(ff) + len(rec))

        def emit(row: dict) -> None:
            rows.append(row)
            if row["name"] not in done:
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if on_row is not None:
                on_row(row)
            bar.update(task, advance=1, description=f"atlas: {row['name']} -> {row['label']}")

        # XLA compiles one program per group and most of the atlas's time is compilation, which
        # releases the GIL: groups run in a small thread pool so every core compiles. Results
        # are emitted (and written) in grid order as each group finishes.
        todo = [(i, g) for i, g in enumerate(groups) if not all(c.name in done for c in g)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=_workers()) as pool:
            inits = _InitCache(cfg.seed, jnp.asarray(ds.x_train[: cfg.batch_size]))
            futures = {i: pool.submit(_measure_group, g, cfg, ds, inits) for i, g in todo}
            for i, group in enumerate(groups):
                if i not in futures:
                    for c in group:
                        emit(done[c.name])
                    continue
                group_rows, arrays = futures[i].result()
                np.savez_compressed(out / "arrays" / f"ff_{i:03d}.npz", **arrays)
                for row in group_rows:
                    emit(row)
        for i, case in enumerate(rec):
            if case.name in done:
                emit(done[case.name])
                continue
            row, arrays = _measure_recurrent(case, cfg)
            np.savez_compressed(out / "arrays" / f"rec_{i:03d}.npz", **arrays)
            emit(row)
    return rows


def load_rows(out: str | pathlib.Path) -> list[dict]:
    """The rows of a finished (or interrupted) atlas run in `out`."""
    path = pathlib.Path(out) / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no atlas results at {path} (run `gradflow atlas --out {out}` first)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_arrays(out: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every per-configuration array of an atlas run, keyed "<name>/log_sv" and "<name>/grad_norm"."""
    arrays: dict[str, np.ndarray] = {}
    for f in sorted((pathlib.Path(out) / "arrays").glob("*.npz")):
        with np.load(f) as z:
            arrays.update({k: z[k] for k in z.files})
    return arrays
