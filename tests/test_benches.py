"""`nograd bench throughput`, `memory` and `distributed` on tiny settings: keys and sanity."""

from __future__ import annotations

import math

import pytest

from nograd.bench import get
from nograd.core.noise import TABLE_SIZE


def test_throughput_bench_reports_ratios() -> None:
    out = get("throughput")(["--population", "4", "--batch", "1", "--block", "8", "--repeats", "1"])
    assert set(out["models"]) == {"gpt", "mlp"}
    for r in out["models"].values():
        assert r["population"] == 4 and r["rank"] == 1
        for key in ("ratio", "update_ratio", "naive_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0
    assert out["ratio"] == out["models"]["gpt"]["ratio"]


def test_compiled_throughput_splits_a_generation_into_the_draw_and_the_forward() -> None:
    argv = ["--population", "4", "--batch", "1", "--repeats", "1", "--models", "mlp", "--compile"]
    r = get("throughput")(argv)["models"]["mlp"]
    assert 0 < r["compiled_draw_share"] < 1
    assert math.isfinite(r["compiled_forward_ratio"]) and r["compiled_forward_ratio"] > 0
    assert set(r["compile_s"]) == {"inference", "inference_same_gemm", "population"}
    # the like-for-like yardstick: plain inference through the engine's own GEMM
    assert r["gemm"] in ("torch", "onednn")
    for key in ("inference_gemm_speedup", "same_gemm_ratio", "compiled_same_gemm_ratio"):
        assert math.isfinite(r[key]) and r[key] > 0


def test_es_bench_reports_each_strategy_with_the_floor_and_the_draws() -> None:
    argv = ["--dim", "3000", "--population", "8", "--repeats", "1", "--strategies", "snes,rm-es", "--table"]
    out = get("es")([*argv, "--threads", "1"])
    assert set(out["strategies"]) == {"snes", "snes (gaussian-table)", "rm-es", "rm-es (gaussian-table)"}
    assert out["floor_ratio"] > 1.0 and set(out["draw_ratio"]) == {"gaussian", "gaussian-table"}
    for r in out["strategies"].values():
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0


def test_es_bench_times_lm_ma_es_with_its_memory_full() -> None:
    """LM-MA-ES's generation t uses min(t, m) vectors: the bench times it once all m are in use."""
    from nograd.strategies import LMMAES

    argv = ["--dim", "600", "--population", "8", "--repeats", "1", "--strategies", "lm-ma-es,snes"]
    out = get("es")([*argv, "--threads", "1"])
    m = LMMAES([0.0] * out["dim"], 1.0).memory
    assert out["strategies"]["lm-ma-es"]["generations_before_timing"] == m + 1
    facts = out["strategies"]["lm-ma-es"]
    assert facts["sampling"] == "direct" and facts["memory_vectors"] == m  # float32 weights
    assert 1 <= facts["directions"] <= m
    assert "sampling" not in out["strategies"]["snes"]
    assert out["strategies"]["snes"]["generations_before_timing"] == 1


def test_memory_bench_counts_the_noise_table() -> None:
    # weights of 50 MB, so that one forward rises clearly above the peak RSS of the imports
    argv = ["--n-layer", "4", "--n-head", "4", "--n-embd", "512", "--block-size", "16", "--batch-size", "2"]
    out = get("memory")([*argv, "--methods", "inference,mezo,mezo-table", "--repeats", "1"])
    assert set(out["memory_ratios"]) == {"mezo", "mezo-table"}
    assert out["memory_ratio"] == out["memory_ratios"]["mezo"]
    # the table's float32 numbers are resident in the mezo-table process only
    added = out["added_bytes"]
    assert added["mezo-table"] - added["mezo"] > 0.8 * 4 * TABLE_SIZE
    for key in ("time_ratio", "time_ratio_rank1_noise", "time_ratio_table_noise"):
        assert math.isfinite(out[key]) and out[key] > 0


def test_memory_bench_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        get("memory")(["--methods", "inference,sgd"])


def test_distributed_bench_reports_scaling_and_bytes() -> None:
    argv = ["--population", "8", "--generations", "2", "--warmup", "1", "--n-embd", "16", "--n-head", "2"]
    out = get("distributed")(argv)
    assert out["procs"] == [1, 2] and set(out["generations_per_s"]) == {"1", "2"}
    assert out["efficiency"] > 0 and out["weights_bytes"] == 4 * out["params"]
    # each rank sends its 4 float32 losses (2 antithetic pairs) once, to the other rank
    assert out["bytes_per_generation"] == 4 * 4
    model = out["model"]["speedup_at"]
    assert set(model) == {"ring", "tree"} and set(model["tree"]) == {"16", "256", "1024"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--population", "7"], "even"),
        (["--procs", "64"], "cores"),
        (["--generations", "0"], "--generations"),
    ],
)
def test_distributed_bench_checks_its_arguments(argv, message) -> None:
    with pytest.raises(ValueError, match=message):
        get("distributed")(argv)


def test_lm_memory_bench_on_a_tiny_llama(tmp_path) -> None:
    pytest.importorskip("peft")
    from _tiny_lm import sentiment_csv, tiny_lm_folder

    argv = [
        "--task",
        "text-classification",
        "--model",
        str(tiny_lm_folder(tmp_path)),
        "--data",
        str(sentiment_csv(tmp_path)),
        "--classes",
        "negative,positive",
        "--threads",
        "1",
        "--batch-size",
        "4",
        "--methods",
        "inference,mezo-lora,mezo-prefix,eggroll-lora",
        "--population",
        "4",
    ]
    out = get("lm-memory")(argv)
    assert set(out["memory_ratios"]) == {"mezo-lora", "mezo-prefix", "eggroll-lora"}
    assert all(r > 0 and math.isfinite(r) for r in out["memory_ratios"].values())
    assert out["trainable"]["mezo-lora"] < out["weight_bytes"] / 4  # the adapters only
    assert out["trainable"]["mezo-prefix"] < out["weight_bytes"] / 4
    assert out["eggroll_population"] == 4 and out["eggroll_time_ratio"] > 0
    with pytest.raises(ValueError, match="unknown method"):
        get("lm-memory")(["--methods", "sgd-full"])


def test_lm_memory_bench_takes_the_dtype_and_the_noise(tmp_path) -> None:
    from _tiny_lm import sentiment_csv, tiny_lm_folder

    argv = ["--task", "text-classification", "--model", str(tiny_lm_folder(tmp_path))]
    argv += ["--data", str(sentiment_csv(tmp_path)), "--classes", "negative,positive", "--threads", "1"]
    argv += ["--batch-size", "4", "--methods", "inference,mezo-full"]
    out = get("lm-memory")([*argv, "--dtype", "bfloat16", "--noise", "gaussian-counter"])
    assert out["dtype"] == "bfloat16" and out["noise"] == "gaussian-counter"
    assert out["weight_bytes"] == 2 * out["trainable"]["mezo-full"]  # every weight in 2 bytes
    assert math.isfinite(out["memory_ratios"]["mezo-full"])
    with pytest.raises(ValueError, match="invalid choice: 'float64'"):
        get("lm-memory")([*argv, "--dtype", "float64"])


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("throughput", ["--device", "nope"], "unknown --device 'nope'"),
        ("es", ["--dim", "-5"], "--dim must be >= 1, got -5"),
        ("es", ["--repeats", "0"], "--repeats must be >= 1"),
        ("memory", ["--batch-size", "0"], "--batch-size must be >= 1"),
        ("nres", ["--sigma", "1e39"], "too large for float32"),
        ("nres", ["--lr", "nan"], "--lr must be a finite number"),
        ("nres", ["--seed", "-1"], "--seed must be >= 0"),
        ("distributed", ["--warmup", "-1"], "--warmup must be >= 0"),
    ],
)
def test_every_benchmark_checks_its_numbers_by_class(name, argv, message) -> None:
    with pytest.raises(ValueError, match=message):
        get(name)(argv)
