"""`pixel-sail-bench`: model, node and soak benchmarks that print one JSON document.

Importing this package is light (no torch, no rclpy): the console entry point imports the CLI lazily, so
``import pixel_sail_ros.bench`` stays cheap for tools that only want the package's metadata.
"""

from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``pixel-sail-bench`` (see ``pixel-sail-bench --help``)."""
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
