"""The newest frame wins and nothing a user sent is lost without being counted."""

from __future__ import annotations

import threading
import time

import numpy as np

from hypothesis import given, settings
from hypothesis import strategies as st

from pixel_sail_ros.ros.scheduling import (ClickRequest, Frame, LatestSlot, RollingStats, SequenceGaps, ServiceCall,
                                          StampedBuffer, WorkQueue)


def _frame(i: int) -> Frame:
    return Frame(rgb=np.full((2, 2, 3), i, np.uint8), header=i)


def test_latest_slot_keeps_newest_and_counts_replaced() -> None:
    slot: LatestSlot[int] = LatestSlot()
    assert slot.take() is None
    for i in range(5):
        slot.put(i)
    assert slot.take() == 4 and slot.dropped == 4 and slot.received == 5
    assert slot.take() is None and slot.peek() == 4
    slot.put(9)
    assert slot.take() == 9 and slot.dropped == 4


def test_frames_without_prompt_are_idle_not_dropped() -> None:
    q = WorkQueue()
    for i in range(3):
        q.put_frame(_frame(i))
    assert q.frames.dropped == 0 and q.next_job(timeout=0.01) is None
    q.set_prompt_active(True)
    job = q.next_job(timeout=0.01)
    assert isinstance(job, Frame) and job.header == 2
    q.put_frame(_frame(3))
    q.put_frame(_frame(4))
    assert q.frames.dropped == 1 and q.next_job(timeout=0.01).header == 4


def test_clicks_go_first_and_overflow_is_counted() -> None:
    q = WorkQueue(max_clicks=2)
    q.set_prompt_active(True)
    q.put_frame(_frame(1))
    assert q.put_click(ClickRequest(1, 1, _frame(1))) and q.put_click(ClickRequest(2, 2, _frame(1)))
    assert not q.put_click(ClickRequest(3, 3, _frame(1))) and q.clicks_rejected == 1
    assert isinstance(q.next_job(0.01), ClickRequest) and q.next_job(0.01).x == 2
    assert isinstance(q.next_job(0.01), Frame)


def _call(i: int) -> ServiceCall:
    return ServiceCall(_frame(i), f"call {i}", [], [], False, future=None)


def test_service_calls_go_before_clicks_and_frames_in_order_and_overflow_is_counted() -> None:
    q = WorkQueue(max_calls=2)
    q.set_prompt_active(True)
    q.put_frame(_frame(1))
    assert q.put_click(ClickRequest(1, 1, _frame(1)))
    assert q.put_call(_call(1)) and q.put_call(_call(2))
    assert not q.put_call(_call(3)) and q.calls_rejected == 1 and q.clicks_rejected == 0
    assert [q.next_job(0.01).text for _ in range(2)] == ["call 1", "call 2"]
    assert isinstance(q.next_job(0.01), ClickRequest)
    assert isinstance(q.next_job(0.01), Frame)


def test_drain_calls_hands_back_what_the_worker_never_took() -> None:
    q = WorkQueue()
    for i in range(3):
        q.put_call(_call(i))
    assert q.next_job(0.01).text == "call 0"
    q.stop()
    assert [c.text for c in q.drain_calls()] == ["call 1", "call 2"] and not q.drain_calls()


def test_worker_wakes_on_frame_and_stops() -> None:
    q = WorkQueue()
    q.set_prompt_active(True)
    got: list = []
    t = threading.Thread(target=lambda: got.append(q.next_job()))
    t.start()
    time.sleep(0.05)
    q.put_frame(_frame(7))
    t.join(2)
    assert got and got[0].header == 7
    t = threading.Thread(target=lambda: got.append(q.next_job()))
    t.start()
    q.stop()
    t.join(2)
    assert not t.is_alive() and got[-1] is None


def test_stamped_buffer_pairs_within_tolerance_only() -> None:
    b: StampedBuffer[str] = StampedBuffer(size=3)
    for s, v in [(1.00, "a"), (1.05, "b"), (1.10, "c"), (1.15, "d")]:
        b.put(s, v)
    assert len(b) == 3
    assert b.closest(1.06, 0.02) == "b"
    assert b.closest(1.00, 0.02) is None  # "a" fell out of the window
    assert b.closest(1.30, 0.1) is None
    zero: StampedBuffer[str] = StampedBuffer(size=3)
    for v in "abc":
        zero.put(0.0, v)  # a camera that stamps every frame 0: the newest, not the oldest
    assert zero.closest(0.0, 0.02) == "c"


def test_rolling_stats() -> None:
    r = RollingStats(size=100)
    assert np.isnan(r.percentile(50)) and r.rate_hz() == 0.0
    for i in range(11):
        r.add(float(i), now=i * 0.1)
    assert r.percentile(50) == 5.0 and abs(r.rate_hz() - 10.0) < 1e-9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.integers(1, 40)), max_size=120),
       st.randoms(use_true_random=False))
def test_sequence_gaps_count_exactly_the_unseen_messages(sent: list, rnd) -> None:
    """Each publisher sends 1..n; the subscription sees a random in-order subset of each stream. What is lost
    between the first and the last message it saw, per publisher, is exactly what is counted."""
    streams = {pub: n for pub, n in sent}
    received = {pub: sorted(rnd.sample(range(1, n + 1), rnd.randint(0, n))) for pub, n in streams.items()}
    order = [(pub, seq) for pub, seqs in received.items() for seq in seqs]
    rnd.shuffle(order)  # interleave publishers, but keep each one's own order
    per_pub = {pub: iter(seqs) for pub, seqs in received.items()}
    gaps = SequenceGaps()
    for pub, _ in order:
        gaps.observe(pub, next(per_pub[pub]))
    expected = sum(s[-1] - s[0] + 1 - len(s) for s in received.values() if s)
    assert gaps.lost == expected


def test_sequence_gaps_restart_unsupported_and_reset() -> None:
    gaps = SequenceGaps(max_publishers=2)
    assert gaps.observe(b"p", 5) == 0  # before the first message received: not attributable, not counted
    assert gaps.observe(b"p", 9) == 3
    assert gaps.observe(b"p", 2) == 0  # publisher restarted: a new count
    assert gaps.observe(b"p", 4) == 1
    assert gaps.lost == 4 and gaps.supported is True
    gaps.reset_streams()  # unsubscribed meanwhile: what was sent then is not a transport loss
    assert gaps.observe(b"p", 50) == 0 and gaps.lost == 4
    gaps.observe(b"q", 1)
    gaps.observe(b"r", 1)  # bounded memory: p, heard from least recently, is forgotten
    assert gaps.observe(b"p", 60) == 0
    none = SequenceGaps()
    assert none.observe(None, None) == 0 and none.observe(b"p", 0) == 0
    assert none.lost == 0 and none.supported is False


def _camera(q: WorkQueue, period: float, last_age: float) -> Frame:
    """Frames every ``period`` s so far, the newest received ``last_age`` s ago; returns the newest."""
    now = time.monotonic()
    frames = [Frame(rgb=np.zeros((2, 2, 3), np.uint8), header=k, received=now - last_age - (3 - k) * period)
              for k in range(4)]
    for f in frames:
        q.put_frame(f)
    return frames[-1]


def _waiting_queue(frame_wait: float) -> WorkQueue:
    q = WorkQueue()
    q.frame_wait = frame_wait
    q.set_prompt_active(True)
    return q


def test_a_stale_frame_waits_for_the_next_one_due_soon() -> None:
    q = _waiting_queue(0.2)
    _camera(q, period=0.1, last_age=0.07)  # older than half a period; the next is due in ~0.03-0.05 s
    assert q.camera_period() is not None and abs(q.camera_period() - 0.1) < 1e-6
    timer = threading.Timer(0.02, q.put_frame, args=(Frame(rgb=np.zeros((2, 2, 3), np.uint8), header="next"),))
    timer.start()
    start = time.monotonic()
    job = q.next_job(timeout=1.0)
    assert isinstance(job, Frame) and job.header == "next"
    assert time.monotonic() - start >= 0.015
    assert q.frames.dropped == 3 + 1  # the three older ones, and the stale one the worker did not start on


def test_a_service_call_ends_the_wait_for_the_next_frame() -> None:
    q = _waiting_queue(2.0)
    _camera(q, period=1.0, last_age=0.7)  # the worker would wait ~0.5 s for the next frame
    threading.Timer(0.01, q.put_call, args=(_call(5),)).start()
    start = time.monotonic()
    job = q.next_job(timeout=3.0)
    assert isinstance(job, ServiceCall) and job.text == "call 5"
    assert time.monotonic() - start < 0.4, "the call waited for the frame"


def test_a_stale_frame_is_taken_once_its_successor_is_overdue() -> None:
    q = _waiting_queue(0.2)
    newest = _camera(q, period=0.1, last_age=0.07)
    start = time.monotonic()
    job = q.next_job(timeout=1.0)  # the camera stopped: wait until 1.2 periods after the newest, no longer
    waited = time.monotonic() - start
    assert job is newest and 0.03 <= waited < 0.3


def test_no_wait_for_a_young_frame_a_distant_successor_or_when_off() -> None:
    for frame_wait, last_age, period in ((0.2, 0.02, 0.1),   # younger than half a period
                                         (0.01, 0.06, 0.1),  # next one due later than frame_wait from now
                                         (0.0, 0.07, 0.1),   # waiting switched off
                                         (0.2, 0.5, 0.1)):   # long overdue (the camera stalled)
        q = _waiting_queue(frame_wait)
        newest = _camera(q, period, last_age)
        start = time.monotonic()
        assert q.next_job(timeout=1.0) is newest
        assert time.monotonic() - start < 0.01, (frame_wait, last_age, period)


def test_a_click_during_the_wait_goes_first() -> None:
    q = _waiting_queue(0.5)
    newest = _camera(q, period=0.4, last_age=0.3)  # the next frame is due in ~0.18 s
    click = ClickRequest(1.0, 2.0, newest)
    threading.Timer(0.02, q.put_click, args=(click,)).start()
    start = time.monotonic()
    assert q.next_job(timeout=1.0) is click
    assert time.monotonic() - start < 0.15
    assert q.next_job(timeout=1.0) is newest  # still waiting out its successor's due time, then taken
