"""keep_freed_memory: a frame's worth of tensors freed and allocated again must not fault in fresh pages."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from pixel_sail_ros import allocator

# Ten 3 MiB tensors alive at once, then all freed: the model's per-frame pattern in small. With glibc's own
# thresholds the 30 MiB freed at the heap's top passes the trim threshold (twice the largest block seen) and goes
# back to the OS, so the next frame faults its pages in again.
FRAME_PATTERN = textwrap.dedent("""
    import resource, sys, torch
    from pixel_sail_ros.allocator import keep_freed_memory
    if sys.argv[1] == "keep":
        reason = keep_freed_memory()
        assert reason == "", reason
    def frame():
        held = [torch.empty(3 << 20, dtype=torch.uint8).fill_(1) for _ in range(10)]
        del held
    for _ in range(3):
        frame()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        frame()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _faults_per_frame(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FRAME_PATTERN, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_freed_frames_are_reused_without_page_faults():
    # glibc's own thresholds fault ~77 pages per frame here, but a process now and then none (2 in 6 on an idle
    # EPYC VM, 1 in 6 on a loaded Xeon; random per process, not by PYTHONHASHSEED; three in a row failed CI once):
    # the pattern counts as trimming if any of eight runs faults (it stops at the first)
    default = 0.0
    for _ in range(8):
        default = max(default, _faults_per_frame("default"))
        if default >= 10:
            break
    kept = _faults_per_frame("keep")
    assert default >= 10, f"glibc's own thresholds faulted only {default} pages per frame: the pattern no longer trims"
    assert kept < 1, f"{kept} page faults per frame with keep_freed_memory (default: {default})"


# The node's case: the bundled model answering its bench frame in a worker thread (whose allocations come from a
# thread arena, not the main heap).
ENGINE_IN_A_THREAD = textwrap.dedent("""
    import resource, threading, torch
    from pixel_sail_ros.allocator import keep_freed_memory
    reason = keep_freed_memory()
    assert reason == "", reason
    torch.set_num_threads(2)
    from pixel_sail_ros.engine import PixelSailEngine
    from pixel_sail_ros.ros.bench.node_bench import FRAME_INDEX, FRAME_SEED, HEIGHT, PROMPT, WIDTH
    from pixel_sail_ros.training.camera_frames import render_frame
    engine = PixelSailEngine.from_pretrained(None, device="cpu")
    rgb = render_frame(FRAME_SEED, FRAME_INDEX, WIDTH, HEIGHT).rgb  # the node suite's frame and prompt
    out = {}
    def work():
        for _ in range(5):
            engine.segment(rgb, PROMPT)
        out["faults"], out["masks"] = [], 0
        for _ in range(3):  # batches of 10 answers: faults per answer in each
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            out["masks"] += sum(len(engine.segment(rgb, PROMPT).masks) for _ in range(10))
            out["faults"].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(out["masks"], min(out["faults"]), *out["faults"])
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_the_bundled_model_answers_in_a_worker_thread_without_page_faults():
    """Without the thresholds this faulted 77-2700 pages per answer (docs/PERFORMANCE.md); the mask path is timed,
    so every answer must carry its mask. The steady state is what counts: on an AVX2-only EPYC VM the heap was still
    growing after five answers (616 faults in the next ten, none in the twenty after), so the best of three batches is
    judged; a per-frame fault of the old kind shows in every batch."""
    out = subprocess.run([sys.executable, "-c", ENGINE_IN_A_THREAD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    masks, best, *batches = out.stdout.split()[-5:]
    assert int(masks) == 30
    assert float(best) < 20, f"{best} minor page faults per answer at best (batches of ten: {batches})"


def test_without_glibc_it_says_why_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    monkeypatch.setattr(allocator, "_applied", False)
    assert allocator.keep_freed_memory() == "the C library is musl, not glibc"
    assert not allocator.keeps_freed_memory()
