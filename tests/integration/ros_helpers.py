"""Helpers for integration tests that run real rclpy nodes over Fast DDS (no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions


@contextmanager
def ros_node(name: str, namespace: str = "/") -> Iterator[tuple[Node, SingleThreadedExecutor]]:
    """A node in its own rclpy context (so tests never share global state)."""
    ctx = Context()
    rclpy.init(context=ctx, signal_handler_options=SignalHandlerOptions.NO)
    node = Node(name, namespace=namespace, context=ctx)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    try:
        yield node, executor
    finally:
        executor.remove_node(node)
        node.destroy_node()
        executor.shutdown()
        rclpy.try_shutdown(context=ctx)


def spin_until(executor: SingleThreadedExecutor, predicate: Callable[[], bool], timeout: float) -> bool:
    """Spin until predicate() is true or timeout seconds pass; returns predicate()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        executor.spin_once(timeout_sec=0.05)
    return predicate()


def start_process(args: list[str], **kwargs) -> subprocess.Popen:
    """Start a python module/script as its own process with the test's ROS environment."""
    return subprocess.Popen(
        [sys.executable, *args],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """SIGINT, then wait; returns everything the process printed. SIGKILL only as a last resort."""
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = proc.stdout.read() if proc.stdout else ""
    return out
