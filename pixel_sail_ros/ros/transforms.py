"""A small TF buffer: rigid transforms between frames, looked up at a stamp (numpy only, no rclpy).

The registry wheels have no ``tf2_ros`` (docs/ros_wheels_recipe.md), so the node keeps its own buffer of what
arrives on ``/tf`` and ``/tf_static``. It follows tf2's rules where a grasp pipeline depends on them:

- a lookup is *at the image's stamp*: translation interpolated linearly, rotation by slerp, between the two
  transforms around it; never extrapolated (an arm-mounted camera moves during a grasp, so the latest
  transform is the wrong one);
- stamp 0 means "latest": the newest time that every moving link on the path has reached (tf2's latest
  common time), so the links of one lookup are never from different moments;
- static transforms hold at every time; dynamic ones are kept for ``cache_s`` seconds;
- every failure is a :class:`TransformError` whose message says which frames, which time, and what is known.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["RigidTransform", "TransformBuffer", "TransformError", "quaternion_matrix", "slerp"]

_MAX_DEPTH = 256  # a longer parent chain than this is a cycle


class TransformError(LookupError):
    """A transform that cannot be given; the message names the frames, the time and the reason."""


def _unit_quaternion(xyzw: Sequence[float]) -> np.ndarray:
    q = np.asarray(xyzw, dtype=np.float64).reshape(-1)
    if q.shape != (4,) or not np.isfinite(q).all():
        raise ValueError(f"a rotation needs 4 finite quaternion values (x, y, z, w), got {list(q)}")
    norm = float(np.linalg.norm(q))
    if norm < 1e-6:
        raise ValueError("a rotation quaternion of length 0 is not a rotation")
    return q / norm


def _translation(xyz: Sequence[float]) -> np.ndarray:
    t = np.asarray(xyz, dtype=np.float64).reshape(-1)
    if t.shape != (3,) or not np.isfinite(t).all():
        raise ValueError(f"a translation needs 3 finite values, got {list(t)}")
    return t


def quaternion_matrix(xyzw: Sequence[float]) -> np.ndarray:
    """The 3x3 rotation matrix of a quaternion (x, y, z, w), normalised first."""
    x, y, z, w = _unit_quaternion(xyzw)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def slerp(q0: np.ndarray, q1: np.ndarray, fraction: float) -> np.ndarray:
    """Spherical interpolation between unit quaternions, along the shorter arc."""
    dot = float(np.dot(q0, q1))
    if dot < 0.0:  # q and -q are the same rotation: take the short way round
        q1, dot = -q1, -dot
    if dot > 0.9995:  # nearly equal: linear interpolation is exact to float precision and avoids 0/0
        q = q0 + fraction * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = np.arccos(min(dot, 1.0))
    return (np.sin((1 - fraction) * theta) * q0 + np.sin(fraction * theta) * q1) / np.sin(theta)


@dataclass(frozen=True)
class RigidTransform:
    """x_parent = rotation @ x_child + translation (the transform of a child frame in its parent)."""

    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,)

    @classmethod
    def identity(cls) -> "RigidTransform":
        return cls(np.eye(3), np.zeros(3))

    @classmethod
    def from_quaternion(cls, translation: Sequence[float], xyzw: Sequence[float]) -> "RigidTransform":
        return cls(quaternion_matrix(xyzw), _translation(translation))

    def __matmul__(self, other: "RigidTransform") -> "RigidTransform":
        """self ∘ other: apply ``other`` first."""
        return RigidTransform(self.rotation @ other.rotation, self.rotation @ other.translation + self.translation)

    def inverse(self) -> "RigidTransform":
        r_t = self.rotation.T
        return RigidTransform(r_t, -r_t @ self.translation)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) points (or one (3,) point) moved into the parent frame, in the input's float dtype."""
        p = np.asarray(points)
        dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64
        out = p.astype(np.float64) @ self.rotation.T + self.translation
        return out.astype(dtype, copy=False)


@dataclass(frozen=True)
class _Sample:
    stamp: float
    translation: np.ndarray
    rotation: np.ndarray  # unit quaternion xyzw


class _Link:
    """One child frame's transforms in its parent over time (sorted by stamp)."""

    def __init__(self, parent: str) -> None:
        self.parent = parent
        self.stamps: list[float] = []
        self.samples: list[_Sample] = []

    def insert(self, sample: _Sample, cache_s: float) -> None:
        i = bisect.bisect_left(self.stamps, sample.stamp)
        if i < len(self.stamps) and self.stamps[i] == sample.stamp:
            self.samples[i] = sample  # a re-sent stamp replaces the old value
        else:
            self.stamps.insert(i, sample.stamp)
            self.samples.insert(i, sample)
        cut = bisect.bisect_left(self.stamps, self.stamps[-1] - cache_s)
        if cut:
            del self.stamps[:cut], self.samples[:cut]

    def at(self, stamp: float, child: str) -> RigidTransform:
        first, last = self.stamps[0], self.stamps[-1]
        if stamp > last or stamp < first:
            when = "into the future" if stamp > last else "into the past"
            raise TransformError(
                f"lookup of '{self.parent}' -> '{child}' at {stamp:.6f} would extrapolate {when}: the buffer holds "
                f"{first:.6f} .. {last:.6f} ({len(self.stamps)} transforms)")
        i = bisect.bisect_left(self.stamps, stamp)
        if self.stamps[i] == stamp:
            s = self.samples[i]
            return RigidTransform.from_quaternion(s.translation, s.rotation)
        a, b = self.samples[i - 1], self.samples[i]
        f = (stamp - a.stamp) / (b.stamp - a.stamp)
        return RigidTransform.from_quaternion(a.translation + f * (b.translation - a.translation),
                                              slerp(a.rotation, b.rotation, f))


class TransformBuffer:
    """Thread-safe store of a TF tree: ``add`` from the /tf callbacks, ``lookup``/``wait_for`` from a worker."""

    def __init__(self, cache_s: float = 10.0) -> None:
        if not cache_s > 0:
            raise ValueError(f"cache_s must be > 0, got {cache_s}")
        self.cache_s = float(cache_s)
        self._static: dict[str, tuple[str, RigidTransform]] = {}
        self._dynamic: dict[str, _Link] = {}
        self._changed = threading.Condition()

    def add(self, parent: str, child: str, stamp: float, translation: Sequence[float], rotation_xyzw: Sequence[float],
            static: bool = False) -> None:
        """Store the transform of ``child`` in ``parent`` at ``stamp`` (seconds); raises ValueError if malformed."""
        parent, child = parent.lstrip("/"), child.lstrip("/")
        if not parent or not child:
            raise ValueError(f"a transform needs a parent and a child frame, got {parent!r} -> {child!r}")
        if parent == child:
            raise ValueError(f"frame {child!r} cannot be its own parent")
        q, t = _unit_quaternion(rotation_xyzw), _translation(translation)
        with self._changed:
            if static:
                self._static[child] = (parent, RigidTransform.from_quaternion(t, q))
                self._dynamic.pop(child, None)
            else:
                link = self._dynamic.get(child)
                if link is None or link.parent != parent:  # a re-parented frame starts a new history
                    link = self._dynamic[child] = _Link(parent)
                link.insert(_Sample(float(stamp), t, q), self.cache_s)
                self._static.pop(child, None)
            self._changed.notify_all()

    def frames(self) -> set[str]:
        """Every frame named so far, as child or parent."""
        with self._changed:
            return self._known()

    def lookup(self, target: str, source: str, stamp: float) -> RigidTransform:
        """The transform taking points in ``source`` to ``target`` at ``stamp`` (0 = newest); TransformError if not."""
        target, source = target.lstrip("/"), source.lstrip("/")
        with self._changed:
            return self._lookup(target, source, float(stamp))

    def wait_for(self, target: str, source: str, stamp: float, timeout_s: float) -> RigidTransform:
        """:meth:`lookup`, waiting up to ``timeout_s`` for transforms still on their way; the last error if none."""
        target, source = target.lstrip("/"), source.lstrip("/")
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._changed:
            while True:
                try:
                    return self._lookup(target, source, float(stamp))
                except TransformError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    self._changed.wait(left)

    # ---- under the lock ----------------------------------------------------------------------------------

    def _known(self) -> set[str]:
        parents = {p for p, _ in self._static.values()} | {link.parent for link in self._dynamic.values()}
        return set(self._static) | set(self._dynamic) | parents

    def _parent(self, frame: str) -> str | None:
        if frame in self._static:
            return self._static[frame][0]
        link = self._dynamic.get(frame)
        return link.parent if link is not None else None

    def _chain(self, frame: str) -> list[str]:
        """``frame`` and its ancestors up to the root of its tree."""
        chain = [frame]
        while (parent := self._parent(chain[-1])) is not None:
            if parent in chain or len(chain) > _MAX_DEPTH:
                raise TransformError(f"the TF tree has a cycle through '{parent}'")
            chain.append(parent)
        return chain

    def _to_ancestor(self, chain: list[str], stamp: float) -> RigidTransform:
        """Transform from chain[0] into chain[-1], composing each link at ``stamp``."""
        out = RigidTransform.identity()
        for child in chain[:-1]:
            if child in self._static:
                link = self._static[child][1]
            else:
                link = self._dynamic[child].at(stamp, child)
            out = link @ out
        return out

    def _lookup(self, target: str, source: str, stamp: float) -> RigidTransform:
        if target == source:
            return RigidTransform.identity()
        known = self._known()
        for name in (target, source):
            if name not in known:
                raise TransformError(f"frame '{name}' does not exist in the TF tree; known frames: "
                                     f"{', '.join(sorted(known)) or 'none (nothing on /tf or /tf_static yet)'}")
        up_source, up_target = self._chain(source), self._chain(target)
        common = next((f for f in up_source if f in set(up_target)), None)
        if common is None:
            raise TransformError(f"'{target}' and '{source}' are in different TF trees (roots '{up_target[-1]}' "
                                 f"and '{up_source[-1]}'): nothing connects them")
        source_chain = up_source[: up_source.index(common) + 1]
        target_chain = up_target[: up_target.index(common) + 1]
        if stamp == 0.0:  # "latest" = the newest time every moving link on the path has reached, as in tf2
            newest = [self._dynamic[f].stamps[-1] for f in source_chain[:-1] + target_chain[:-1] if f in self._dynamic]
            stamp = min(newest, default=0.0)
        return self._to_ancestor(target_chain, stamp).inverse() @ self._to_ancestor(source_chain, stamp)
