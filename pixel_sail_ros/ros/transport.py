"""Where the shipped Fast DDS profile for camera-sized messages lives (see config/fastdds_large_frames.xml)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

PROFILE_ENV = "FASTDDS_DEFAULT_PROFILES_FILE"
PROFILE_NAME = "fastdds_large_frames.xml"


def large_frames_profile() -> Optional[Path]:
    """The profile in this source tree, or in the installed package's share directory; None if neither exists."""
    candidates = [Path(__file__).resolve().parents[2] / "config" / PROFILE_NAME]
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("pixel_sail_ros")) / "config" / PROFILE_NAME)
    except Exception:  # noqa: BLE001 - not installed through ament: the source tree is the only candidate
        pass
    return next((p for p in candidates if p.is_file()), None)


def use_large_frames_profile() -> Optional[str]:
    """Point Fast DDS at the shipped profile unless the user chose one; call before the first rclpy context."""
    if os.environ.get(PROFILE_ENV):
        return os.environ[PROFILE_ENV]
    path = large_frames_profile()
    if path is not None:
        os.environ[PROFILE_ENV] = str(path)
    return None if path is None else str(path)


def configure(kind: str) -> str:
    """For pixel-sail-bench: ``shm16`` = the shipped profile (unless the user set one), ``default`` = Fast DDS as is.

    Returns what the JSON reports. Must run before the first rclpy context is created.
    """
    if kind == "default":
        return "default"
    if kind != "shm16":
        raise ValueError(f"--transport must be shm16 or default, got {kind!r}")
    if os.environ.get(PROFILE_ENV):
        return f"user_profile:{os.environ[PROFILE_ENV]}"
    if use_large_frames_profile() is None:
        raise FileNotFoundError(f"{PROFILE_NAME} not found (neither in the source tree nor installed)")
    return "fastdds_shm_16MB"
