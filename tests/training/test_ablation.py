"""The ablation pipeline: the ShapesRef expert really learns, and the four variants train and evaluate with
their own switches on one shared budget (a handful of steps here; the real budget is recorded in the README)."""

from __future__ import annotations

import json
import re

import pytest

from pixel_sail_ros.training import ablation, teacher


@pytest.mark.slow
def test_the_expert_learns_pixel_attributes_and_loads_as_a_transformers_model(tmp_path) -> None:
    record = teacher.train_teacher(tmp_path, steps=100, batch_size=4, lr=4e-3, seed=7, log=lambda _: None)
    before, after = record["pixel_accuracy_before"], record["pixel_accuracy"]
    assert after["colour"] >= before["colour"] + 0.1, record
    from transformers import AutoImageProcessor, AutoModel

    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "config.json", "preprocessor_config.json"}
    model = AutoModel.from_pretrained(tmp_path, use_safetensors=True, local_files_only=True)
    assert type(model).__name__ == "SegformerModel"
    proc = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert proc.size == {"height": 224, "width": 224}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ablation_runs_every_variant_with_its_own_switches(tmp_path) -> None:
    rows = ablation.run_ablation(tmp_path, steps=2, teacher_steps=3, eval_samples=6, batch_size=1, turns_per_image=2,
                                 threads=1)
    assert [r["variant"] for r in rows] == [v[0] for v in ablation.VARIANTS]
    switches = {}
    for r in rows:
        config = json.loads((tmp_path / r["variant"] / "config.json").read_text())
        switches[r["variant"]] = (config["use_upsampler"], config["visual_prompt_injection"])
        args = json.loads((tmp_path / r["variant"] / "training_args.json").read_text())
        assert args["final_step"] == 2 and args["seed"] == 1  # the same budget and data order for every variant
        assert (args["teacher_model"] is not None) == r["distillation"]
        assert all(r[k] is None or 0.0 <= r[k] <= 1.0 for k, _ in ablation.COLUMNS)
    assert switches == {"baseline": (False, False), "upsampler": (True, False), "vp_injection": (True, True),
                        "distillation": (True, True)}
    assert "loss_distill_pixel" in (tmp_path / "distillation" / "metrics.jsonl").read_text()
    assert "loss_distill_pixel" not in (tmp_path / "vp_injection" / "metrics.jsonl").read_text()
    table = (tmp_path / "ablation.md").read_text()
    assert len(re.findall(r"^\| [+p]", table, re.M)) == 4
    record = json.loads((tmp_path / "ablation.json").read_text())
    assert record["rows"] == rows and record["train_args"][: len(ablation.RECIPE)] == list(ablation.RECIPE)
    assert json.loads((tmp_path / "baseline" / "training_args.json").read_text())["lr"] == 1e-3  # the recipe arrived

    # interrupted and restarted: finished variants are reused, not retrained
    logs = {r["variant"]: (tmp_path / f"{r['variant']}.train.log").stat().st_mtime_ns for r in rows}
    again = ablation.run_ablation(tmp_path, steps=2, teacher_steps=3, eval_samples=6, batch_size=1, turns_per_image=2,
                                  threads=1)
    assert again == rows
    assert logs == {r["variant"]: (tmp_path / f"{r['variant']}.train.log").stat().st_mtime_ns for r in rows}
