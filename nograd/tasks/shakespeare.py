"""shakespeare-char: next-character prediction on Tiny Shakespeare with a small GPT."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from nograd.data import BatchSampler, CharData, CharVocab, fixed_batches
from nograd.models.gpt import GPT, GPTConfig

if TYPE_CHECKING:
    from nograd.train import TrainConfig

EVAL_BATCH_SIZE = 12  # rows per validation batch, fixed so runs with different --batch-size compare
EVAL_SEED = 1234  # the validation batches are the same whatever the run's seed
EVAL_CHUNK_TOKENS = 1 << 16  # tokens per evaluation forward pass (bounds memory)


def per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the T positions of each row: shape (N,) for x, y of shape (N, T).

    Forward-only optimizers need one loss per row to split a batch between
    population members; a gradient method just takes ``.mean()``.
    """
    logits = model(x)
    N, T, V = logits.shape
    return F.cross_entropy(logits.reshape(N * T, V), y.reshape(N * T), reduction="none").view(N, T).mean(1)


def generate_text(
    model: GPT,
    vocab: CharVocab,
    prompt: str,
    chars: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """``prompt`` followed by ``chars`` sampled characters (sampling has its own generator)."""
    ids = vocab.encode(prompt or "\n")
    idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    gen = torch.Generator(device=idx.device).manual_seed(seed)
    out = model.generate(idx, chars, temperature=temperature, top_k=top_k, generator=gen)
    text = vocab.decode(out[0])
    return text if prompt else text[1:]


class ShakespeareCharTask:
    """Everything the trainer needs for the shakespeare-char task."""

    name = "shakespeare-char"
    default_prompt = "\n"

    def __init__(self, cfg: TrainConfig) -> None:
        self.data = CharData.load(cfg.data)
        self.vocab = self.data.vocab
        self.model_config = GPTConfig(
            vocab_size=len(self.vocab),
            block_size=cfg.block_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            dropout=cfg.dropout,
            bias=False,
            attention=cfg.attention,
        )
        self.sampler = BatchSampler(self.data.train, cfg.batch_size, cfg.block_size, seed=cfg.seed)
        self.val_batches = fixed_batches(
            self.data.val, EVAL_BATCH_SIZE, cfg.block_size, n_batches=cfg.eval_batches, seed=EVAL_SEED
        )
        self.meta = {"vocab": self.vocab.chars}  # stored in checkpoints so `sample` needs no data file

    def build_model(self) -> GPT:
        return GPT(self.model_config)

    def per_example_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_example_loss(model, x, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """Mean validation loss over the fixed validation batches (eval mode, no grad)."""
        was_training = model.training
        model.eval()
        x = torch.cat([b[0] for b in self.val_batches])
        y = torch.cat([b[1] for b in self.val_batches])
        rows = max(1, EVAL_CHUNK_TOKENS // x.shape[1])
        device = next(model.parameters()).device
        total = 0.0
        for i in range(0, len(x), rows):
            xb, yb = x[i : i + rows].to(device), y[i : i + rows].to(device)
            total += per_example_loss(model, xb, yb).double().sum().item()
        model.train(was_training)
        return total / len(x)

    def sample(self, model: GPT, prompt: str | None = None, chars: int = 300, seed: int = 0) -> str:
        return generate_text(
            model, self.vocab, self.default_prompt if prompt is None else prompt, chars, seed=seed
        )
