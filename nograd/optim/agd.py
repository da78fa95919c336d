"""AGD (Bernstein et al. 2023, "Automatic Gradient Descent: Deep Learning without Hyperparameters").

No learning rate: the step size comes from the architecture and the gradient. For L weight
matrices W_k of shape fan_out x fan_in::

    init:  W_k orthogonal, scaled by sqrt(fan_out / fan_in)
    G   =  (1 / L) sum_k ||grad W_k||_F sqrt(fan_out / fan_in)
    eta =  ln((1 + sqrt(1 + 4 G)) / 2)
    W_k <- W_k - (eta / L) sqrt(fan_out / fan_in) grad W_k / ||grad W_k||_F

(The paper's text writes the init's scale the other way up; its algorithm box and the official
code, jxbz/agd, agree on sqrt(fan_out / fan_in), which is what this does.) ``gain`` multiplies
the step (1 in the paper). It is kept as each param group's ``lr``, so torch's learning-rate
schedulers, and the trainer's ``--lr`` and schedule, scale it as they would a learning rate.

Where the paper's assumptions do not hold, and what this code does:

* **Biases and norm gains.** The derivation covers products of matrices only; the official
  code refuses biases and uses norm layers without affine parameters. Here a vector parameter
  is refused too: :func:`agd_groups` hands the vectors back separately and the trainer keeps
  them frozen at their initial values (norm gains 1, biases 0), which is the model the paper
  analyses.
* **Embeddings.** An embedding is a matrix applied to one-hot inputs, stored transposed
  (``vocab x dim`` for a map from R^vocab to R^dim): its group has ``transpose=True``, so its
  fan_in is the vocabulary size. A tied output head shares that tensor and is counted once,
  as the embedding.
* **Attention and layer norms** are not the paper's deep linear or ReLU networks, and the loss
  of a language model is cross-entropy, where the paper's bound assumes a square loss; AGD
  runs there as written, without a guarantee.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.Linear(4, 2, bias=False))
    >>> opt = AGD(net.parameters())
    >>> opt.init_weights()
    >>> w = net[0].weight  # 4 x 3: orthonormal columns, scaled by sqrt(4 / 3)
    >>> torch.allclose(w.T @ w, torch.eye(3) * 4 / 3, atol=1e-6)
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from nograd.optim._common import call_closure


def _fans(p: torch.Tensor, transpose: bool) -> tuple[int, int]:
    """(fan_out, fan_in) of a Linear-style weight (out, in, *kernel), or of an embedding."""
    if transpose:
        return p.shape[1], p.shape[0]
    return p.shape[0], math.prod(p.shape[1:])


def singular_value(p: torch.Tensor, transpose: bool = False) -> float:
    """``sqrt(fan_out / fan_in)``: the target scale of the weight's singular values."""
    fan_out, fan_in = _fans(p, transpose)
    return math.sqrt(fan_out / fan_in)


def agd_groups(model: nn.Module) -> tuple[list[dict], list[nn.Parameter]]:
    """(AGD's param groups for the model's matrices, the vector parameters AGD does not train).

    Embedding weights get ``transpose=True``; a tied tensor appears once, in its first module.
    """
    seen: set[int] = set()
    matrices: list[nn.Parameter] = []
    embeddings: list[nn.Parameter] = []
    vectors: list[nn.Parameter] = []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if p.dim() < 2:
                vectors.append(p)
            elif isinstance(module, nn.Embedding):
                embeddings.append(p)
            else:
                matrices.append(p)
    groups = [{"params": matrices}, {"params": embeddings, "transpose": True}]
    return [g for g in groups if g["params"]], vectors


class AGD(torch.optim.Optimizer):
    """Automatic gradient descent over weight matrices; one global step size per step."""

    def __init__(self, params: Iterable[Any], gain: float = 1.0) -> None:
        if not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        super().__init__(params, dict(lr=gain, transpose=False))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(
                        f"AGD trains weight matrices only; a parameter of shape {tuple(p.shape)} is a "
                        "bias or a norm gain (use agd_groups() and leave those out)"
                    )

    @property
    def depth(self) -> int:
        """L, the number of weight tensors."""
        return sum(len(g["params"]) for g in self.param_groups)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Orthogonal init scaled by sqrt(fan_out / fan_in); a conv kernel per spatial position."""
        for group in self.param_groups:
            for p in group["params"]:
                matrix = p.T if group["transpose"] else p
                if p.dim() == 2:
                    nn.init.orthogonal_(matrix)
                else:
                    for position in itertools.product(*map(range, p.shape[2:])):
                        nn.init.orthogonal_(p[(slice(None), slice(None), *position)])
                p.mul_(singular_value(p, group["transpose"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float:
        """One AGD step; returns eta (the closure's loss is not returned: AGD reports its step)."""
        call_closure(closure)
        entries = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms = [p.grad.norm() for p, _ in entries]
        scales = [singular_value(p, group["transpose"]) for p, group in entries]
        L = self.depth
        G = float(sum(s * n for s, n in zip(scales, norms))) / L
        eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
        for (p, group), scale, norm in zip(entries, scales, norms):
            if norm > 0:  # a zero gradient moves nothing (the official code's nan_to_num)
                p.sub_(p.grad, alpha=group["lr"] * eta / L * scale / float(norm))
        return eta
