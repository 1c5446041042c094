"""The node's parameters: one table that the node declares, the YAML/launch tests check and the README lists.

Kept free of rclpy so tests and docs can read it without a ROS context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from pixel_sail_ros import DECODING_MODES, DTYPE_NAMES


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    choices: Optional[Sequence[str]] = None
    min_value: Optional[float] = None
    max_value: Optional[float] = None
    read_only: bool = False  # needs a reconfigure (deactivate → cleanup → configure) to change


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("model_path", "", "Checkpoint directory; empty = the bundled default model (ShapesRef tiny).", read_only=True),
    ParamSpec("device", "auto", "auto | cpu | cuda | cuda:N. auto = CUDA when available, else CPU (logged).", read_only=True),
    ParamSpec("dtype", "auto", "auto | float32 | bfloat16 | float16. auto = bf16 on CUDA (fp16 without bf16), fp32 on CPU.",
              choices=DTYPE_NAMES, read_only=True),
    ParamSpec("decoding", "auto", "How answers decode: auto (= dynamic) | dynamic | static | compiled | graphs. "
              "compiled runs each decoded token through torch.compile over a fixed-size KV cache (compiled by the "
              "warm-up at configure, else by the first frames); graphs replays it from a CUDA graph (CUDA only; "
              "not yet measured, README Performance).", choices=DECODING_MODES, read_only=True),
    ParamSpec("compile_image", False, "Run the image prefix and the pixel decoder through torch.compile: ~5 ms less "
              "per frame for the bundled model at 640x480 on a 2-core CPU (README Performance). The warm-up's image "
              "size compiles at configure (warmup_width/height), any other size on its first frame (tens of seconds on "
              "a small CPU; frames meanwhile are dropped and counted). "
              "On the CPU it needs a C++ compiler: without one the first request logs why and the node runs eagerly.",
              read_only=True),
    ParamSpec("speculative_decoding", True, "Draft each answer from the same question's previous answer (a standing "
              "prompt asks the same thing every frame) and verify the draft in one decoder pass. The answers are the "
              "greedy ones either way; false = one decoder pass per answer token."),
    ParamSpec("fuse_first_turn", True, "Read each request's first question (and its draft) in the same decoder pass "
              "as the image, so a standing prompt's answer needs no decoder pass of its own (~5-13 ms less per frame "
              "for the bundled model on a 2-core CPU, README Performance). The answers are the same either way; "
              "false = a separate pass after the image."),
    ParamSpec("keep_freed_memory", True, "Keep the memory each frame frees for the next frame instead of handing it "
              "back to the OS (glibc's mmap and trim thresholds, process-wide): no page faults per frame, ~1-4 ms less "
              "per answer with a mask for the bundled model on a 2-core CPU (README Performance). RSS stays at its peak; "
              "a no-op, logged, without glibc.", read_only=True),
    ParamSpec("warmup_width", 640, "Width of the synthetic frame the model answers at configure (a phrase, a click), "
              "so the first camera frame of that size pays no start-up: kernel choices, CUDA libraries, and with "
              "compile_image or decoding compiled/graphs the compilation or capture. Set it and warmup_height to "
              "your camera's size; 0 = no warm-up.", min_value=0, max_value=8192, read_only=True),
    ParamSpec("warmup_height", 480, "Height of the warm-up frame (see warmup_width); 0 = no warm-up.",
              min_value=0, max_value=8192, read_only=True),
    ParamSpec("num_threads", 0, "CPU threads for the model (torch intra-op); 0 = torch's default. On a loaded CPU, "
              "fewer threads than cores avoids oversubscription.", min_value=0, max_value=1024, read_only=True),
    ParamSpec("mask_threshold", 0.5, "Sigmoid threshold that turns mask logits into a binary mask.", min_value=0.0, max_value=1.0),
    ParamSpec("max_rate_hz", 0.0, "Upper bound on continuous-prompt inferences per second; 0 = as fast as the model runs.",
              min_value=0.0, max_value=1000.0),
    ParamSpec("frame_wait_ms", 0.0, "When the worker frees up and the newest frame is already older than half the "
              "camera period, wait up to this long for the next one: fresher results for a model as slow as the camera "
              "or slower, at some output rate (README, Performance). 0 = off: start on the newest frame at once.",
              min_value=0.0, max_value=1000.0),
    ParamSpec("max_frame_age_s", 1.0, "A click, or a segment call without its own image, uses the latest camera frame "
              "only if it arrived less than this long ago; older = a clear error (has the camera stopped?). 0 = any age.",
              min_value=0.0, max_value=3600.0),
    ParamSpec("max_new_tokens", 32, "Longest generated answer or description, in tokens.", min_value=1, max_value=1024),
    ParamSpec("max_prompt_chars", 256, "Longer text prompts are rejected with an error.", min_value=1, max_value=100000),
    ParamSpec("max_image_pixels", 4096 * 4096, "Larger images are rejected with an error.", min_value=1, max_value=1 << 30),
    ParamSpec("use_compressed", False, "Subscribe to image/compressed (sensor_msgs/CompressedImage) instead of image.", read_only=True),
    ParamSpec("use_depth", False, "Subscribe to depth + camera_info (aligned to image) and publish 3D outputs.", read_only=True),
    ParamSpec("depth_tolerance_s", 0.02, "Largest |stamp difference| between a colour frame and its depth frame.",
              min_value=0.0, max_value=1.0),
    ParamSpec("target_frame", "", "Frame for markers and object_cloud (e.g. base_link), from /tf and /tf_static at the "
              "image's stamp; empty = the image's own (optical) frame. SegmentedObject.position stays in the image's frame.",
              read_only=True),
    ParamSpec("tf_timeout_s", 0.1, "How long a result waits for /tf to reach the image's stamp before its markers and "
              "cloud are skipped (counted as an error).", min_value=0.0, max_value=10.0),
    ParamSpec("min_depth_points", 20, "Fewest valid depth pixels under a mask for a 3D position.", min_value=1, max_value=1 << 20),
    ParamSpec("image_qos", "sensor_data", "sensor_data (best effort, newest only) | reliable. Must match the camera driver.",
              choices=("sensor_data", "reliable"), read_only=True),
    ParamSpec("describe_clicks", True, "Also generate a description for every click."),
    ParamSpec("publish_cloud", True, "Publish object_cloud (PointCloud2 of the masked depth points) when depth is on."),
    ParamSpec("diagnostics_period_s", 1.0, "Period of /diagnostics updates.", min_value=0.1, max_value=60.0, read_only=True),
    ParamSpec("autostart", True, "Configure and activate on start (like a plain node); false = wait for lifecycle commands.",
              read_only=True),
)

BY_NAME = {p.name: p for p in PARAMETERS}
