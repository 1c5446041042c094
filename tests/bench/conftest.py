"""Fixtures for the benchmark tests: a checkpoint directory and a way to run the CLI as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "pixel_sail_ros" / "checkpoints" / "shapesref_tiny"


@pytest.fixture(scope="session")
def bench_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled checkpoint when it exists, else a random-weight tiny one (same shapes, same code paths)."""
    if (BUNDLED / "config.json").is_file():
        return str(BUNDLED)
    from pixel_sail_ros.bench.random_model import save_random_checkpoint

    return str(save_random_checkpoint(tmp_path_factory.mktemp("bench_ckpt") / "tiny"))


def run_bench(*args: str, timeout: float = 300.0) -> tuple[int, dict[str, Any], str]:
    """``python -m pixel_sail_ros.bench ARGS`` → (exit code, the JSON document on stdout, stderr).

    Fails the test if stdout is not exactly one JSON document (other tools parse it).
    """
    proc = subprocess.run([sys.executable, "-m", "pixel_sail_ros.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ), cwd=str(ROOT))
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        pytest.fail(f"stdout is not one JSON document ({exc}):\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc.returncode, doc, proc.stderr
