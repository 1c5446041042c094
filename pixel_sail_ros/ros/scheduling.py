"""Latest-frame buffering and request scheduling for the node, free of rclpy so it is unit-testable.

Why a single slot: a perception node must never build a queue behind a slow model. Camera callbacks only
replace the newest frame; one worker thread takes whatever is newest when it is free. Every frame that is
replaced before the worker saw it is counted as dropped, so users can see it in diagnostics.

Why the worker may wait a moment: when it frees up, the newest frame is on average half a camera period old
(17 ms at 30 Hz), and that age is part of every result's latency. If that frame is already older than half
a period and the next one is due within ``frame_wait`` seconds, starting on the next one gives a result
about a period fresher for a wait of less than half a period. Opt-in (the node's ``frame_wait_ms``): it trades
some output rate for fresher results, which paid in some measured runs of models as slow as the camera or slower
and not in others (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, TypeVar, Union

import numpy as np

T = TypeVar("T")


def _hand_over() -> None:
    """Let the woken worker start now: release the GIL for a moment after queuing work.

    Why: the thread that queues work is the executor's, and after the callback it runs rclpy's Python spin loop
    until it next blocks in ``rcl_wait``; until then the worker, woken but without the GIL, waits. On the 2-vCPU
    VM that was ~0.5 ms of every frame's latency (the node's ``queue_wait_ms_p50``); yielding here made it ~0.15 ms.
    """
    time.sleep(0)


@dataclass
class Frame:
    """One camera frame as the worker needs it: pixels plus the header it must be published with."""

    rgb: np.ndarray
    header: Any
    received: float = field(default_factory=time.monotonic)
    depth: Optional[np.ndarray] = None  # paired on arrival (metres), so a busy worker never finds it evicted


@dataclass
class ClickRequest:
    """A click to answer on the frame that was newest when the click arrived."""

    x: float
    y: float
    frame: Frame


@dataclass
class ServiceCall:
    """A ``segment`` service request, run by the worker like everything else that touches the model.

    ``future`` is what the service's coroutine awaits (an rclpy Future; here only its ``set_result`` is used): the
    worker sets it to ``(result, None)`` or ``(None, error message)``, so the executor thread never runs the model.
    """

    frame: Frame
    text: str
    points: list
    boxes: list
    describe: bool
    future: Any


Job = Union[ServiceCall, ClickRequest, Frame]


class LatestSlot(Generic[T]):
    """Holds at most one item; put() replaces it. Counts items replaced before anyone took them."""

    def __init__(self) -> None:
        self._item: Optional[T] = None
        self._fresh = False
        self.dropped = 0
        self.received = 0

    def put(self, item: T, count_drop: bool = True) -> None:
        if self._fresh and count_drop:
            self.dropped += 1
        self._item = item
        self._fresh = True
        self.received += 1

    def take(self) -> Optional[T]:
        """The newest item if it was not taken yet, else None."""
        if not self._fresh:
            return None
        self._fresh = False
        return self._item

    def peek(self) -> Optional[T]:
        """The newest item, taken or not (e.g. the frame a click or a service call applies to)."""
        return self._item

    def has_fresh(self) -> bool:
        return self._fresh

    def clear(self) -> None:
        self._item = None
        self._fresh = False


class WorkQueue:
    """What the single inference worker waits on: service calls, clicks, and the newest frame for the standing prompt.

    Service calls and clicks are user commands, so they are never replaced silently: they queue (service calls
    first: a client is blocked on each) up to ``max_calls`` / ``max_clicks``, and an overflow is counted and
    reported. Frames for the standing prompt only ever keep the newest one.
    """

    def __init__(self, max_clicks: int = 8, max_calls: int = 16) -> None:
        self._cond = threading.Condition()
        self.frames: LatestSlot[Frame] = LatestSlot()
        self.clicks: deque[ClickRequest] = deque()
        self.calls: deque[ServiceCall] = deque()
        self.max_clicks = max_clicks
        self.max_calls = max_calls
        self.clicks_rejected = 0
        self.calls_rejected = 0
        self._stopped = False
        self._prompt_active = False
        self.frame_wait = 0.0  # seconds the worker may wait for a frame that is about to arrive; 0 = never
        self._arrivals: deque[float] = deque(maxlen=9)  # receive times of the last frames, for the camera period

    def set_prompt_active(self, active: bool) -> None:
        with self._cond:
            self._prompt_active = active
            self._cond.notify_all()

    def put_frame(self, frame: Frame) -> None:
        """Store the newest frame; a replaced unprocessed frame counts as dropped only while a prompt runs."""
        with self._cond:
            self.frames.put(frame, count_drop=self._prompt_active)
            self._arrivals.append(frame.received)
            self._cond.notify_all()
        _hand_over()

    def swap_for_newer(self, frame: Frame) -> Frame:
        """After a pause (rate limit): the newest fresh frame if one came, counting ``frame`` as dropped."""
        with self._cond:
            newer = self.frames.take()
            if newer is None:
                return frame
            self.frames.dropped += 1
            return newer

    def count_skipped(self) -> None:
        """A frame taken for the prompt that was then not run (the prompt was cleared meanwhile)."""
        with self._cond:
            self.frames.dropped += 1

    def latest_frame(self) -> Optional[Frame]:
        with self._cond:
            return self.frames.peek()

    def put_click(self, click: ClickRequest) -> bool:
        """Queue a click; False (and counted) when the queue is full."""
        if self._enqueue(self.clicks, click, self.max_clicks):
            return True
        self.clicks_rejected += 1  # the executor's thread is the only one that queues user commands
        return False

    def put_call(self, call: ServiceCall) -> bool:
        """Queue a service call; False (and counted) when ``max_calls`` are already waiting."""
        if self._enqueue(self.calls, call, self.max_calls):
            return True
        self.calls_rejected += 1
        return False

    def _enqueue(self, items: deque, item: Any, limit: int) -> bool:
        """Append a user command and wake the worker; False when ``limit`` of them are already waiting."""
        with self._cond:
            if len(items) >= limit:
                return False
            items.append(item)
            self._cond.notify_all()
        _hand_over()
        return True

    def drain_calls(self) -> list[ServiceCall]:
        """Take every waiting service call (to answer them when the worker stops before running them)."""
        with self._cond:
            calls = list(self.calls)
            self.calls.clear()
            return calls

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def restart(self) -> None:
        with self._cond:
            self._stopped = False
            self.frames.clear()
            self.clicks.clear()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def next_job(self, timeout: float | None = None) -> Job | None:
        """Block until there is a service call, a click (in that order) or a fresh frame with an active prompt;
        None on stop/timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._stopped:
                if self.calls:
                    return self.calls.popleft()
                if self.clicks:
                    return self.clicks.popleft()
                if self._prompt_active and self.frames.has_fresh():
                    frame = self.frames.peek()
                    due = self._next_frame_due(frame)
                    if due is None:
                        return self.frames.take()
                    while (not self._stopped and not self.calls and not self.clicks and self.frames.peek() is frame
                           and time.monotonic() < due):
                        self._cond.wait(due - time.monotonic())
                    continue  # a call or click first; else the newer frame, or this one once it is past due
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return None

    def camera_period(self) -> Optional[float]:
        """Median interval between the last frames received (seconds); None until three have come."""
        with self._cond:
            return self._period()

    def _period(self) -> Optional[float]:
        if len(self._arrivals) < 3:
            return None
        return float(np.median(np.diff(np.asarray(self._arrivals))))

    def _next_frame_due(self, frame: Frame) -> Optional[float]:
        """When to stop waiting for the frame after ``frame`` (monotonic time), or None to start on ``frame`` now.

        Wait only if ``frame`` is older than half a camera period and its successor is due (one period after
        it, plus a fifth for jitter) within ``frame_wait`` from now.
        """
        if self.frame_wait <= 0:
            return None
        period = self._period()
        if period is None or period <= 0:
            return None
        now = time.monotonic()
        if now - frame.received < period / 2:
            return None
        due = frame.received + 1.2 * period
        return due if now < due <= now + self.frame_wait else None


class StampedBuffer(Generic[T]):
    """The last few stamped items (e.g. depth images), to pair with a colour frame by time."""

    def __init__(self, size: int = 10) -> None:
        self._items: deque[tuple[float, T]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def put(self, stamp: float, item: T) -> None:
        with self._lock:
            self._items.append((stamp, item))

    def closest(self, stamp: float, tolerance: float) -> Optional[T]:
        """The item whose stamp is nearest to ``stamp`` and within ``tolerance`` seconds (of equals, the newest)."""
        with self._lock:
            best: Optional[tuple[float, T]] = None
            for s, item in self._items:
                d = abs(s - stamp)
                if d <= tolerance and (best is None or d <= best[0]):  # ties: the newest (cameras stamping 0)
                    best = (d, item)
            return None if best is None else best[1]

    def __len__(self) -> int:
        return len(self._items)


class RollingStats:
    """Rolling window of durations, for diagnostics (rate, p50/p95 latency)."""

    def __init__(self, size: int = 200) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._times: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, value: float, now: float | None = None) -> None:
        with self._lock:
            self._values.append(value)
            self._times.append(time.monotonic() if now is None else now)

    def percentile(self, q: float) -> float:
        with self._lock:
            return float(np.percentile(np.asarray(self._values), q)) if self._values else float("nan")

    def rate_hz(self) -> float:
        """Events per second over the window."""
        with self._lock:
            if len(self._times) < 2:
                return 0.0
            span = self._times[-1] - self._times[0]
            return (len(self._times) - 1) / span if span > 0 else 0.0

    def __len__(self) -> int:
        return len(self._values)


class SequenceGaps:
    """Counts messages that a subscription never received, from each publisher's sequence numbers.

    Why: under best-effort QoS a frame the DDS reader overwrote or the network lost never reaches the
    callback, so the newest-frame slot cannot count it. The rmw's message info carries the writer's
    publication sequence number; a jump from n to n+k means k-1 messages from that publisher were lost
    before this node saw them. Messages sent before the first one received (before discovery) are not
    counted; a sequence that goes back means the publisher was restarted and starts a new count.
    """

    def __init__(self, max_publishers: int = 64) -> None:
        self._last: OrderedDict[bytes, int] = OrderedDict()
        self._max = max_publishers
        self._lock = threading.Lock()
        self.lost = 0
        self.supported: Optional[bool] = None  # None until the first message says whether the rmw numbers them

    def observe(self, publisher: Optional[bytes], sequence: Optional[int]) -> int:
        """Record one received message; returns how many from the same publisher were skipped before it."""
        with self._lock:
            if publisher is None or not sequence:  # 0 / None: the rmw does not number its messages
                if self.supported is None:
                    self.supported = False
                return 0
            self.supported = True
            last = self._last.pop(publisher, None)
            self._last[publisher] = sequence
            if len(self._last) > self._max:  # forget the publisher heard from least recently
                self._last.popitem(last=False)
            if last is None or sequence <= last:
                return 0
            gap = sequence - last - 1
            self.lost += gap
            return gap

    def reset_streams(self) -> None:
        """Forget every publisher's position (e.g. while unsubscribed), keeping the total lost so far."""
        with self._lock:
            self._last.clear()
