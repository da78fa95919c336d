"""shakespeare-char: next-character prediction on Tiny Shakespeare with a small GPT.

The defaults are nanoGPT's CPU "baby GPT" (4 layers, 4 heads, 128 wide, context 64, batch 12).
Validation is a fixed set of ``eval_batches`` batches of 12 rows from the validation split, the
same for every seed, method and batch size, so runs compare directly. ``loss.png`` draws the
n-gram levels of the text as reference lines (:func:`ngram_levels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nograd.core.errors import UsageError
from nograd.core.options import check_options, option
from nograd.models.gpt import ATTENTION_KINDS, GPT, GPTConfig
from nograd.tasks.base import Metric
from nograd.tasks.data import BatchSampler, CharData, CharVocab, fixed_batches

EVAL_BATCH_SIZE = 12  # rows per validation batch, fixed so runs with different --batch-size compare
EVAL_SEED = 1234  # the validation batches are the same whatever the run's seed
EVAL_CHUNK_TOKENS = 1 << 16  # tokens per evaluation forward pass (bounds memory)
NGRAM_SMOOTHING = 0.1  # add-k: with k = 0.1 the levels match REFERENCE.md (3.35, 2.48, 2.05)
NGRAM_MAX_TABLE = 1 << 24  # skip an n-gram level whose count table would be larger


@dataclass
class ShakespeareCharConfig:
    """The options of shakespeare-char (``nograd train --task shakespeare-char --help``)."""

    data: str | None = option(
        None,
        "Tiny Shakespeare text file (default: $NOGRAD_DATA, the cache, or a download)",
        resume="new-or-saved",
        metavar="PATH",
    )
    n_layer: int = option(4, "transformer blocks", min=1)
    n_head: int = option(4, "attention heads", min=1)
    n_embd: int = option(128, "embedding width", min=1)
    block_size: int = option(64, "context length", min=1)
    dropout: float = option(0.0, "dropout rate", min=0.0, below=1.0)
    attention: str = option(
        "sdpa", "attention kernel (math: plain matmuls, for torch.func.jvp)", choices=ATTENTION_KINDS
    )
    batch_size: int = option(12, "rows per step", min=1)
    eval_batches: int = option(50, f"fixed validation batches of {EVAL_BATCH_SIZE} rows", min=1)
    sample_chars: int = option(300, "characters of the final sample", min=0, resume="new")

    def validate(self) -> None:
        check_options(self)
        if self.n_embd % self.n_head:
            raise UsageError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")


def _ngram_keys(ids: torch.Tensor, order: int, vocab_size: int) -> torch.Tensor:
    """Each window of ``order`` ids as one number in base ``vocab_size``."""
    n = len(ids) - order + 1
    key = torch.zeros(n, dtype=torch.long)
    for j in range(order):
        key = key * vocab_size + ids[j : j + n]
    return key


def ngram_levels(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Validation loss (nats/char) of the uniform and add-k smoothed unigram/bigram/trigram models.

    Each n-gram model is fitted on ``train`` (counts of a character after each context of
    n - 1 characters, plus :data:`NGRAM_SMOOTHING`) and scored on ``val``. A model whose
    table would exceed :data:`NGRAM_MAX_TABLE` entries (a large vocabulary) is left out.
    """
    levels = {"uniform": math.log(vocab_size)}
    for order, label in ((1, "unigram"), (2, "bigram"), (3, "trigram")):
        if vocab_size**order > NGRAM_MAX_TABLE or min(len(train), len(val)) < order:
            break

        counts = (
            torch.bincount(_ngram_keys(train, order, vocab_size), minlength=vocab_size**order)
            .double()
            .view(-1, vocab_size)
        )
        probs = (counts + NGRAM_SMOOTHING) / (counts.sum(1, keepdim=True) + NGRAM_SMOOTHING * vocab_size)
        levels[label] = -probs.view(-1)[_ngram_keys(val, order, vocab_size)].log().mean().item()
    return levels


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
    summary = "next character of Tiny Shakespeare with a small GPT (nanoGPT's split and model)"
    Config = ShakespeareCharConfig
    default_prompt = "\n"

    def __init__(self, config: ShakespeareCharConfig, seed: int) -> None:
        self.config = config
        self.data = CharData.load(config.data)
        self.vocab = self.data.vocab
        self.model_config = GPTConfig(
            vocab_size=len(self.vocab),
            block_size=config.block_size,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            dropout=config.dropout,
            bias=False,
            attention=config.attention,
        )
        self.sampler = BatchSampler(self.data.train, config.batch_size, config.block_size, seed=seed)
        self.val_batches = fixed_batches(
            self.data.val, EVAL_BATCH_SIZE, config.block_size, n_batches=config.eval_batches, seed=EVAL_SEED
        )
        levels = ngram_levels(self.data.train, self.data.val, len(self.vocab))
        self.metrics = (Metric("val_loss", "min", "loss (nats/char)", levels),)
        self.meta = {"vocab": self.vocab.chars}  # stored in checkpoints so `sample` needs no data file

    def build_model(self) -> GPT:
        return GPT(self.model_config)

    def per_example_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_example_loss(model, x, y)

    @torch.no_grad()
    def sample_targets(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Next characters drawn from the model's own softmax at every position (SophiaG's estimate)."""
        probs = torch.softmax(model(x).float(), dim=-1)
        return torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator).view(x.shape)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
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
        return {"val_loss": total / len(x)}

    def sample(self, model: GPT, seed: int) -> str:
        """``sample_chars`` characters generated after a newline."""
        if not self.config.sample_chars:
            return ""
        return generate_text(model, self.vocab, self.default_prompt, self.config.sample_chars, seed=seed)

    @staticmethod
    def estimate_bytes(config: ShakespeareCharConfig, population: int, backward: bool) -> int:
        """A lower bound on a run's memory, from the config alone (before any allocation).

        Weights ``12 L E^2 + (V + T) E`` numbers (V taken as 65); the fixed validation batches;
        one forward of ``population x batch`` rows holds at least its logits and one layer's
        attention scores and MLP input ``T (V + H T + 4 E)`` per row; backprop keeps every
        layer's activations, at least ``L T (16 E + 2 H T)`` per row, and AdamW three more copies
        of the weights.
        """
        c, vocab = config, 65
        params = 12 * c.n_layer * c.n_embd**2 + (vocab + c.block_size) * c.n_embd
        rows = population * c.batch_size
        forward = rows * c.block_size * (vocab + c.n_head * c.block_size + 4 * c.n_embd)
        val_batches = 2 * c.eval_batches * EVAL_BATCH_SIZE * c.block_size * 2  # int64 x and y
        total = params + forward + val_batches
        if backward:
            total += (
                rows * c.n_layer * c.block_size * (16 * c.n_embd + 2 * c.n_head * c.block_size) + 3 * params
            )
        return 4 * total

    @staticmethod
    def generate(
        checkpoint: dict, prompt: str, chars: int, temperature: float, top_k: int | None, seed: int
    ) -> str:
        """Text from a checkpoint of this task, without the data file (``nograd sample``)."""
        try:
            model = GPT(GPTConfig(**checkpoint["model_config"]))
            model.load_state_dict(checkpoint["model"])
            vocab = CharVocab(checkpoint["task_meta"]["vocab"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UsageError(f"the checkpoint does not hold a usable model ({type(e).__name__})") from None
        return generate_text(model, vocab, prompt, chars, temperature, top_k, seed)
