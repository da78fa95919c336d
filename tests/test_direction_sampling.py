"""How a generation's directions are drawn: orthogonal blocks, guided subspaces, per-tensor scales
(nograd.core.shaped_noise, DirectionSampling), against the definitions written out by hand."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from nograd.core.engine import ParamSpace
from nograd.core.errors import UsageError
from nograd.core.noise import SeededNoise
from nograd.core.shaped_noise import ShapedNoise
from nograd.models.gpt import GPT, GPTConfig
from nograd.strategies.eggroll import EGGROLL
from nograd.strategies.module_es import DirectionSampling, ModuleES
from nograd.tasks.shakespeare import per_example_loss
from nograd.workbench import TrainConfig
from nograd.workbench.registry import get_method

pytestmark = pytest.mark.usefixtures("one_thread")


def off_diagonal(gram: torch.Tensor) -> float:
    return float((gram - torch.diag(gram.diagonal())).abs().max())


def test_orthogonal_factors_are_orthogonal_keep_their_norms_and_do_not_depend_on_who_asks():
    noise = ShapedNoise(3, directions=12, orthogonal=True)
    raw = SeededNoise(3)
    a, b = noise.lowrank_members(8, 5, 2, generation=4, members=range(12), index=1)
    ra, rb = raw.lowrank_members(8, 5, 2, generation=4, members=range(12), index=1)
    assert torch.equal(b, rb)  # the larger factor (A, 8 rows) is the orthogonalised one
    torch.testing.assert_close(a.norm(dim=1), ra.norm(dim=1))  # each column keeps its raw norm
    # blocks of 8 // 2 = 4 directions: every column of a block orthogonal to every other
    for start in range(0, 12, 4):
        cols = a[start : start + 4].permute(1, 0, 2).reshape(8, -1)
        assert off_diagonal(cols.T @ cols) < 1e-4
    # a chunk, a single direction (the in-place engine's call) and the whole population agree
    part_a, _ = noise.lowrank_members(8, 5, 2, generation=4, members=[6, 2, 11], index=1)
    torch.testing.assert_close(part_a, a[[6, 2, 11]])
    one_a, _ = noise.lowrank(8, 5, 2, generation=4, member=9, index=1)
    torch.testing.assert_close(one_a, a[9])
    fresh = ShapedNoise(3, directions=12, orthogonal=True)  # no cache: the same numbers
    torch.testing.assert_close(fresh.lowrank_members(8, 5, 2, generation=4, members=[5], index=1)[0], a[[5]])


def test_shaped_noise_survives_a_pickle_with_its_scales_and_guides():
    import pickle

    noise = ShapedNoise(2, directions=6, orthogonal=True, guided=2)
    noise.scales[0] = 1.5
    noise.guides[0] = (torch.linalg.qr(torch.randn(5, 2)).Q,)
    copy_ = pickle.loads(pickle.dumps(noise))
    for n in (noise, copy_):
        assert n.shapes(0) and n.guided_from == 4
    torch.testing.assert_close(
        copy_.members((5,), generation=3, members=range(6), index=0),
        noise.members((5,), generation=3, members=range(6), index=0),
    )


def test_orthogonal_dense_directions_and_their_marginal_is_still_standard_gaussian():
    noise = ShapedNoise(0, directions=16, orthogonal=True)
    z = noise.members((16,), generation=0, members=range(16), index=0)
    assert off_diagonal(z @ z.T) < 1e-4
    # each direction alone is still N(0, I): its entries over many generations
    draws = torch.cat([noise.members((16,), generation=g, members=range(16), index=0) for g in range(300)])
    assert abs(float(draws.mean())) < 0.02
    assert abs(float(draws.var()) - 1.0) < 0.03
    assert abs(float(draws.pow(4).mean()) - 3.0) < 0.2  # Gaussian kurtosis, not a uniform sphere's


def test_guided_directions_lie_in_the_guide_and_keep_the_expected_norm():
    out_f, in_f, k = 12, 7, 2
    noise = ShapedNoise(1, directions=10, guided=4)
    u = torch.linalg.qr(torch.randn(out_f, k)).Q
    v = torch.linalg.qr(torch.randn(in_f, k)).Q
    noise.guides[0] = (u, v)
    a, b = noise.lowrank_members(out_f, in_f, 1, generation=2, members=range(10), index=0)
    ra, rb = SeededNoise(1).lowrank_members(out_f, in_f, 1, generation=2, members=range(10), index=0)
    assert noise.guided_from == 6
    assert torch.equal(a[:6], ra[:6]) and torch.equal(b[:6], rb[:6])  # isotropic directions untouched
    # by hand: A = sqrt(out / k) U z_A with z_A the first k numbers of the raw draw
    torch.testing.assert_close(a[6:], math.sqrt(out_f / k) * torch.einsum("ok,ckr->cor", u, ra[6:, :k]))
    torch.testing.assert_close(b[6:], math.sqrt(in_f / k) * torch.einsum("ik,ckr->cir", v, rb[6:, :k]))
    # E||A B^T||^2 = out * in, as for an isotropic draw
    sq = []
    for g in range(400):
        a, b = noise.lowrank_members(out_f, in_f, 1, generation=g, members=range(6, 10), index=0)
        sq.append((a.pow(2).sum((1, 2)) * b.pow(2).sum((1, 2))).mean())
    assert abs(float(torch.stack(sq).mean()) / (out_f * in_f) - 1.0) < 0.1


def model_and_batch(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    x = torch.randn(16, 6)
    return model, x, torch.randn(16, 3)


def mse_rows(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((m(x) - y) ** 2).mean(1)


def test_scaled_estimate_is_the_smoothed_gradient_written_out_by_hand():
    """With alpha_i, member m evaluates theta_i + s_m sigma alpha_i E_i and the estimate is
    g_i = 1 / (P sigma alpha_i) sum_m u_m s_m E_i (E_i the unscaled draw)."""
    model, x, y = model_and_batch()
    sigma, pop = 0.05, 8
    sampling = DirectionSampling(sigma_lr=0.5)
    es = EGGROLL(model, sigma=sigma, population=pop, rank=1, seed=2, sampling=sampling,
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.0))  # fmt: skip
    es.log_scales = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    es._share_shaping(es.noise)
    alphas = torch.exp(es.log_scales).tolist()
    space, raw = ParamSpace(model, rank=1), SeededNoise(2)
    theta = [p.detach().clone() for p in model.parameters()]
    by_hand = []
    for m in range(pop):  # each member's loss, perturbing a copy by hand
        d, s = m // 2, (1.0 if m % 2 == 0 else -1.0)
        other = copy.deepcopy(model)
        with torch.no_grad():
            for i, p in enumerate(other.parameters()):
                p.add_(space.dense(raw, i, 0, d) * (s * sigma * alphas[i]))
            by_hand.append(float(mse_rows(other, x, y).mean()))
    losses = es.evaluate(mse_rows, x, y)
    torch.testing.assert_close(losses, torch.tensor(by_hand), rtol=1e-5, atol=1e-6)
    u, _ = es.utilities(losses)
    es.update(losses)
    for i, p in enumerate(model.parameters()):
        g = sum(
            float(u[m]) * (1.0 if m % 2 == 0 else -1.0) * space.dense(raw, i, 0, m // 2) for m in range(pop)
        )
        torch.testing.assert_close(p.grad, g / (pop * sigma * alphas[i]), rtol=1e-4, atol=1e-6)
        assert torch.equal(p.detach(), theta[i])  # lr 0: only the estimate was written
    # the scales' step, by hand: log alpha_i -= eta / P sum_m u_m (||E_{d_m,i}||^2 / n_i - 1)
    for i, p in enumerate(model.parameters()):
        q = [float(space.dense(raw, i, 0, m // 2).pow(2).sum()) / p.numel() for m in range(pop)]
        expected = math.log(alphas[i]) - 0.5 / pop * sum(float(u[m]) * (q[m] - 1.0) for m in range(pop))
        assert float(es.log_scales[i]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_a_tensor_at_a_sharp_minimum_has_its_noise_scale_shrunk():
    """Where the loss only curves (zero gradient), larger draws go with worse losses: SNES's rule
    lowers that tensor's scale and leaves a tensor the loss ignores where it was, on average."""
    model = nn.ModuleList([nn.Linear(20, 1, bias=False), nn.Linear(5, 1, bias=False)])
    with torch.no_grad():
        model[0].weight.zero_()

    def curved(m: nn.Module, x: torch.Tensor) -> torch.Tensor:  # (x w^T)^2; the second layer is unused
        return m[0](x).pow(2).mean(1)

    x = torch.randn(64, 20)
    es = ModuleES(model, sigma=0.1, population=64, seed=0, sampling=DirectionSampling(sigma_lr=0.5),
                  optimizer=torch.optim.SGD(model.parameters(), lr=0.0))  # fmt: skip
    for _ in range(40):
        es.step(curved, x)
    curved_scale, ignored_scale = es.log_scales.tolist()
    assert curved_scale < -0.5
    assert abs(ignored_scale) < 0.25


def gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))


def tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (3, 8), generator=g)
    return x, (x + 1) % 11


ALL_THREE = {"orthogonal": "true", "guided": "0.25", "guide_history": "2", "sigma_lr": "0.05"}


def test_batched_and_inplace_engines_read_the_same_shaped_directions():
    sampling = DirectionSampling(orthogonal=True, guided=0.25, guide_history=2, sigma_lr=0.05)
    runs = []
    for mode in ("batched", "inplace"):
        model = gpt()
        es = EGGROLL(model, sigma=0.02, population=16, rank=1, seed=4, mode=mode, sampling=sampling,
                     optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))  # fmt: skip
        losses = [es.step(per_example_loss, *tokens(t)) for t in range(4)]  # guides from step 1 on
        runs.append((torch.stack(losses), es))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-5)
    assert runs[0][1].noise.guides and any(v != 0 for v in runs[0][1].log_scales.tolist())


def test_the_trainer_method_with_all_three_resumes_bit_identically():
    cfg = TrainConfig(optimizer="eggroll", lr=1e-2, population=16, seed=1, opts=dict(ALL_THREE))
    info = get_method("eggroll")
    model = gpt()
    method = info.build(model, per_example_loss, cfg)
    for t in range(3):
        method.step(*tokens(t), 1.0)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    saved_model = copy.deepcopy(model.state_dict())
    for t in range(3, 6):
        method.step(*tokens(t), 1.0)
    other = gpt(seed=9)
    other.load_state_dict(saved_model)
    resumed = info.build(other, per_example_loss, cfg)
    resumed.load_state_dict(saved)
    for t in range(3, 6):
        resumed.step(*tokens(t), 1.0)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_each_idea_still_trains():
    x, y = tokens(0)
    for opts in ({"orthogonal": "true"}, {"guided": "0.25"}, {"sigma_lr": "0.05"}):
        model = gpt()
        with torch.no_grad():
            start = float(per_example_loss(model, x, y).mean())
        cfg = TrainConfig(optimizer="eggroll", lr=1e-2, population=32, sigma=0.05, seed=0, opts=opts)
        method = get_method("eggroll").build(model, per_example_loss, cfg)
        for _ in range(30):
            method.step(x, y, 1.0)
        with torch.no_grad():
            assert float(per_example_loss(model, x, y).mean()) < start - 0.1, opts


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"guided": "1.5"}, "guided must be a fraction"),
        ({"guided": "0.01"}, "leaves no guided"),
        ({"guide_history": "0"}, "guide_history must be"),
        ({"guide_history": "100000"}, "guide_history must be"),
        ({"sigma_lr": "-1"}, "sigma_lr must be"),
        ({"sigma_lr": "0.1", "inplace_sgd": "true"}, "need an optimizer"),
    ],
)
def test_bad_sampling_options_are_one_line_usage_errors(opts, message):
    cfg = TrainConfig(optimizer="eggroll", lr=1e-2, population=16, seed=0, opts=opts)
    with pytest.raises(UsageError, match=message):
        get_method("eggroll").build(gpt(), per_example_loss, cfg)


def test_a_checkpointed_training_run_with_all_three_resumes_exactly(tmp_path):
    """Through the trainer's checkpoint file (the scales and the guides' history inside it)."""
    from dataclasses import replace

    from _foundation import tiny_config

    from nograd.workbench import train
    from nograd.workbench.checkpoint import load_checkpoint

    one = tiny_config(
        tmp_path, optimizer="eggroll", population=16, out=str(tmp_path / "one"), opts=dict(ALL_THREE)
    )
    train(one)
    two = replace(one, out=str(tmp_path / "two"), steps=3, lr_decay_steps=6)
    train(two)
    train(replace(two, steps=6, resume="auto"))
    a, b = (
        load_checkpoint(tmp_path / "one" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "two" / "checkpoint.pt"),
    )
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("distribution", ["gaussian", "gaussian-table"])
def test_block_readers_of_shaped_noise_read_the_shaped_directions(distribution):
    """add_, accumulate_ and affine_members_ read what members() gives for a shaped tensor (the
    table is never read in place there) and for an unshaped one (the table's slices are)."""
    from nograd.core.noise import SMALL

    n = 2 * SMALL + 7  # block-keyed
    noise = ShapedNoise(1, distribution, directions=4, orthogonal=True)
    noise.scales[1] = 0.5
    for index, shaped in ((0, True), (1, True)):
        assert noise.shapes(index) == shaped and not noise.reads_in_place(index)
    plain = ShapedNoise(1, distribution, directions=4)
    assert plain.reads_in_place(0) == (distribution == "gaussian-table")
    for nz in (noise, plain):
        for index in (0, 1):
            z = nz.members((n,), generation=3, members=range(4), index=index)
            out = nz.add_(torch.zeros(n), 2.0, generation=3, member=1, index=index)
            torch.testing.assert_close(out, 2.0 * z[1])
            acc = nz.accumulate_(
                torch.zeros(n), [1.0, -1.0, 0.5, 0.0], generation=3, members=range(4), index=index
            )
            torch.testing.assert_close(acc, torch.tensor([1.0, -1.0, 0.5, 0.0]) @ z, atol=1e-5, rtol=1e-5)
            rows = nz.affine_members_(
                torch.empty(4, n), torch.ones(n), 0.5, generation=3, members=range(4), index=index
            )
            torch.testing.assert_close(rows, 1.0 + 0.5 * z)
