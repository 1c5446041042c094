"""scripts/warmup_probe.py (what a warm-up saves the first frame): cold and warmed processes report consistent
figures, and the warm-up changes no answer."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "warmup_probe.py"), *args],
                          capture_output=True, text=True, timeout=200, cwd=str(ROOT))


def _probe(*args: str) -> dict:
    proc = _run("--device", "cpu", "--threads", "1", "--width", "320", "--height", "240", "--frames", "3", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_cold_and_a_warmed_process_answer_alike_and_only_the_warmed_one_warms_up() -> None:
    cold, warm = _probe(), _probe("--warm-up")
    assert (cold["warm_up"], warm["warm_up"]) == (False, True)
    assert cold["warm_up_s"] == 0 and warm["warm_up_s"] > 0
    for out in (cold, warm):
        assert out["device"] == "cpu" and out["resolution"] == [320, 240] and out["torch_threads"] == 1, out
        assert out["first_frame_ms"] > 0 and out["later_frames_ms_p50"] > 0 and out["first_click_described_ms"] > 0
        assert len(out["masks_per_frame"]) == 3
    # the node suite's frame holds the prompt's one object: every frame finds it, warmed up or not
    assert cold["masks_per_frame"] == warm["masks_per_frame"] == [1, 1, 1]


def test_it_refuses_a_single_frame() -> None:
    proc = _run("--frames", "1")
    assert proc.returncode == 2 and "--frames must be at least 2" in proc.stderr
