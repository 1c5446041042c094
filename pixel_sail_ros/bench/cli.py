"""`pixel-sail-bench`: run a suite, print ONE JSON document on stdout, log to stderr.

Suites: ``model`` (per preset/resolution latencies and efficiency), ``node`` (the node in its own process
under a 30 Hz stream, against a plain rclpy echo), ``all`` (model + node), ``soak`` (the node for minutes
under a 15 Hz stream of good and bad input) and ``train`` (fine-tuning throughput, float32 against bf16).
Other tools parse stdout, so nothing else may be printed there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

from pixel_sail_ros import DECODING_MODES, DTYPE_NAMES

SUITES = ("model", "node", "all", "soak", "train")
PRESETS = ("tiny", "0.5b", "3b")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pixel-sail-bench",
        description="Benchmarks of the Pixel-SAIL model and ROS node; prints one JSON document on stdout.",
    )
    p.add_argument("--suite", choices=SUITES, default="model", help="what to run (default: model)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (the only output format; accepted so scripts can say it explicitly)")
    p.add_argument("--model-path", default=None,
                   help="checkpoint directory for the tiny entries and the node (default: the bundled model; "
                        "random tiny weights if it is missing)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and shorter streams (tests, smoke runs)")
    p.add_argument("--presets", default="tiny,0.5b",
                   help="comma-separated model presets for the model suite (default: tiny,0.5b)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="dtype (default: auto = bf16 on CUDA, float32 on the CPU)")
    p.add_argument("--decoding", default="auto", choices=DECODING_MODES,
                   help="model suite: how answers decode, as the engine's `decoding` (default: auto = dynamic)")
    p.add_argument("--speculative", default="on", choices=("on", "off"),
                   help="model and node suites: draft each segmentation answer from the standing prompt's previous "
                        "answer, verified in one pass (the engine's speculative / the node's speculative_decoding; "
                        "default: on, as they are)")
    p.add_argument("--compile-image", default="off", choices=("on", "off"),
                   help="model and node suites: run the image prefix and the pixel decoder through torch.compile (the "
                        "engine's compile_image / the node's parameter; the warm-up pays the compilation; default: "
                        "off, as they are)")
    p.add_argument("--fuse-first-turn", default="on", choices=("on", "off"),
                   help="model and node suites: read the question (and its draft) in the image prefix's own decoder "
                        "pass (the engine's and the node's fuse_first_turn; default: on, as it is)")
    p.add_argument("--keep-freed-memory", default="on", choices=("on", "off"),
                   help="model, train and node suites: keep the memory each frame frees for the next (glibc malloc "
                        "thresholds; pixel_sail_ros.allocator, the node's keep_freed_memory; default: on, as the node "
                        "does; the soak runs the node at its defaults)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the model suite, and the node suite's "
                   "num_threads parameter (default: torch's own choice)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per model entry, or timed optimizer steps per precision in the train suite "
                        "(default: by cost; train 12)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stream length in seconds for the node and soak suites (node default 30, quick 10)")
    p.add_argument("--minutes", type=float, default=None, help="soak length in minutes (default 10)")
    p.add_argument("--transport", default="shm16", choices=("shm16", "default"),
                   help="node/soak suites: shm16 (default) gives Fast DDS a 16 MB shared-memory segment so camera "
                        "frames fit; 'default' keeps Fast DDS's 512 KB one, which loses most 640x480 best-effort frames")
    p.add_argument("--prompt", default=None,
                   help="node suite: the standing prompt (default: the bench frame's one yellow circle, answered with "
                        "a mask; an absent object, e.g. 'red circle', times the 'No target.' path)")
    p.add_argument("--absent-prompt", default=None,
                   help="node suite: the prompt of the shorter second stream, for an object the frame lacks (default: "
                        "'red circle'; its figures go to node.no_target; '' skips it)")
    p.add_argument("--resolution", type=_resolution, default=None, metavar="WxH",
                   help="your camera's size: the node and soak suites stream frames of it (default 640x480), the model "
                        "suite adds an entry at it per preset")
    p.add_argument("--frame-wait-ms", type=float, default=None,
                   help="node suite: the node's frame_wait_ms parameter (default: the node's default)")
    p.add_argument("--output", default=None, help="also write the JSON document to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return p


def _resolution(text: str) -> tuple[int, int]:
    """'1280x720' → (1280, 720)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1280x720") from None
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise argparse.ArgumentTypeError(f"{text!r}: each side must be 16 to 8192 pixels")
    return width, height


def _presets(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in PRESETS]
    if bad or not names:
        raise ValueError(f"--presets: unknown preset(s) {bad}; choose from {', '.join(PRESETS)}")
    return names


def _meta(args: argparse.Namespace, started: float) -> dict[str, Any]:
    from pixel_sail_ros import __version__

    from .stats import machine_info

    extra: dict[str, Any] = {}
    if args.suite in ("model", "all", "train"):
        import torch

        extra["torch"] = torch.__version__
        extra["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            extra["gpu"] = torch.cuda.get_device_name(0)
    return {
        "tool": "pixel-sail-bench",
        "version": __version__,
        "suite": args.suite,
        "quick": bool(args.quick),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - started, 1),
        "machine": machine_info(extra),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON document for the chosen suite (without the metadata)."""
    doc: dict[str, Any] = {}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.keep_freed_memory == "on" and args.suite in ("model", "all", "train"):
        from pixel_sail_ros.allocator import keep_freed_memory

        why_not = keep_freed_memory()
        if why_not:
            logging.getLogger("pixel_sail_bench").warning("--keep-freed-memory on: not applied (%s)", why_not)
    if args.suite in ("model", "all"):
        from . import model_bench

        doc["model"] = model_bench.run(presets=_presets(args.presets), model_path=args.model_path,
                                       device=args.device, dtype=args.dtype, quick=args.quick, repeats=args.repeats,
                                       decoding=args.decoding, speculative=args.speculative == "on",
                                       compile_image=args.compile_image == "on",
                                       fuse=args.fuse_first_turn == "on", resolution=args.resolution)
    if args.suite == "train":
        from . import train_bench

        doc["train"] = train_bench.run(model_path=args.model_path, device=args.device, quick=args.quick,
                                       steps=args.repeats)
    if args.suite in ("node", "all", "soak"):
        from pixel_sail_ros.ros import transport

        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # bench traffic stays on this host
        transport_kind = transport.configure(args.transport)
        size = dict(zip(("width", "height"), args.resolution)) if args.resolution else {}  # the camera's, if given
    if args.suite in ("node", "all"):
        from pixel_sail_ros.ros.bench import node_bench

        seconds = args.seconds if args.seconds is not None else (10.0 if args.quick else 30.0)
        prompts = {"prompt": args.prompt} if args.prompt else {}
        if args.absent_prompt is not None:
            prompts["absent_prompt"] = args.absent_prompt or None  # '' skips the second stream
        doc["node"] = node_bench.run(model_path=args.model_path, device=args.device, dtype=args.dtype,
                                     seconds=seconds, quick=args.quick, frame_wait_ms=args.frame_wait_ms,
                                     speculative=args.speculative == "on", compile_image=args.compile_image == "on",
                                     fuse_first_turn=args.fuse_first_turn == "on", num_threads=args.threads or 0,
                                     keep_freed_memory=args.keep_freed_memory == "on",
                                     **size, **prompts)
        doc["node"]["transport"] = transport_kind
    if args.suite == "soak":
        from pixel_sail_ros.ros.bench import soak

        if args.seconds is not None:
            seconds = args.seconds
        else:
            seconds = 60.0 * (args.minutes if args.minutes is not None else (0.5 if args.quick else 10.0))
        doc["soak"] = soak.run(model_path=args.model_path, device=args.device, dtype=args.dtype, seconds=seconds,
                               **size)
        doc["soak"]["transport"] = transport_kind
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a benchmark never downloads anything
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.monotonic()
    try:
        if args.suite in ("model", "all"):
            _presets(args.presets)
        for name in ("seconds", "minutes"):
            value = getattr(args, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name} must be positive, got {value}")
        doc = run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        logging.getLogger("pixel_sail_bench").error("%s", exc)
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "suite": args.suite}))
        return 2
    out = {**_meta(args, started), **doc}
    text = json.dumps(out, indent=2, allow_nan=False)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    soak_doc = doc.get("soak")
    return 1 if soak_doc is not None and not soak_doc.get("passed", False) else 0


__all__ = ["build_parser", "main", "run"]
