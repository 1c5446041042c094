"""The train suite: both precisions through the real trainer, their JSON, and that bf16 really ran."""

from __future__ import annotations

import pytest

from .conftest import run_bench


@pytest.mark.slow
def test_train_suite_times_float32_and_bf16_on_the_same_batches(bench_model_dir: str) -> None:
    code, doc, err = run_bench("--suite", "train", "--json", "--quick", "--device", "cpu", "--threads", "1",
                               "--repeats", "2", "--model-path", bench_model_dir, timeout=400)
    assert code == 0, err[-3000:]
    assert doc["suite"] == "train" and doc["machine"]["torch_threads"] == 1
    train = doc["train"]
    assert (train["batch_size"], train["turns_per_image"], train["timed_steps"]) == (4, 16, 2)
    full, half = train["entries"]
    assert (full["precision"], half["precision"]) == ("float32", "bf16-autocast")
    for e in (full, half):
        assert e["device"] == "cpu" and e["images_per_s"] > 0
        assert 0 < e["step_ms_p50"] <= e["step_ms_p95"]
        assert len(e["losses"]) == train["warmup_steps"] + train["timed_steps"]
        assert e["images_per_s"] == pytest.approx(4000 / e["step_ms_p50"], rel=0.5)  # two steps: mean vs median
    # the same weights and batches: the first losses agree to bf16's precision, and differ, so bf16 was on
    assert half["first_loss"] != full["first_loss"]
    assert train["first_loss_rel_diff"] == pytest.approx(abs(half["first_loss"] - full["first_loss"]) / full["first_loss"], abs=1e-3)
    assert train["first_loss_rel_diff"] < 0.03
    assert train["bf16_speedup"] == pytest.approx(full["step_ms_p50"] / half["step_ms_p50"], rel=0.02, abs=0.005)  # 2 decimals


def test_train_suite_refuses_zero_steps() -> None:
    code, doc, _ = run_bench("--suite", "train", "--quick", "--device", "cpu", "--repeats", "0", timeout=120)
    assert code == 2 and "--repeats must be at least 1" in doc["error"]
