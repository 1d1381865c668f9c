"""Seed program 2: a tiny numpy network whose hand-written backward pass is wrong five ways.

The program (from the articles gradflow grew from): layers 2 -> 4 (ReLU) -> 3 (sigmoid),
weights N(0, 2 / fan_in), zero biases; one input [0.5, 0.6], target [0.3, 0.7, 0.9]; mean
squared error; 1000 epochs of `param -= lr * update` with lr = 0.01. Its backward pass, as
the article writes it, has five errors:

  (a) the output error is (target - output), and is then subtracted: gradient ascent;
  (b) the error is propagated through the earlier layer's transposed weights instead of the
      later layer's: (1, 3) @ (4, 2) does not conform, so the program crashes as written;
  (c) the output activation's derivative is applied twice;
  (d) the update loop stops before the output layer: it never moves;
  (e) the weight update is the outer product of the (propagated) error with the layer's own
      outputs, instead of its inputs with the layer's delta (it conforms in shape, so it runs).

Here it is reproduced in jnp with the article's structure (`backward` below, every error
behind a switch), run as written (the shape error is caught and recorded), then fixed one
error at a time: (b) first, the shape fix without which nothing runs, then (a), (c), (d), (e)
cumulatively. Fixing (a) means taking the true dL/d(output) = 2 (output - target) / 3 of the
mean squared error, the factor 2/3 included.

Claims checked: `gradflow.check.compare_gradients` fails every partially fixed backward pass
on at least one layer, and passes only the fully corrected one (relative error ~1e-7 in
float32 against autodiff, whose own float64 finite-difference check agrees to ~1e-9); trained
side by side for 1000 epochs, the variant with only the shape fixed climbs the loss (ascent)
while the fully corrected one descends. The as-written program raises a shape error.

Expected numbers (seed 0; float32): initial loss 0.0818 for every variant (only 1 of the 4
hidden ReLUs is active on the input). After 1000 epochs: (b) 0.0866 (ascent: the loss climbs);
(b, a) and (b, a, c) 0.0800, the floor mean((0.5 - target)^2) of a dead hidden layer with
a frozen output layer (sigmoid(0) = 0.5); (b, a, c, d) 0.03589; fully corrected 0.03591 (the
last hidden ReLU dies too, so from then on only b2 learns, for either variant: a wrong
backward pass that still trains, here even marginally better). Checker
relative errors, (b1, b2, w1, w2): (b) 1.37, 1, 1.00, 1; (b, a) 0.75, 1, 1.00, 1; (b, a, c)
3.5e-7, 1, 1.00, 1; (b, a, c, d) 3.5e-7, 1.4e-7, 1.00, 1.02; fully corrected <= 4e-7 on every
leaf (finite differences against autodiff: <= 3e-9). Seeds 1-3 give the same verdicts, with
1-2 hidden units surviving and the corrected variant ending lowest.

Writes `result.json` and `loss_curves.png` under `--out` (default runs/seed_numpy_net).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import initializers, progress
from gradflow.check import GradientCheck, compare_gradients

LAYERS = (2, 4, 3)
X = ((0.5, 0.6),)
TARGET = ((0.3, 0.7, 0.9),)
LR = 0.01
EPOCHS = 1000

ALL_FIXES = ("b", "a", "c", "d", "e")  # the order they are applied in: (b) is the shape fix
FIX_DESCRIPTIONS = {
    "b": "propagate through the later layer's weights (the shape fix)",
    "a": "output error dL/d(output) = 2 (output - target) / n, subtracted: descent",
    "c": "output activation derivative applied once",
    "d": "update the output layer too",
    "e": "weight update = inputs^T delta",
}
# Variant k applies the first k fixes; variant 0 is the program as written.
VARIANTS = {("as_written" if k == 0 else "fix_" + "".join(ALL_FIXES[:k])): ALL_FIXES[:k] for k in range(6)}

Params = dict[str, jax.Array]


def sigmoid(x: jax.Array) -> jax.Array:
    return 1.0 / (1.0 + jnp.exp(-x))


def sigmoid_derivative(s: jax.Array) -> jax.Array:
    """The derivative of the sigmoid, written in terms of its output s (as the article does)."""
    return s * (1.0 - s)


def relu(x: jax.Array) -> jax.Array:
    return jnp.maximum(0.0, x)


def relu_derivative(a: jax.Array) -> jax.Array:
    """The derivative of the ReLU, written in terms of its output a."""
    return (a > 0).astype(a.dtype)


ACTIVATIONS = (relu, sigmoid)
DERIVATIVES = (relu_derivative, sigmoid_derivative)


def init_params(key: jax.Array) -> Params:
    """Weights N(0, 2 / fan_in) of shape (fan_in, fan_out), zero biases of shape (1, fan_out)."""
    params = {}
    init = initializers.gaussian(math.sqrt(2.0))  # variance 2 / fan_in, a true normal
    for i, (k, fan_in, fan_out) in enumerate(zip(jax.random.split(key, len(LAYERS) - 1), LAYERS, LAYERS[1:])):
        params[f"w{i + 1}"] = init(k, (fan_in, fan_out), jnp.float32)
        params[f"b{i + 1}"] = jnp.zeros((1, fan_out), jnp.float32)
    return params


def forward(params: Params, x: jax.Array) -> list[jax.Array]:
    """The activations [x, hidden, output], each of shape (1, width)."""
    activations = [x]
    for i, act in enumerate(ACTIVATIONS):
        z = activations[-1] @ params[f"w{i + 1}"] + params[f"b{i + 1}"]
        activations.append(act(z))
    return activations


def mse(params: Params, x: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error of the output."""
    return jnp.mean((forward(params, x)[-1] - target) ** 2)


def backward(
    params: Params, activations: list[jax.Array], target: jax.Array, fixes: tuple[str, ...] = ALL_FIXES
) -> Params:
    """The article's backward pass with the errors in `fixes` corrected.

    Returns the update the article subtracts, times the learning rate, from each parameter
    (`param -= lr * update`), i.e. what this backward pass claims the gradient is.

    Raises:
      TypeError: as written ("b" not in fixes), the error does not conform to the weights.
    """
    n_layers = len(ACTIVATIONS)
    weights = [params[f"w{i + 1}"] for i in range(n_layers)]
    output = activations[-1]
    if "a" in fixes:
        error = 2.0 * (output - target) / output.size  # dL/d(output) for the mean squared error
    else:
        error = target - output  # (a): the negative gradient, later subtracted
    if "c" not in fixes:
        error = error * sigmoid_derivative(output)  # (c): the loop applies it again below

    updates = {}
    for i in reversed(range(n_layers)):
        layer_input, layer_output = activations[i], activations[i + 1]
        delta = error * DERIVATIVES[i](layer_output)  # dL/dz of layer i
        later = i if "b" in fixes else i - 1  # (b): the earlier layer's weights
        error = delta @ weights[later].T  # dL/d(layer_input); as written: (1, 3) @ (4, 2)
        if "e" in fixes:
            updates[f"w{i + 1}"] = layer_input.T @ delta
        else:
            updates[f"w{i + 1}"] = error.T @ layer_output  # (e): the error with the layer's own outputs
        updates[f"b{i + 1}"] = jnp.sum(delta, axis=0, keepdims=True)

    if "d" not in fixes:  # (d): the article's update loop runs over range(n_layers - 1)
        last = n_layers
        updates[f"w{last}"] = jnp.zeros_like(params[f"w{last}"])
        updates[f"b{last}"] = jnp.zeros_like(params[f"b{last}"])
    return {name: updates[name] for name in params}


def train(
    params: Params, fixes: tuple[str, ...], epochs: int = EPOCHS, lr: float = LR
) -> tuple[Params, jax.Array]:
    """`epochs` epochs of the article's loop: the final parameters and the loss before each update."""
    x, target = jnp.asarray(X, jnp.float32), jnp.asarray(TARGET, jnp.float32)

    @jax.jit
    def loop(params):
        def epoch(p, _):
            activations = forward(p, x)
            loss = jnp.mean((activations[-1] - target) ** 2)
            updates = backward(p, activations, target, fixes)
            return jax.tree.map(lambda w, u: w - lr * u, p, updates), loss

        return jax.lax.scan(epoch, params, None, length=epochs)

    return loop(params)


def loss(params: Params) -> jax.Array:
    """The program's loss: the mean squared error on its one input."""
    return mse(params, jnp.asarray(X, jnp.float32), jnp.asarray(TARGET, jnp.float32))


def check_variant(params: Params, fixes: tuple[str, ...]) -> GradientCheck:
    """`compare_gradients` of the variant's claimed gradient against autodiff (and fd in float64)."""
    x, target = jnp.asarray(X, jnp.float32), jnp.asarray(TARGET, jnp.float32)
    updates = backward(params, forward(params, x), target, fixes)
    return compare_gradients(loss, params, updates)


def run(
    epochs: int = EPOCHS, out: str | pathlib.Path = "runs/seed_numpy_net", seed: int = 0, verbose: bool = True
) -> dict:
    """Run the program as written, then each cumulatively fixed variant; check and train them.

    Args:
      epochs: training epochs per variant (the program uses 1000).
      out: output directory for `result.json` and `loss_curves.png`.
      seed: PRNG seed for the weights.
      verbose: print each variant's checker table and final loss.

    Returns:
      The contents of `result.json`.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = init_params(jax.random.key(seed))
    x, target = jnp.asarray(X, jnp.float32), jnp.asarray(TARGET, jnp.float32)

    variants, curves = {}, {}
    for name, fixes in progress.track(VARIANTS.items(), f"variants ({epochs} epochs each)", verbose=verbose):
        record = {"fixes": list(fixes), "fix_descriptions": [FIX_DESCRIPTIONS[f] for f in fixes]}
        try:
            backward(params, forward(params, x), target, fixes)
        except (TypeError, ValueError) as e:  # the as-written program: a shape error
            record.update(crashed=True, error=f"{type(e).__name__}: {e}")
            variants[name] = record
            if verbose:
                print(f"== {name}: crashes: {record['error']}")
            continue
        check = check_variant(params, fixes)
        final_params, losses = train(params, fixes, epochs)
        curves[name] = np.asarray(losses)
        record.update(
            crashed=False,
            checker_passed=check.passed,
            rel_errors=check.errors,
            fd_rel_errors=check.fd_errors,
            failed_leaves=list(check.failed),
            initial_loss=float(curves[name][0]),
            final_loss=float(curves[name][-1]),
            hidden_units_active_final=_active_hidden_units(final_params, x),
        )
        variants[name] = record
        if verbose:
            print(
                f"== {name} (fixes {', '.join(fixes)}): loss {curves[name][0]:.4f} -> {curves[name][-1]:.4f}"
            )
            print(check)

    result = {
        "epochs": epochs,
        "lr": LR,
        "seed": seed,
        "layers": list(LAYERS),
        "hidden_units_active_initial": _active_hidden_units(params, x),
        "variants": variants,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    _plot(curves, out / "loss_curves.png")
    if verbose:
        print(f"wrote {out / 'result.json'} and {out / 'loss_curves.png'}")
    return result


def _active_hidden_units(params: Params, x: jax.Array) -> int:
    """How many hidden ReLUs are positive on the input (the rest pass no gradient)."""
    return int(jnp.sum(forward(params, x)[1] > 0))


def _plot(curves: dict[str, np.ndarray], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        ax.semilogy(np.arange(len(c)), c, label=name, lw=2.5 if name == "fix_bacde" else 1.5)
    ax.set(xlabel="epoch", ylabel="mean squared error", title="Seed program 2: fixing the backward pass")
    ax.legend(title="fixes applied (cumulative)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line: `python experiments/seed_numpy_net.py [--out DIR] [--epochs N] [--seed S]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/seed_numpy_net", help="output directory")
    parser.add_argument(
        "--epochs", "--steps", dest="epochs", type=int, default=EPOCHS, help="training epochs per variant"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    run(epochs=args.epochs, out=args.out, seed=args.seed)


if __name__ == "__main__":
    main()
