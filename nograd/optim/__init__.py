"""Gradient optimizers, the yardsticks of forward-only training (imports only torch).

Each is a plain ``torch.optim`` optimizer: it steps on whatever is in ``.grad``, a backprop
gradient or an ES/ZO estimate alike.

* AdamW and Muon set up as nanoGPT and modded-nanogpt set them up (:mod:`~nograd.optim.adamw_muon`);
* :class:`AdamAtan2` (Everett et al. 2024), :class:`SophiaG` (Liu et al. 2023),
  :class:`AGD` (Bernstein et al. 2023), :class:`MFAC` (Frantar et al. 2021): one file each.
"""

from nograd.optim.adam_atan2 import AdamAtan2
from nograd.optim.adamw_muon import adamw, adamw_groups, muon_and_adamw, muon_split
from nograd.optim.agd import AGD, agd_groups
from nograd.optim.mfac import MFAC
from nograd.optim.sophia import SophiaG

__all__ = [
    "AGD",
    "MFAC",
    "AdamAtan2",
    "SophiaG",
    "adamw",
    "adamw_groups",
    "agd_groups",
    "muon_and_adamw",
    "muon_split",
]
