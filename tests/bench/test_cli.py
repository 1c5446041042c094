"""The CLI's contract: a light package import, help, and one JSON document even on errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from pixel_sail_ros.bench.cli import build_parser


def test_importing_the_package_is_light() -> None:
    code = ("import sys, pixel_sail_ros.bench as b; assert callable(b.main); "
            "heavy = [m for m in ('torch', 'rclpy', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_parser_defaults_and_choices() -> None:
    args = build_parser().parse_args(["--suite", "soak", "--minutes", "2", "--json"])
    assert (args.suite, args.minutes, args.seconds, args.transport) == ("soak", 2.0, None, "shm16")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--suite", "everything"])
    assert args.resolution is None  # the suites' own sizes
    assert build_parser().parse_args(["--resolution", "1280X720"]).resolution == (1280, 720)
    for bad in ("1280", "1280x", "axb", "1280x720x3", "8x8", "100000x720"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--resolution", bad])


@pytest.mark.skipif(shutil.which("pixel-sail-bench") is None, reason="console script not installed (pip install -e .)")
def test_console_script_help() -> None:
    out = subprocess.run(["pixel-sail-bench", "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "--suite" in out.stdout and "soak" in out.stdout


def test_transport_profile_is_written_once_and_a_user_profile_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from pixel_sail_ros.ros import transport

    monkeypatch.delenv(transport.PROFILE_ENV, raising=False)
    assert transport.configure("default") == "default"
    assert transport.PROFILE_ENV not in os.environ
    assert transport.configure("shm16") == "fastdds_shm_16MB"
    path = os.environ[transport.PROFILE_ENV]
    text = open(path, encoding="utf-8").read()
    assert f"<segment_size>{16 * 2**20}</segment_size>" in text and "<type>SHM</type>" in text
    monkeypatch.setenv(transport.PROFILE_ENV, "/etc/my_profile.xml")
    assert transport.configure("shm16") == "user_profile:/etc/my_profile.xml"
    with pytest.raises(ValueError):
        transport.configure("udp")
