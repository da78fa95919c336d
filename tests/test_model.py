"""The char-level GPT: shapes, weight tying, layer types, both attention paths, jvp, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nograd.models.gpt import GPT, GPTConfig, set_attention
from nograd.tasks.shakespeare import per_example_loss

CFG = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def make(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CFG, **kw}))


def test_shapes_and_tied_embeddings():
    m = make()
    logits = m(torch.randint(11, (3, 5)))
    assert logits.shape == (3, 5, 11)
    assert m.lm_head.weight is m.transformer.wte.weight
    # 2 blocks of (qkv + proj + 2 mlp) weights, 5 LayerNorms (no bias), wte (tied), wpe
    expected = 2 * (16 * 48 + 16 * 16 + 16 * 64 * 2 + 2 * 16) + 16 + 11 * 16 + 8 * 16
    assert sum(p.numel() for p in m.parameters()) == expected
    with pytest.raises(ValueError, match="longer than block_size"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_only_standard_layers_hold_parameters():
    m = make(bias=True)
    owners = {}
    for module in m.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), type(module))
    assert set(owners.values()) <= {nn.Embedding, nn.Linear, nn.LayerNorm}
    assert len(owners) == len(list(m.parameters()))


def test_init_scales_residual_projections():
    m = make(n_embd=64, n_layer=4)
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 4) ** 0.5) < 0.002
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="attention"):
        GPTConfig(attention="flash")


def test_sdpa_and_math_attention_agree():
    m = make().eval()
    x = torch.randint(11, (4, 8))
    a = m(x)
    set_attention(m, "math")
    assert m.config.attention == "math"
    b = m(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Causality: a change at the last position must not affect earlier logits.
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 11
    torch.testing.assert_close(m(x2)[:, :-1], b[:, :-1])


# torch's own jvp decompositions still go through torch.jit.script, which warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_jvp_through_math_attention_matches_autograd():
    m = make(attention="math")
    x, y = torch.randint(11, (2, 8)), torch.randint(11, (2, 8))
    params = {k: v.detach() for k, v in m.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def loss(p):
        return per_example_loss(lambda idx: torch.func.functional_call(m, p, (idx,)), x, y).mean()

    value, directional = torch.func.jvp(loss, (params,), (tangents,))
    grads = torch.func.grad(loss)(params)
    expected = sum((grads[k] * tangents[k]).sum() for k in params)
    torch.testing.assert_close(directional, expected, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(value)


def test_per_example_loss_is_row_mean():
    m = make()
    x, y = torch.randint(11, (3, 8)), torch.randint(11, (3, 8))
    rows = per_example_loss(m, x, y)
    assert rows.shape == (3,)
    full = nn.functional.cross_entropy(m(x).reshape(-1, 11), y.reshape(-1))
    torch.testing.assert_close(rows.mean(), full)


def test_generate_is_seeded_and_crops_context():
    m = make()
    start = torch.zeros(1, 1, dtype=torch.long)
    rng_before = torch.get_rng_state()
    a = m.generate(start, 20, generator=torch.Generator().manual_seed(1))
    b = m.generate(start, 20, generator=torch.Generator().manual_seed(1), top_k=3)
    c = m.generate(start, 20, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 21) and b.shape == (1, 21)
    assert torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    assert m.training  # mode restored
