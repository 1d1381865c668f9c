"""The `gradflow` command: help, errors with exit code 2, and small end-to-end runs."""

import csv
import json

import numpy as np
import pytest
import tyro

from gradflow import atlas, cli
from gradflow.cli import app, inputs
from gradflow.cli.config import Atlas, Spectra

SUBCOMMANDS = ("spectra", "train", "sweep", "atlas", "report")


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"gradflow {sub}" in text
    assert app.COMMANDS[sub][0].__doc__.split()[0] in text


@pytest.mark.parametrize(
    "argv, named",
    [
        (["atlas", "--activations", "swish"], "swish"),
        (["spectra", "--model.activation", "foo"], "activation"),
        (["spectra", "--method", "svd"], "method"),
        (["train", "--train.optim.optimizer", "lbfgs"], "optimizer"),
        (["train", "--dataset", "imagenet"], "dataset"),
        (
            ["train", "--model.norm", "batchnorm"],
            "gradflow: error: norm must be one of (None, 'batch', 'layer'), got 'batchnorm' (did you mean 'batch'?)",
        ),
        (["train", "--log", "tensorbord"], "--log must be one of (None, 'tensorboard'), got 'tensorbord'"),
        (["sweep", "--runs-per-call", "0"], "--runs-per-call must be >= 1, got 0"),
        (["atlas", "--bogus"], "--bogus"),
        (["report", "/no/such/run"], "/no/such/run"),
        # an output location that cannot take the results, refused before computing them
        (["spectra", "--out", "/dev/null/run"], "--out '/dev/null/run' cannot take the results"),
        (["sweep", "--out", "/dev/null/run"], "--out '/dev/null/run' cannot take the results"),
        (["train", "--out", "/dev/null/run"], "--out '/dev/null/run' cannot take the results"),
        # a flag the chosen kind does not read is refused, naming it
        (["spectra", "--model.heads", "2"], "heads=2 applies to kind='transformer' only, not kind='mlp'"),
        (
            ["train", "--model.kind", "transformer", "--model.padding", "same"],
            "padding='same' applies to kind='conv'",
        ),
        (
            ["spectra", "--model.kernel-size", "5"],
            "kernel_size=5 does not apply to kind='mlp' (only to 'conv')",
        ),
        (
            ["spectra", "--model.kind", "transformer", "--model.norm", "layer"],
            "norm='layer' does not apply to kind='transformer' (only to 'mlp', 'conv') (a Transformer's "
            "LayerNorm placement is ln)",
        ),
        (
            ["spectra", "--model.kind", "transformer", "--model.ln", "mid"],
            "ln must be one of ('pre', 'post', 'none')",
        ),
        (["spectra", "--model.kind", "transformer", "--model.width", "6"], "heads=4 does not divide width=6"),
        (
            ["spectra", "--model.kind", "transformer", "--model.tokens", "3"],
            "tokens=3 does not divide the 40 values",
        ),
        (["spectra", "--model.kind", "conv", "--model.stride", "3"], "stride=3 applies to the down blocks"),
        (
            ["spectra", "--model.kind", "conv", "--model.spatial-dims", "3"],
            "spatial_dims must be one of (1, 2), got 3",
        ),
        (["train", "--model.kind", "conv", "--model.spatial-dims", "2"], "a mnist1d example has 40 values"),
    ],
)
def test_bad_flags_and_values_exit_2_naming_them(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr()
    assert named in " ".join((err.out + err.err).split())
    assert "tyro-dummy" not in err.out + err.err  # tyro's internal wrapper name never shows


def test_spectra_prints_the_table_and_writes_results(tmp_path, capsys):
    out = tmp_path / "spectra"
    code = cli.main(
        [
            "spectra",
            "--model.depth",
            "6",
            "--model.width",
            "8",
            "--model.init",
            "orthogonal",
            "--model.activation",
            "linear",
            "--input",
            "random",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["log_max"] == pytest.approx([0.0] * 6, abs=1e-5)  # orthogonal linear: isometry
    assert summary["log_min"] == pytest.approx([0.0] * 6, abs=1e-5)
    assert "log smax" in capsys.readouterr().out
    assert (out / "spectra.png").stat().st_size > 1000


def _float64_products_log_sv(model, variables, x):
    """log sigma of J_l = d h_l / d h_0 for every layer l of `model`'s chain, descending: each
    layer's Jacobian by float64 jacfwd, their products and SVDs in numpy float64."""
    import jax
    import jax.numpy as jnp

    from gradflow.nn import chain
    from gradflow.numerics import x64

    with x64():
        v64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), variables)
        c = chain(model, v64, jnp.asarray(np.asarray(x), jnp.float64))
        h, product, rows = c.h0, None, []
        for seg in c.segments:
            for i in range(seg.depth):
                p = seg.layer_params(i)
                f = lambda v, seg=seg, p=p, shape=h.shape: seg.step(seg.shared, p, v.reshape(shape)).ravel()  # noqa: E731
                a = np.asarray(jax.jacfwd(f)(h.ravel()))
                product = a if product is None else a @ product
                rows.append(np.sort(np.log(np.linalg.svd(product, compute_uv=False)))[::-1])
                h = seg.step(seg.shared, p, h)
    return rows


@pytest.mark.parametrize(
    "flags, layers",
    [
        # a circular conv stack of two one-block stages on MNIST-1D's 40 samples: 40x2 -> 20x3 states
        (["--model.kind", "conv", "--model.stages", "3"], ["stage1[1]", "down2", "stage2[1]"]),
        # a pre-LN Transformer on MNIST-1D's 40 samples as 4 tokens of 10: 4 x 4 token states
        (
            ["--model.kind", "transformer", "--model.heads", "2", "--model.tokens", "4"],
            ["blocks[1]", "blocks[2]"],
        ),
    ],
    ids=["conv", "transformer"],
)
def test_spectra_of_conv_and_transformer_kinds_against_float64(flags, layers, tmp_path):
    """The CLI's written spectra of `--model.kind conv|transformer` equal a float64 jacfwd + SVD of
    the same stack (built from the same config, at the same input) at every layer."""
    import jax

    from gradflow import data

    out = tmp_path / "spectra"
    conv = "conv" in flags
    argv = ["spectra", "--model.depth", "1" if conv else "2", "--model.width", "2" if conv else "4", *flags]
    assert cli.main([*argv, "--model.activation", "tanh", "--out", str(out)]) == 0
    saved = np.load(out / "spectra.npz")
    assert list(saved["layers"]) == layers
    cmd = tyro.extras.subcommand_cli_from_dict({"spectra": Spectra}, args=argv)
    model = cmd.model.build()
    flat = data.mnist1d(seed=0, num_samples=100).x_train[:1]
    x = inputs._examples(cmd.model, np.asarray(flat), cmd.input)
    variables = model.init(jax.random.key(0), x)
    wants = _float64_products_log_sv(model, variables, x[0])
    for row, want, name in zip(saved["log_singular_values"], wants, layers, strict=True):
        np.testing.assert_allclose(row[: want.size], want, atol=2e-4, err_msg=name)


def test_examples_are_laid_out_as_each_kind_reads_them():
    """A Transformer reads MNIST-1D signals as `TOKENS` float tokens, the atlas's reading
    (`atlas.measure`); a 2-D conv stack reads digits' 64 pixels as the 8 x 8 image."""
    from gradflow.atlas import measure
    from gradflow.nn import StackConfig, config

    assert config.TOKENS == measure.TOKENS
    x = np.arange(2 * measure.SIGNAL, dtype=np.float32).reshape(2, measure.SIGNAL)
    cfg = StackConfig(kind="transformer", width=8, heads=2)
    np.testing.assert_array_equal(
        inputs._examples(cfg, x, "mnist1d"), x.reshape(2, measure.TOKENS, measure.SIGNAL // measure.TOKENS)
    )
    pixels = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    images = inputs._examples(StackConfig(kind="conv", spatial_dims=2), pixels, "digits")
    np.testing.assert_array_equal(images, pixels.reshape(2, 8, 8))
    assert inputs._examples(StackConfig(kind="conv"), x, "mnist1d") is x  # 1-D: the signal as it is


def test_transformer_kind_trains(tmp_path):
    """`gradflow train --model.kind transformer` on MNIST-1D; the config's fields reach the stack."""
    from gradflow.nn import StackConfig

    m = StackConfig(kind="transformer", width=8, heads=2, ln="none", skip=False, mlp=False, tokens=5).build()
    assert (m.ln, m.residual, m.activation, m.max_len, m.heads) == (None, False, None, 5, 2)
    assert StackConfig(kind="transformer", ln="post").build().ln == "post"
    out = tmp_path / "train"
    argv = ["train", "--model.kind", "transformer", "--model.depth", "2", "--model.width", "8"]
    argv += ["--model.heads", "2", "--num-samples", "200", "--train.epochs", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(record["grad_norm"]) >= 2 and np.isfinite(record["grad_norm"]).all()


def test_tiny_atlas_and_report_rebuild(tmp_path):
    out = tmp_path / "atlas"
    argv = [
        "atlas",
        "--grid",
        "full",
        "--activations",
        "relu",
        "--inits",
        "he",
        "--archs",
        "plain",
        "--depths",
        "4",
        "--cells",
        "rnn",
        "--seq-lens",
        "6",
        "--width",
        "8",
        "--epochs",
        "1",
        "--train-samples",
        "200",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["relu-he-plain-L4", "rnn-T6"]
    assert rows[0]["final_accuracy"] is not None and len(rows[0]["grad_norm_first_epoch"]) == 4
    (out / "report.html").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert "data:image/png;base64," in (out / "report.html").read_text()


@pytest.mark.parametrize(
    "flags, names, note",
    [
        (
            ["--full", "--archs", "plain", "--activations", "tanh", "--depths", "10"],
            [f"tanh-{i}-plain-L10" for i in atlas.INITS],
            "no recurrent cells",
        ),
        (["--cells", "lstm", "--seq-lens=20"], ["lstm-T20"], "no feed-forward nets"),
        (
            ["--activations", "relu", "--inits", "he", "--depths", "10", "--cells", "gru"],
            [f"relu-he-{a}-L10" for a in ("plain", "batchnorm", "layernorm", "rezero")] + ["gru-T200"],
            "no conv and attention nets",
        ),
        (
            ["--nets", "cnn_gaussian", "attention_only", "--depths", "10"],
            ["cnn_gaussian-L10", "attention_only-L10"],
            "no feed-forward nets",
        ),
    ],
)
def test_an_atlas_command_line_runs_only_the_parts_it_names(flags, names, note, capsys):
    """Naming only some parts' axes (feed-forward, recurrent, nets) leaves the others out (the
    issue: --grid full --archs --activations also ran five T = 200 cells)."""
    cmd = tyro.extras.subcommand_cli_from_dict({"atlas": Atlas}, args=["atlas", *flags])
    ff, rec, nets = atlas.cases(app._narrow_atlas(cmd, ["atlas", *flags]).config)
    assert sorted(c.name for c in ff + rec + nets) == sorted(names)
    out = capsys.readouterr().out
    assert (note in out) if note else "gradflow atlas:" not in out
    with pytest.raises(ValueError, match="all empty"):
        atlas.AtlasConfig(activations=(), cells=(), nets=())


MODELS = str(__import__("pathlib").Path(__file__).parents[1] / "experiments" / "models" / "small_cnn.py")


def test_spectra_of_a_user_model_file_against_float64(tmp_path, capsys):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gradflow.numerics import x64

    out = tmp_path / "user"
    argv = [
        "spectra",
        "--user-model",
        f"{MODELS}:Tiny",
        "--input-shape",
        "1",
        "6",
        "6",
        "1",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert "Conv_0" in capsys.readouterr().out  # the table names the layers
    saved = np.load(out / "spectra.npz")
    assert list(saved["layers"]) == ["Conv_0", "Conv_1", "Dense_0"]
    # oracle: the whole model's Jacobian at the same input, float64 jacfwd + SVD
    model = inputs.load_model(f"{MODELS}:Tiny")
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.fold_in(key, 1), (1, 6, 6, 1))
    v = model.init(key, x)
    with x64():
        v64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), v)
        f = lambda x: model.apply(v64, x).reshape(-1)  # noqa: E731
        jac = np.asarray(jax.jacfwd(f)(jnp.asarray(np.asarray(x), jnp.float64))).reshape(5, -1)
    want = np.log(np.linalg.svd(jac, compute_uv=False))
    np.testing.assert_allclose(saved["log_singular_values"][-1, :5], want, atol=2e-4)
    assert np.isneginf(saved["log_singular_values"][-1, 5:]).all()


@pytest.mark.parametrize(
    "argv, named",
    [
        (["spectra", "--user-model", "nofile.py:CNN", "--input-shape", "1", "3"], "no file nofile.py"),
        (["spectra", "--user-model", f"{MODELS}:Nope", "--input-shape", "1", "3"], "has no 'Nope'"),
        (["spectra", "--user-model", f"{MODELS}:Tiny"], "needs --input-shape"),
        (["spectra", "--user-model", "CNN", "--input-shape", "1", "3"], "must be path/to/file.py:Name"),
        (["train", "--user-model", f"{MODELS}:CNN1D", "--input-shape", "41"], "has 41 entries"),
    ],
)
def test_bad_user_models_exit_2_naming_the_problem(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr()
    assert named in " ".join((err.out + err.err).split())


def test_sweep_prints_a_best_first_table_and_writes_the_same_rows(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model.depth", "2", "--model.width", "8", "--num-samples", "200"]
    argv += ["--train.epochs", "1", "--seeds", "0", "1", "--lr", "1e-4", "3e-3", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    runs = json.loads((out / "results.json").read_text())["runs"]
    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    ep = np.load(out / "epochs.npz")
    assert len(runs) == len(csv_rows) == 4
    # hparams as given (1e-4, not float32's 9.999999747378752e-05), numbers those of epochs.npz,
    # whose run order is the grid's (seeds fastest)
    assert {(r["seed"], r["lr"]) for r in runs} == {(0, 1e-4), (1, 1e-4), (0, 3e-3), (1, 3e-3)}
    for r, c in zip(runs, csv_rows):
        i = 2 * [1e-4, 3e-3].index(r["lr"]) + r["seed"]
        assert r["run"] == i and int(c["run"]) == i  # the row points at its run in epochs.npz
        assert r["test_accuracy"] == pytest.approx(float(ep["test_accuracy"][i, -1]), rel=1e-6)
        g = ep["grad_norm"][i, 0]
        assert r["grad_first_over_last"] == pytest.approx(float(g[0] / g[-1]), rel=1e-6)
        assert float(c["loss"]) == pytest.approx(r["loss"], rel=1e-6) and int(c["seed"]) == r["seed"]
    acc = [r["test_accuracy"] for r in runs]
    assert acc == sorted(acc, reverse=True) and [r["best"] for r in runs] == [True, False, False, False]
    best = next(line for line in text.splitlines() if "*" in line)  # the marked row is the best run
    assert f"{runs[0]['lr']:g}" in best and "ok" in best and "9.99999" not in text


def test_sweep_in_calls_keeps_each_call_and_a_rerun_trains_only_the_missing_ones(tmp_path, capsys):
    """4 runs in calls of 3 (the last padded): the same records as one call; after a crash that
    lost call 1, a rerun keeps call 0 as written (here marked by a sentinel) and trains call 1."""
    argv = ["sweep", "--model.depth", "2", "--model.width", "8", "--num-samples", "200"]
    argv += ["--train.epochs", "1", "--seeds", "0", "1", "--lr", "1e-4", "3e-3"]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    one = np.load(tmp_path / "one" / "epochs.npz")
    out = tmp_path / "calls"
    chunked = [*argv, "--runs-per-call", "3", "--out", str(out)]
    capsys.readouterr()
    assert cli.main(chunked) == 0
    said = capsys.readouterr().out
    assert "call 1/2: runs 0..2 in" in said and "call 2/2: runs 3..3 in" in said  # progress per call
    two = np.load(out / "epochs.npz")
    assert two["loss"].shape == (4, 1)
    for k in one.files:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-7, err_msg=k)
    calls = (out / "calls.jsonl").read_text().splitlines()
    assert [json.loads(c)["runs"] for c in calls] == [[0, 3], [3, 4]]
    # a crash after call 0: call 1's record and arrays are lost; call 0's loss marked
    (out / "calls.jsonl").write_text(calls[0] + "\n")
    (out / "arrays" / "call1.npz").unlink()
    z = dict(np.load(out / "arrays" / "call0.npz"))
    z["loss"] = np.full_like(z["loss"], 7.0)
    np.savez(out / "arrays" / "call0.npz", **z)
    capsys.readouterr()
    assert cli.main(chunked) == 0
    said = capsys.readouterr().out
    assert "1 of 2 calls already in" in said and "4 runs (3 kept from an earlier run): 1 trained" in said
    again = np.load(out / "epochs.npz")
    assert (again["loss"][:3] == 7.0).all()  # kept, not trained again
    np.testing.assert_allclose(again["loss"][3], one["loss"][3], rtol=1e-5)
    assert cli.main([*chunked, "--fresh"]) == 0  # --fresh trains every call again
    np.testing.assert_allclose(np.load(out / "epochs.npz")["loss"], one["loss"], rtol=1e-5)
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--runs-per-call", "0", "--out", str(out)])
    assert e.value.code == 2 and "--runs-per-call must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, said",
    [
        (
            ["--train.optim.lr", "0.01"],
            "--train.optim.lr 0.01 is not read by a sweep; give the learning rates with --lr",
        ),
        (
            ["--train.optim.clip-value", "0.5"],
            "--train.optim.clip-value 0.5 is not read by a sweep; give the clipping thresholds with --clip-value",
        ),
    ],
)
def test_a_sweep_refuses_the_train_flags_its_grid_replaces(flags, said, tmp_path, capsys):
    """A sweep's grid (--lr x --clip-value) replaces train.optim's lr and clip_value: a flag for
    them is refused, naming the flag to use, before any work (--out is not even made)."""
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", *flags, "--out", str(out)])
    assert e.value.code == 2
    assert said in capsys.readouterr().err
    assert not out.exists()


def test_sweep_help_says_what_train_seed_seeds(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one help line per field: nothing wrapped
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--help"])
    assert e.value.code == 0
    assert "--train.seed seeds only the data" in " ".join(capsys.readouterr().out.split())


def test_ctrl_c_during_a_sweep_keeps_the_call_in_flight_and_the_rerun_trains_the_rest(
    tmp_path, capsys, monkeypatch
):
    import os
    import signal

    from gradflow import train

    argv = ["sweep", "--model.depth", "2", "--model.width", "8", "--num-samples", "200"]
    argv += ["--train.epochs", "1", "--seeds", "0", "1", "--lr", "1e-4", "3e-3", "--runs-per-call", "2"]
    argv += ["--out", str(tmp_path / "sweep")]
    real = train.sweep

    def interrupted(*args, **kwargs):  # Ctrl-C while the first call trains
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "sweep", interrupted)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 of 2 calls are kept" in err and "run the same command again" in err
    lines = (tmp_path / "sweep" / "calls.jsonl").read_text().splitlines()
    assert [json.loads(line)["runs"] for line in lines] == [[0, 2]]
    assert not (tmp_path / "sweep" / "epochs.npz").exists()
    monkeypatch.setattr(train, "sweep", real)
    assert cli.main(argv) == 0
    assert "1 of 2 calls already in" in capsys.readouterr().out
    assert np.load(tmp_path / "sweep" / "epochs.npz")["loss"].shape == (4, 1)
