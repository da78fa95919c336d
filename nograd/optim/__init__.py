"""Gradient optimizers, the yardsticks of forward-only training (imports only torch).

Today: AdamW and Muon set up as nanoGPT and modded-nanogpt set them up
(:mod:`nograd.optim.adamw_muon`). They are plain ``torch.optim`` optimizers: they step on
whatever is in ``.grad``, a backprop gradient or an ES/ZO estimate alike.
"""

from nograd.optim.adamw_muon import adamw, adamw_groups, muon_and_adamw, muon_split

__all__ = ["adamw", "adamw_groups", "muon_and_adamw", "muon_split"]
