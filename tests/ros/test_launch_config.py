"""Launch files and the YAML only set parameters the nodes declare, with the node's own defaults.

There is no `launch` package in the wheels, so the launch files are read as Python source (ast): every
`Node(...)` of this package is checked for its parameter names, remaps and executable.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pixel_sail_ros.ros.parameters import BY_NAME, PARAMETERS

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))
NODE_TOPICS_IN = {"image", "image/compressed", "prompt", "click", "depth", "camera_info"}


def _declared_by_camera() -> set[str]:
    tree = ast.parse((ROOT / "pixel_sail_ros/ros/synthetic_camera.py").read_text())
    return {
        c.args[0].value for c in ast.walk(tree)
        if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == "declare_parameter"
    }


def _nodes(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [c for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "Node"]


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _launch_arg_defaults(path: Path) -> dict[str, str]:
    tree = ast.parse(path.read_text())
    out = {}
    for c in ast.walk(tree):
        if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "DeclareLaunchArgument":
            default = _kw(c, "default_value")
            if isinstance(default, ast.Constant):
                out[c.args[0].value] = default.value
    return out


def test_yaml_sets_every_declared_parameter_with_its_default() -> None:
    doc = yaml.safe_load((ROOT / "config/pixel_sail.yaml").read_text())
    params = doc["/**"]["ros__parameters"]
    assert set(params) == set(BY_NAME), f"YAML vs declared: {set(params) ^ set(BY_NAME)}"
    for spec in PARAMETERS:
        assert params[spec.name] == spec.default, f"{spec.name}: YAML {params[spec.name]!r} != node default {spec.default!r}"
        assert type(params[spec.name]) is type(spec.default), f"{spec.name}: YAML type differs from the declared type"


def test_every_parameter_has_a_description_and_valid_default() -> None:
    for spec in PARAMETERS:
        assert len(spec.description) > 15, spec.name
        if spec.choices:
            assert spec.default in spec.choices
        if spec.min_value is not None:
            assert spec.min_value <= spec.default <= spec.max_value, spec.name


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_files_set_only_declared_parameters(path: Path) -> None:
    nodes = [n for n in _nodes(path) if isinstance(_kw(n, "package"), ast.Constant) and _kw(n, "package").value == "pixel_sail_ros"]
    assert nodes, f"{path.name} starts no pixel_sail_ros node"
    camera_params = _declared_by_camera()
    for n in nodes:
        exe = _kw(n, "executable").value
        declared = set(BY_NAME) if exe == "pixel_sail_node" else camera_params if exe == "synthetic_camera_node" else None
        assert declared is not None, f"unknown executable {exe}"
        assert (ROOT / "scripts" / exe).exists(), f"{exe} is not an installed script"
        params = _kw(n, "parameters")
        keys = [k.value for d in ast.walk(params) if isinstance(d, ast.Dict) for k in d.keys] if params is not None else []
        undeclared = set(keys) - declared
        assert not undeclared, f"{path.name}: {exe} does not declare {undeclared}"
        remaps = _kw(n, "remappings")
        if remaps is not None:
            sources = {t.elts[0].value for t in remaps.elts}
            assert sources <= NODE_TOPICS_IN, f"{path.name}: remaps topics the node does not subscribe to: {sources - NODE_TOPICS_IN}"


def test_launch_argument_defaults_match_node_defaults() -> None:
    defaults = _launch_arg_defaults(ROOT / "launch/pixel_sail.launch.py")
    for name in ("model_path", "device", "dtype", "image_qos", "use_depth", "use_compressed", "target_frame"):
        node_default = BY_NAME[name].default
        expected = str(node_default).lower() if isinstance(node_default, bool) else node_default
        assert defaults[name] == expected, f"launch default of {name} {defaults[name]!r} != node default {node_default!r}"
    for required in ("namespace", "model_path", "device", "image", "use_depth", "rviz"):
        assert required in defaults, f"pixel_sail.launch.py lacks the {required} argument"


def test_rviz_config_shows_the_node_outputs() -> None:
    rviz = yaml.safe_load((ROOT / "config/pixel_sail.rviz").read_text())
    topics = {d["Topic"]["Value"] for d in rviz["Visualization Manager"]["Displays"] if "Topic" in d}
    assert {"/pixel_sail/debug_image", "/pixel_sail/markers", "/pixel_sail/object_cloud"} <= topics
