"""AdamW and Muon with nanoGPT's parameter groups.

* :func:`adamw_groups` - nanoGPT's split: decoupled weight decay on tensors of two or more
  dimensions (matrices, embeddings), none on norm gains and biases.
* :func:`muon_split` - Muon (Jordan et al. 2024) orthogonalises the update of hidden linear
  maps only; embeddings, the output head, norms and biases stay with AdamW.
* :func:`adamw` and :func:`muon_and_adamw` build the optimizers from those groups.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> [type(o).__name__ for o in muon_and_adamw(model, lr=1e-3, weight_decay=0.1)]
    ['Muon', 'AdamW']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def adamw_groups(params: Sequence[nn.Parameter], weight_decay: float) -> list[dict]:
    """nanoGPT's split: decay tensors with >= 2 dims, not norms and biases."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    # named_parameters() already lists a tied tensor once, under its first name.
    return [p for _, p in model.named_parameters() if p.requires_grad]


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, everything else for AdamW).

    A hidden matrix is the weight of an ``nn.Linear`` that is not named ``lm_head`` and is not
    tied to an embedding.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden_ids = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            if id(module.weight) not in embedding_ids and module.weight.dim() == 2:
                hidden_ids.add(id(module.weight))
    params = _trainable(model)
    return [p for p in params if id(p) in hidden_ids], [p for p in params if id(p) not in hidden_ids]


def adamw(
    params: Sequence[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` on :func:`adamw_groups` (nanoGPT's betas by default)."""
    return torch.optim.AdamW(adamw_groups(params, weight_decay), lr=lr, betas=betas, eps=eps)


def muon_and_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.99),
    eps: float = 1e-8,
    momentum: float = 0.95,
    ns_steps: int = 5,
    muon_lr_mult: float = 1.0,
) -> list[torch.optim.Optimizer]:
    """``torch.optim.Muon`` on the hidden matrices and :func:`adamw` on the rest.

    Muon's ``adjust_lr_fn="match_rms_adamw"`` scales its step to AdamW's update size, so one
    learning rate serves both; ``muon_lr_mult`` scales Muon's on top.
    """
    hidden, rest = muon_split(model)
    optimizers: list[torch.optim.Optimizer] = []
    if hidden:
        optimizers.append(
            torch.optim.Muon(
                hidden,
                lr=lr * muon_lr_mult,
                weight_decay=weight_decay,
                momentum=momentum,
                ns_steps=ns_steps,
                adjust_lr_fn="match_rms_adamw",
            )
        )
    if rest:
        optimizers.append(adamw(rest, lr, weight_decay, betas, eps))
    return optimizers
