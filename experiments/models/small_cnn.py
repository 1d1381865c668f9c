"""A researcher's own models, written with no gradflow in them, for `gradflow spectra/train --user-model`.

gradflow spectra --user-model experiments/models/small_cnn.py:CNN --input-shape 1 28 28 1
gradflow train --user-model experiments/models/small_cnn.py:CNN1D --input-shape 40 1 --train.epochs 3
"""

import flax.linen as nn


class CNN(nn.Module):
    """Conv 16 -> strided Conv 32 -> flatten -> Dense 64 -> Dense 10, for 28 x 28 images."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


class CNN1D(nn.Module):
    """The same shape of net for MNIST-1D signals (40 samples, 1 channel)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (5,))(x))
        x = nn.relu(nn.Conv(16, (5,), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(10)(x)


class Tiny(nn.Module):
    """Test-sized: Conv 3 -> strided Conv 4 -> Dense 5, for 6 x 6 images."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3, 3))(x))
        x = nn.tanh(nn.Conv(4, (3, 3), strides=2)(x))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))
