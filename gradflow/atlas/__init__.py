"""The vanishing/exploding atlas: where gradients vanish or explode, and what each remedy does.

For every configuration of a grid (activation x initialization x architecture x depth, plus
recurrent cells through time, plus conv and attention nets) the atlas measures, on MNIST-1D inputs:
- at initialization, the per-layer singular-value spectra of the input-output Jacobian
  J_l = d h_l / d h_0 of the blocks (`gradflow.spectra`, exact in log space; the BatchNorm
  batch map for BatchNorm stacks, since at initialization its per-example map is the identity);
- the mean-field prediction beside it: log chi_1 per layer (`gradflow.theory`; for BatchNorm the
  large-batch gradient growth of Yang et al. 2019; 0 for ReZero, whose blocks start as I);
- a short training run (Adam, vmapped over the initializations that share a structure,
  `gradflow.train.sweep`), recording per-layer gradient norms every step and the final accuracy;
and labels each configuration vanishing / exploding / healthy from the numbers (`verdict`).

Results are written as they are produced (`gradflow.store.RunStore`, the store the trainer
uses too): one JSON line per configuration in `results.jsonl` and one `.npz` of per-layer
spectra per structure group, so a crash loses no finished group, and a rerun with the same
config skips what is already there.

The package: `grid` (axes, `AtlasConfig`, the configurations and their theory), `measure` (one
group's spectra and training, recurrent cells through time), `verdict` (the label), `runner` (the
whole grid into the store) and `report` (figures and report.html from a run directory).
"""

from gradflow.atlas.grid import ACTIVATIONS as ACTIVATIONS
from gradflow.atlas.grid import ARCHS as ARCHS
from gradflow.atlas.grid import CELLS as CELLS
from gradflow.atlas.grid import GRIDS as GRIDS
from gradflow.atlas.grid import INITS as INITS
from gradflow.atlas.grid import NETS as NETS
from gradflow.atlas.grid import AtlasConfig as AtlasConfig
from gradflow.atlas.grid import Case as Case
from gradflow.atlas.grid import Cases as Cases
from gradflow.atlas.grid import NetCase as NetCase
from gradflow.atlas.grid import RecurrentCase as RecurrentCase
from gradflow.atlas.grid import cases as cases
from gradflow.atlas.grid import mean_field_rate as mean_field_rate
from gradflow.atlas.grid import sigma_w as sigma_w
from gradflow.atlas.grid import skipped as skipped
from gradflow.atlas.runner import load_arrays as load_arrays
from gradflow.atlas.runner import load_rows as load_rows
from gradflow.atlas.runner import run as run
from gradflow.atlas.verdict import ISOMETRIC_SPREAD as ISOMETRIC_SPREAD
from gradflow.atlas.verdict import VERDICT_RULE as VERDICT_RULE
from gradflow.atlas.verdict import verdict as verdict

__all__ = [
    "ACTIVATIONS",
    "ARCHS",
    "CELLS",
    "GRIDS",
    "INITS",
    "NETS",
    "Cases",
    "NetCase",
    "AtlasConfig",
    "Case",
    "RecurrentCase",
    "cases",
    "mean_field_rate",
    "sigma_w",
    "skipped",
    "load_arrays",
    "load_rows",
    "run",
    "ISOMETRIC_SPREAD",
    "VERDICT_RULE",
    "verdict",
]
