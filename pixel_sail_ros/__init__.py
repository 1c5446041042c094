"""Pixel-SAIL for ROS 2: one decoder-only transformer for text/click-prompted segmentation and description.

This module imports nothing heavy and never rclpy, so ``pip install .`` gives a ROS-free model and training
library. The ROS layer lives in :mod:`pixel_sail_ros.ros`.
"""

from pathlib import Path as _Path
from pkgutil import extend_path

# The generated ROS interfaces (pixel_sail_ros.msg / .srv) are installed by CMake next to a copy of this
# package; extending __path__ lets a source checkout that comes first on PYTHONPATH still find them.
__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"

# The bundled default checkpoint (a plain path, so light tools can find it without importing torch).
BUNDLED_CHECKPOINT = _Path(__file__).resolve().parent / "checkpoints" / "shapesref_tiny"

# The engine's choices, here so the node's parameter table and the bench CLI offer them without importing torch.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
DECODING_MODES = ("auto", "dynamic", "static", "compiled", "graphs")
