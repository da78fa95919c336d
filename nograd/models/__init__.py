"""Models trained by nograd."""

from nograd.models.gpt import GPT, GPTConfig, set_attention

__all__ = ["GPT", "GPTConfig", "set_attention"]
