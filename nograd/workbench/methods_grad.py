"""Gradient baselines as trainer methods: ``--optimizer adamw | muon | adam-atan2 | sophiag | agd | mfac``.

The optimizers come from :mod:`nograd.optim`; this module adds backprop and clipping.
AdamW, Muon and Adam-atan2 follow nanoGPT's recipe: betas (0.9, 0.99), weight decay only on
2-D weights (matrices and embeddings; never on norms or biases), gradient norm clipped to 1.0.
SophiaG follows its official GPT-2 recipe (betas 0.965/0.99, rho 0.04, wd 0.2, a Hessian
refresh every 10 steps); AGD has no learning rate (``--lr`` is its gain, 1 by default: use
``--warmup 0 --min-lr-ratio 1`` for the paper's constant step) and no clipping; M-FAC keeps the
last 1024 gradients (``--opt ngrads=N``). A step costs a forward and a backward pass; the
backward counts as two forwards, so ``forward_tokens = 3 * B * T``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from nograd.core.allocator import available_bytes
from nograd.core.distributed import Collective, default_group
from nograd.core.errors import UsageError
from nograd.optim import AGD, MFAC, AdamAtan2, SophiaG, adamw, adamw_groups, agd_groups, muon_and_adamw
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

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fill ``.grad`` with the gradient of the batch's mean loss (all ranks' rows); return the loss."""
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
        if not self.collective.active:
            return loss.item()
        # the all-reduce DDP ran: a ring moves 2 (N - 1) / N of the gradients
        grad_bytes = sum(p.numel() * p.element_size() for p in self.params)
        Collective.count_sent(
            round(2 * grad_bytes * (self.collective.world_size - 1) / self.collective.world_size)
        )
        mean = self.collective.gather(
            torch.tensor([[loss.item() * len(rows)]], dtype=torch.float64), self.collective.world_size
        )
        return float(mean.sum() / x.shape[0])

    def clip(self) -> dict[str, float]:
        if self.grad_clip <= 0:
            return {}
        return {"grad_norm": float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))}

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> StepResult:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        loss = self.backward(x, y)
        info = self.clip()
        for opt in self.optimizers:
            opt.step()
        return StepResult(loss=loss, forward_tokens=3.0 * x.numel(), info=info)

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


def _weight_decay(cfg: TrainConfig, default: float = DEFAULT_WEIGHT_DECAY) -> float:
    return default if cfg.weight_decay is None else cfg.weight_decay


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


_ATAN2_OPTS = {"beta1": 0.9, "beta2": 0.99, "a": 1.27, "b": 1.0, "grad_clip": 1.0}


@register_method(
    "adam-atan2", "Adam-atan2 backprop baseline (no epsilon; wd on 2-D weights, clip 1.0)", False, 1e-3
)
def build_adam_atan2(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> GradientMethod:
    o = parse_opts(cfg.opts, _ATAN2_OPTS, "adam-atan2")
    groups = adamw_groups(_trainable(model), _weight_decay(cfg))
    opt = AdamAtan2(groups, lr=cfg.lr, betas=(o["beta1"], o["beta2"]), a=o["a"], b=o["b"])
    return GradientMethod(model, loss_fn, [opt], o["grad_clip"], default_group())


class SophiaGMethod(GradientMethod):
    """SophiaG's step, and every ``hessian_every`` steps its Gauss-Newton-Bartlett refresh.

    The refresh follows the official training loop (Liuhong99/Sophia, train_sophiag.py): after
    the normal step, targets are drawn from the model's own output distribution on the batch
    (seeded by the run's seed and the step index, so a resumed run draws the same), the mean
    loss on them is backpropagated and clipped, and ``update_hessian`` folds the squared
    gradient into ``h``. This reuses the step's batch where the official loop takes the next
    one. ``bs`` is the number of predictions in the batch (``y.numel()``). A refresh costs one more
    forward and backward (counted in forward_tokens).
    """

    def __init__(self, *args: Any, sample_targets: Any, hessian_every: int, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sample_targets, self.hessian_every, self.seed = sample_targets, hessian_every, seed
        self.steps_done = 0

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> StepResult:
        for group in self.optimizers[0].param_groups:
            group["bs"] = y.numel()  # predictions per batch: tokens of an LM, rows of a classifier
        result = super().step(x, y, lr_scale)
        result.info["unclipped"] = self.optimizers[0].unclipped_fraction()
        self.steps_done += 1
        if self.steps_done % self.hessian_every == 0:
            generator = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + self.steps_done)
            with torch.no_grad():
                self.model.eval()
                sampled = self.sample_targets(self.model, x, generator)
            self.backward(x, sampled)
            self.clip()
            self.optimizers[0].update_hessian()
            result.forward_tokens += 3.0 * x.numel()
        return result

    def state_dict(self) -> dict:
        return {**super().state_dict(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.steps_done = int(state["steps_done"])


_SOPHIA_OPTS = {"beta1": 0.965, "beta2": 0.99, "rho": 0.04, "hessian_every": 10, "grad_clip": 1.0}


@register_method(
    "sophiag", "SophiaG: clipped sign momentum over a sampled-label Hessian diagonal (backprop)", False, 3e-4
)
def build_sophiag(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> GradientMethod:
    o = parse_opts(cfg.opts, _SOPHIA_OPTS, "sophiag")
    sample_targets = getattr(loss_fn, "sample_targets", None)
    if sample_targets is None:
        raise UsageError(
            f"sophiag needs targets drawn from the model's own predictions, which task {cfg.task!r} "
            "cannot draw (it has no sample_targets)"
        )
    if o["hessian_every"] < 1 or not o["rho"] > 0:
        raise UsageError("sophiag: --opt hessian_every must be >= 1 and rho > 0")
    groups = adamw_groups(_trainable(model), _weight_decay(cfg, 0.2))
    opt = SophiaG(groups, lr=cfg.lr, betas=(o["beta1"], o["beta2"]), rho=o["rho"])
    return SophiaGMethod(
        model,
        loss_fn,
        [opt],
        o["grad_clip"],
        default_group(),
        sample_targets=sample_targets,
        hessian_every=o["hessian_every"],
        seed=cfg.seed,
    )


@register_method(
    "agd", "AGD: automatic gradient descent, no lr (--lr is its gain; vectors stay frozen)", False, 1.0
)
def build_agd(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> GradientMethod:
    """AGD's orthogonal init, then its steps; biases and norm gains stay at their init (see agd.py)."""
    parse_opts(cfg.opts, {}, "agd")
    groups, vectors = agd_groups(model)
    for p in vectors:
        p.requires_grad_(False)
    opt = AGD(groups, gain=cfg.lr)
    opt.init_weights()
    return GradientMethod(model, loss_fn, [opt], 0.0, default_group())


_MFAC_OPTS = {"ngrads": 1024, "damp": 1e-5, "momentum": 0.0, "grad_clip": 1.0}


@register_method(
    "mfac", "M-FAC: inverse empirical Fisher of the last m gradients, matrix-free (backprop)", False, 1e-3
)
def build_mfac(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> GradientMethod:
    o = parse_opts(cfg.opts, _MFAC_OPTS, "mfac")
    if o["ngrads"] < 1 or not o["damp"] > 0 or not 0 <= o["momentum"] < 1:
        raise UsageError("mfac: --opt ngrads must be >= 1, damp > 0 and momentum in [0, 1)")
    params = _trainable(model)
    need = o["ngrads"] * sum(p.numel() for p in params) * 4 + o["ngrads"] ** 2 * 8 * 3
    available = available_bytes()
    if cfg.device == "cpu" and available is not None and need > available:
        raise UsageError(
            f"mfac's window of {o['ngrads']} gradients needs {need / 2**30:.1f} GiB and "
            f"{available / 2**30:.1f} GiB is available: lower --opt ngrads"
        )
    opt = MFAC(
        params,
        lr=cfg.lr,
        momentum=o["momentum"],
        weight_decay=_weight_decay(cfg, 0.0),
        ngrads=o["ngrads"],
        damp=o["damp"],
    )
    return GradientMethod(model, loss_fn, [opt], o["grad_clip"], default_group())
