"""Gradient baselines as trainer methods: ``--optimizer adamw`` and ``--optimizer muon``.

The optimizers come from :mod:`nograd.optim`; this module adds backprop and clipping.
Both follow nanoGPT's recipe: betas (0.9, 0.99), weight decay only on 2-D
weights (matrices and embeddings; never on norms or biases), gradient norm
clipped to 1.0. A step costs a forward and a backward pass; the backward
counts as two forwards, so ``forward_tokens = 3 * B * T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from nograd.core.distributed import Collective, default_group
from nograd.core.errors import UsageError
from nograd.optim import adamw, muon_and_adamw
from nograd.workbench.registry import LossFn, StepResult, parse_opts, register_method

if TYPE_CHECKING:
    from nograd.workbench.config import TrainConfig

DEFAULT_WEIGHT_DECAY = 0.1


class GradientMethod:
    """Backprop through ``loss_fn``, clip, then step one or more torch optimizers.

    With a process group (``torchrun``) the model runs under ``DistributedDataParallel``: each
    rank takes its block of the batch's rows (every rank draws the same batch), the loss is
    weighted by the block's share of the rows, and DDP's gradient all-reduce then gives every
    rank the gradient of the whole batch, as one process would compute it up to rounding.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizers: Sequence[torch.optim.Optimizer],
        grad_clip: float,
        process_group: Any = None,
    ) -> None:
        self.model = model
        self.collective = Collective(process_group)
        self.forward_model: nn.Module = model
        if self.collective.active:
            self.forward_model = DistributedDataParallel(model, process_group=process_group)
        self.loss_fn = loss_fn
        self.optimizers = list(optimizers)
        self.grad_clip = grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        for opt in self.optimizers:
            for group in opt.param_groups:
                # The schedule scales each group's own starting lr; kept in the
                # group so it is saved with the optimizer state.
                group.setdefault("base_lr", group["lr"])

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> StepResult:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        self.model.train()
        rows = self.collective.share(x.shape[0])
        if self.collective.active and not len(rows):
            raise UsageError(
                f"a batch of {x.shape[0]} rows cannot be shared by {self.collective.world_size} ranks"
            )
        weight = len(rows) * self.collective.world_size / x.shape[0]  # DDP averages over the ranks
        loss = self.loss_fn(self.forward_model, x[rows.start : rows.stop], y[rows.start : rows.stop]).mean()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        if self.collective.active:  # the all-reduce DDP ran: a ring moves 2 (N - 1) / N of the gradients
            grad_bytes = sum(p.numel() * p.element_size() for p in self.params)
            Collective.count_sent(
                round(2 * grad_bytes * (self.collective.world_size - 1) / self.collective.world_size)
            )
            mean = self.collective.gather(
                torch.tensor([[loss.item() * len(rows)]], dtype=torch.float64), self.collective.world_size
            )
            loss = mean.sum() / x.shape[0]
        else:
            loss = loss.detach()
        info: dict[str, float] = {}
        if self.grad_clip > 0:
            info["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        for opt in self.optimizers:
            opt.step()
        return StepResult(loss=loss.item(), forward_tokens=3.0 * x.numel(), info=info)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError("checkpoint holds a different number of optimizers")
        for opt, s in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(s)


_ADAMW_OPTS = {"beta1": 0.9, "beta2": 0.99, "adam_eps": 1e-8, "grad_clip": 1.0}


@register_method(
    "adamw", "AdamW backprop baseline (betas 0.9/0.99, wd on 2-D weights, clip 1.0)", False, 1e-3
)
def build_adamw(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> GradientMethod:
    o = parse_opts(cfg.opts, _ADAMW_OPTS, "adamw")
    wd = DEFAULT_WEIGHT_DECAY if cfg.weight_decay is None else cfg.weight_decay
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, cfg.lr, wd, (o["beta1"], o["beta2"]), o["adam_eps"])
    return GradientMethod(model, loss_fn, [opt], o["grad_clip"], default_group())


_MUON_OPTS = {**_ADAMW_OPTS, "momentum": 0.95, "ns_steps": 5, "muon_lr_mult": 1.0}


@register_method("muon", "Muon on hidden matrices + AdamW on the rest (backprop baseline)", False, 1e-3)
def build_muon(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> GradientMethod:
    o = parse_opts(cfg.opts, _MUON_OPTS, "muon")
    wd = DEFAULT_WEIGHT_DECAY if cfg.weight_decay is None else cfg.weight_decay
    opts = muon_and_adamw(
        model,
        cfg.lr,
        wd,
        betas=(o["beta1"], o["beta2"]),
        eps=o["adam_eps"],
        momentum=o["momentum"],
        ns_steps=o["ns_steps"],
        muon_lr_mult=o["muon_lr_mult"],
    )
    return GradientMethod(model, loss_fn, opts, o["grad_clip"], default_group())
