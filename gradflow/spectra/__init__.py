"""Jacobian-product spectra across depth and through time: exact (log-scaled Jacobi), top-k, Lyapunov; circular convs by FFT."""

from gradflow.spectra._exact import log_singular_values as log_singular_values
from gradflow.spectra.conv import conv_spectra as conv_spectra
from gradflow.spectra.conv import conv_spectrum as conv_spectrum
from gradflow.spectra.conv import conv_stack_spectra as conv_stack_spectra
from gradflow.spectra.core import AUTO_EXACT_SIZE as AUTO_EXACT_SIZE
from gradflow.spectra.core import AUTO_K as AUTO_K
from gradflow.spectra.core import METHODS as METHODS
from gradflow.spectra.core import chain_spectra as chain_spectra
from gradflow.spectra.core import jacobian_spectra as jacobian_spectra
from gradflow.spectra.core import lyapunov_exponents as lyapunov_exponents
from gradflow.spectra.core import model_spectra as model_spectra
from gradflow.spectra.result import SpectraResult as SpectraResult

__all__ = [
    "AUTO_EXACT_SIZE",
    "AUTO_K",
    "METHODS",
    "chain_spectra",
    "conv_spectra",
    "conv_stack_spectra",
    "conv_spectrum",
    "jacobian_spectra",
    "log_singular_values",
    "lyapunov_exponents",
    "model_spectra",
    "SpectraResult",
]
