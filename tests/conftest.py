"""Test-wide setup: every test process gets its own ROS domain, localhost-only discovery and a private log dir.

Set before rclpy is imported anywhere, so nodes started as subprocesses inherit the same isolation and
parallel runs on one machine (xdist workers, other checkouts) never see each other.
"""

from __future__ import annotations

import os
import tempfile
import uuid

_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_worker_index = int(_worker[2:]) if _worker[2:].isdigit() else 0
# Domains 1..100 (valid with the default port mapping); workers get disjoint ranges of 25.
os.environ["ROS_DOMAIN_ID"] = str(1 + (_worker_index % 4) * 25 + os.getpid() % 25)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="psr-roslog-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture
def ros_namespace() -> str:
    """A namespace no other test or run uses, so topic names never collide even within one domain."""
    return "/t" + uuid.uuid4().hex[:10]
