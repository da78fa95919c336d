"""A tiny random Llama and word-level tokenizer saved as a Hugging Face folder, and labelled text.

Built inside the tests (no hub, no download): a model folder that ``load_causal_lm`` reads like
any ``save_pretrained`` output, and a CSV of two-word sentiments that a few steps can learn.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

POSITIVE = ["good", "great", "happy", "love", "fine", "nice"]
NEGATIVE = ["bad", "awful", "sad", "hate", "poor", "ugly"]
NEUTRAL = ["car", "road", "city", "bus", "train", "day"]
FILLER = ["the", "a", "is", "this", "was", "so", "my", "very"]
WORDS = (
    POSITIVE + NEGATIVE + NEUTRAL + FILLER + ["Tweet", ":", "Sentiment", "positive", "negative", "neutral"]
)


def tiny_lm_folder(root: Path) -> Path:
    """Save a 2-layer Llama (hidden 32, tied embeddings) and its tokenizer to ``root/tiny-llama``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = root / "tiny-llama"
    if (folder / "config.json").exists():
        return folder
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def sentiment_csv(
    root: Path, per_class: int = 60, classes: tuple[str, ...] = ("negative", "positive")
) -> Path:
    """``sentiment,text`` rows: each text holds two words of its class among 1 to 4 filler words."""
    rng = random.Random(0)
    pools = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}
    path = root / "sentiment.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentiment", "text"])
        for _ in range(per_class):
            for c in classes:
                words = rng.sample(pools[c], 2) + rng.sample(FILLER, rng.randint(1, 4))
                rng.shuffle(words)
                w.writerow([c, " ".join(words)])
    return path
