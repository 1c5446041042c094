"""`make demo` as a user runs it: the node in its own process on the bundled model, the synthetic camera,
prompts across a scene switch and a click; every request answered, 3D positions from the paired depth."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from .conftest import bundled_meets_targets
from .node_harness import ROOT


@pytest.mark.ros
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_demo_answers_every_request_across_a_scene_switch(tmp_path, ros_namespace: str, model_dir: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pixel_sail_ros.ros.demo", "--scenes", "2", "--out", str(tmp_path),
         "--namespace", ros_namespace, "--timeout", "90", "--model-path", model_dir],
        capture_output=True, text=True, timeout=380)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "8/8 requests answered" in proc.stdout, out[-4000:]
    assert len(re.findall(r"^== scene \d", proc.stdout, re.M)) == 2
    prompts = re.findall(r"^  prompt '(.+?)': (.*)$", proc.stdout, re.M)
    clicks = re.findall(r"^  click \(\d+, \d+\) on .+: description '(.+?)'", proc.stdout, re.M)
    assert len(prompts) == 6 and len(clicks) == 2, proc.stdout
    found = [line for _, line in prompts if not line.startswith("no object")]
    # every answered prompt gets its overlay PNG; every object found gets a 3D position exactly when its mask has
    # at least min_depth_points pixels (the demo's depth image is valid everywhere)
    assert len(list(tmp_path.glob("scene*.png"))) == len(prompts)
    min_points = yaml.safe_load((ROOT / "config" / "pixel_sail.yaml").read_text())["/**"]["ros__parameters"]["min_depth_points"]
    for line in found:
        pixels = int(re.search(r", (\d+) px", line).group(1))
        assert ("xyz=(" in line) == (pixels >= min_points), (line, proc.stdout)
    if bundled_meets_targets():  # scored against ground truth once the bundled model is good enough
        ious = [float(m) for m in re.findall(r"IoU vs truth ([0-9.]+)", proc.stdout)]
        assert ious and min(ious) > 0.5, proc.stdout
        assert proc.stdout.count("correct (absent)") == 2, proc.stdout
