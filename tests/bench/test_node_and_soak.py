"""The ROS suites end to end (the node in its own process), and their helpers.

``test_soak_30_seconds`` is the CI soak of issue 7: 30 s of a 15 Hz stream with prompts, clicks and garbage.
"""

from __future__ import annotations

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("pixel_sail_ros.msg", reason="interfaces not built: run `make build`")

from pixel_sail_ros.ros.bench.node_bench import (ABSENT_PROMPT, FRAME_INDEX, FRAME_SEED, HEIGHT, PROMPT,  # noqa: E402
                                                 WIDTH, Timed, summarise)
from pixel_sail_ros.ros.bench.soak import GARBAGE_KINDS, garbage_frame, rss_growth_pct  # noqa: E402

from ..integration.node_harness import a_of_b  # noqa: E402
from .conftest import BUNDLED, run_bench  # noqa: E402

NODE_KEYS = ("e2e_ms_p50", "e2e_ms_p95", "engine_ms_p50", "overhead_ms_p50", "echo_ms_p50", "echo_method",
             "dropped", "output_hz", "frames_sent", "p95_bound_ms", "p95_within_bound")


@pytest.mark.slow
@pytest.mark.ros
@pytest.mark.timeout(240)
def test_node_suite_short(bench_model_dir: str) -> None:
    code, doc, err = run_bench("--suite", "node", "--json", "--quick", "--seconds", "10", "--device", "cpu",
                               "--model-path", bench_model_dir, "--frame-wait-ms", "15", "--threads", "1",
                               "--resolution", "480x360", timeout=200)
    assert code == 0, err[-3000:]
    node = doc["node"]
    missing = [k for k in NODE_KEYS if k not in node]
    assert not missing, missing
    assert node["frames_sent"] >= 300 and node["stream_frames"] == 300  # 10 s at 30 Hz
    assert node["frame_wait_ms"] == 15.0 and node["node_num_threads"] == 1  # settings are reported with the figures
    assert node["resolution"] == node["path_ms"]["frame"] == [480, 360]  # the camera size asked for, not 640x480
    assert node["compile_image"] is False and 0 < node["first_result_s"] < 60  # primed before the timed stream
    assert node["keep_freed_memory"] == "yes"  # the node's own report: malloc's thresholds were fixed
    assert node["warmup"].startswith("480x360 in ")  # the node warmed up at the stream's size, not its default
    assert node["results"] > 0 and node["results_measured"] > 0
    assert node["results_for_unknown_frames"] == 0  # every result carries a header this run sent
    # the node's books balance: every frame it received was answered or counted as dropped
    assert node["results"] + node["dropped"] == node["frames_received"], node
    assert node["frames_received"] >= 0.9 * node["frames_sent"]  # the bench transport carries the frames
    assert node["e2e_ms_p50"] >= node["engine_ms_p50"] > 0
    assert node["overhead_ms_p50"] > 0 and node["idle_overhead_ms_p50"] > 0
    assert node["p95_bound_ms"] == pytest.approx(2 * node["engine_ms_p50"] + 20, abs=0.01)
    assert node["p95_within_bound"] == (node["e2e_ms_p95"] <= node["p95_bound_ms"])
    assert 0 < node["echo_ms_p50"] < 1000 and node["echo_frames_returned"] > 0
    assert node["output_hz"] > 0 and node["node_alive_at_end"]
    assert node["path_ms"]["to_rgb8_is_view"] is True
    # a standing text prompt: every answer's question was read in its image's own decoder pass
    assert node["fuse_first_turn"] is True
    # the node's own queue wait is part of the streaming overhead, not more than all of it
    assert 0 <= node["queue_wait_ms_p50"] <= node["queue_wait_ms_p95"] <= node["e2e_ms_p95"]
    assert node["queue_wait_ms_p50"] <= node["overhead_ms_p95"], (node["queue_wait_ms_p50"], node["overhead_ms_p95"])
    # so are the other stages the node times: the way in, the executor, the result's way out; milliseconds, not 0
    stages = [node[f"{stage}_ms_p50"] for stage in ("transport_in", "callback_delay", "after_engine")]
    assert all(v >= 0 for v in stages), stages
    assert 0.01 < sum(stages) <= node["overhead_ms_p95"], (stages, node["overhead_ms_p95"])
    fused, answered = a_of_b(node["answers_from_the_image_pass"])
    assert fused == answered > 0, node["answers_from_the_image_pass"]
    if bench_model_dir == str(BUNDLED):  # a trained model finds the prompt's object: the mask path was timed
        assert node["prompt"] == PROMPT
        assert node["results_with_objects"] == node["results_measured"], node["results_with_objects"]
        assert node["idle_results_with_objects"] == node["idle_frames"] > 0
    # then the "No target." path: a shorter stream with a prompt for an object the frame lacks
    absent = node["no_target"]
    assert absent["prompt"] == ABSENT_PROMPT and absent["results_measured"] > 0
    assert absent["e2e_ms_p50"] >= absent["engine_ms_p50"] > 0 and absent["overhead_vs_echo"] > 0
    if bench_model_dir == str(BUNDLED):
        assert absent["results_with_objects"] == 0
        assert absent["engine_ms_p50"] < node["engine_ms_p50"]  # no pixel decoder, no mask


def test_the_standing_prompt_names_one_object_of_the_bench_frame() -> None:
    """The node suite times answers with a mask, then "No target." answers: its prompts must name exactly one object
    of its frame, and none."""
    from pixel_sail_ros.training.camera_frames import render_frame

    objects = render_frame(FRAME_SEED, FRAME_INDEX, WIDTH, HEIGHT).scene.objects

    def count(phrase: str) -> int:
        color, shape = phrase.split()
        return sum(o.color == color and o.shape == shape for o in objects)

    assert count(PROMPT) == 1 and count(ABSENT_PROMPT) == 0, [(o.color, o.shape) for o in objects]


@pytest.mark.slow
@pytest.mark.ros
@pytest.mark.timeout(240)
def test_soak_30_seconds(bench_model_dir: str) -> None:
    code, doc, err = run_bench("--suite", "soak", "--json", "--seconds", "30", "--device", "cpu",
                               "--model-path", bench_model_dir, timeout=200)
    soak = doc["soak"]
    assert soak["checks"] == {"no_crash": True, "every_frame_accounted": True,
                              "every_garbage_frame_rejected_or_lost": True, "node_books_balance": True,
                              "rss_growth_below_5pct": True, "no_unexpected_errors": True,
                              "headers_intact": True}, ({k: v for k, v in soak.items() if k != "samples"}, err[-3000:])
    assert soak["passed"] is True and code == 0
    assert soak["crashes"] == 0 and soak["clean_exit_on_sigint"]
    assert soak["good_frames_sent"] >= 350 and soak["garbage_frames_sent"] >= 85  # 450 ticks, 1 in 5 garbage
    assert soak["answered"] > 0 and soak["click_results"] > 0
    if bench_model_dir == str(BUNDLED):  # its prompts name an object in one scene of four: both paths ran
        assert 0 < soak["answered_with_objects"] < soak["answered"], (soak["answered_with_objects"], soak["answered"])
    # every frame sent is answered, dropped for a newer one, rejected, or counted as lost in transport
    assert (soak["answered"] + soak["dropped"] + soak["frames_rejected"] + soak["frames_lost_in_transport"]
            == soak["good_frames_sent"] + soak["garbage_frames_sent"])
    # the shipped profile carries most frames (without it, over UDP, most 640x480 frames were lost); a loaded
    # 2-core machine still loses a few per cent (492 of 9000 frames in the 10-minute soak), all counted
    assert soak["frames_lost_in_transport"] <= 0.25 * soak["good_frames_sent"]
    # each rejected frame / bad click counted once as an error, nothing else failed
    assert soak["errors"] == soak["frames_rejected"] + soak["bad_clicks_sent"]
    assert len(soak["samples"]) >= 25 and all(s["rss_mb"] > 0 for s in soak["samples"])
    assert soak["fds_end"] - soak["fds_start"] <= 2


@pytest.mark.slow
@pytest.mark.ros
@pytest.mark.timeout(120)
def test_a_node_that_cannot_start_fails_the_soak_with_its_reason(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")  # a checkpoint directory the node cannot load
    code, doc, err = run_bench("--suite", "soak", "--seconds", "5", "--device", "cpu", "--model-path", str(tmp_path),
                               timeout=100)
    assert code == 2 and "the node exited" in doc["error"], (doc, err[-2000:])
    assert "configure failed" in doc["error"]  # the node's own log line travels with the error


def test_every_garbage_kind_is_rejected_by_the_conversion() -> None:
    from pixel_sail_ros.ros.bench.node_bench import frame_message
    from pixel_sail_ros.ros.image_conversion import ImageConversionError, to_rgb8

    good = frame_message(64, 48)
    assert to_rgb8(good).shape == (48, 64, 3)
    for kind in GARBAGE_KINDS:
        with pytest.raises(ImageConversionError):
            to_rgb8(garbage_frame(kind, good))


def test_rss_growth_uses_the_samples_after_warmup() -> None:
    # 100 → 150 MB while warming up (not growth), then +0.1 MB/s
    samples = [{"t_s": float(t), "rss_mb": 100.0 + 10 * t if t < 5 else 150.0 + (t - 5) * 0.1} for t in range(20)]
    growth, ref, end = rss_growth_pct(samples, warmup_s=5.0)
    assert ref == pytest.approx(150.1) and end == pytest.approx(151.3)
    assert growth == pytest.approx(100 * 1.2 / 150.1)
    assert rss_growth_pct(samples[:1], 0.0) == (None, None, None)


def test_summarise_keeps_the_window_and_computes_overhead() -> None:
    ms = 1_000_000
    timed = [Timed(sent_ns=i * 100 * ms, recv_ns=i * 100 * ms + 60 * ms, engine_s=0.05, objects=i % 3)
             for i in range(10)]
    out = summarise(timed, window_start_ns=200 * ms, window_end_ns=900 * ms)
    assert out["results_measured"] == 8
    assert out["results_with_objects"] == 5  # frames 2..9 in the window; 3, 6 and 9 had "No target."
    assert out["e2e_ms_p50"] == pytest.approx(60.0) and out["engine_ms_p50"] == pytest.approx(50.0)
    assert out["overhead_ms_p50"] == pytest.approx(10.0)
    assert out["p95_bound_ms"] == pytest.approx(120.0) and out["p95_within_bound"] is True
    assert out["output_hz"] == pytest.approx(8 / 0.7, rel=1e-3)


def test_target_flags() -> None:
    from pixel_sail_ros.ros.bench.node_bench import target_flags

    flags = target_flags(overhead=12.0, idle=2.0, hop=1.2)
    assert flags["overhead_vs_echo"] == 10.0
    assert not flags["overhead_within_10ms"] and not flags["overhead_within_2x_echo"]
    assert flags["idle_overhead_within_10ms"] and flags["idle_overhead_within_2x_echo"]
    assert not any(v for k, v in target_flags(None, None, None).items() if k != "overhead_vs_echo")


@pytest.mark.slow
@pytest.mark.ros
@pytest.mark.timeout(120)
def test_executor_probe_times_the_engine_beside_a_spinning_stream() -> None:
    """scripts/executor_probe.py (how the node's stalls were traced): the stream really reaches the spun executor
    while the engine is timed, and its figures are consistent."""
    import json
    import subprocess
    import sys

    from .conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "executor_probe.py"), "--executor", "single",
                           "--seconds", "3", "--threads", "1"], capture_output=True, text=True, timeout=100, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["executor"] == "single" and out["frames_received"] > 20, out  # 3 s of a 30 Hz stream, after discovery
    assert out["requests"] > 5 and 0 < out["engine_ms_p50"] <= out["engine_ms_p95"] <= out["engine_ms_max"], out
