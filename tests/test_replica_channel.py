"""The leader-follower channel of a multi-process server on 127.0.0.1: operations and their acknowledgements, the
sampled arrays relayed in the middle of a step (exact, dtypes and shapes kept), a follower out of step or silent
noticed as PeerLostError, the watchdog that fails every request when a step stays stuck in a collective, and a
follower that ends a cancelled request at the cancel, as the leader does."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import pytest

from bdlora_jax import Engine
from bdlora_jax.engine.generator import Request
from bdlora_jax.engine.replica_channel import FollowerChannel, LeaderChannel
from bdlora_jax.engine.replica_ops import Follower, StepWatchdog, arrays_from_message, sampled_message, submit_op
from bdlora_jax.engine.sampler import SamplingParams
from bdlora_jax.engine.scheduler import Scheduler
from bdlora_jax.errors import PeerLostError


@pytest.fixture
def channels():
    """A leader with one connected follower (process 1), 2-second timeouts."""
    leader = LeaderChannel(1, timeout=2.0, host="127.0.0.1")
    connecting = threading.Thread(target=leader.accept)
    connecting.start()
    follower = FollowerChannel("127.0.0.1", leader.port, 1, timeout=2.0)
    connecting.join()
    yield leader, follower
    leader.close()


def test_operations_are_acknowledged_and_sampled_arrays_relayed_exactly(channels):
    leader, follower = channels
    tokens = np.array([3, 0, 31999], np.int32)
    logprobs = np.array([[-0.25, -np.inf], [-1e-8, -3.0]], np.float32)
    leader.broadcast({"op": "step"})
    leader.relay(sampled_message([tokens, logprobs]))
    assert follower.receive() == {"op": "step"}
    got = arrays_from_message(follower.receive_relayed("sampled"))
    assert [a.dtype for a in got] == [np.int32, np.float32] and [a.shape for a in got] == [(3,), (2, 2)]
    np.testing.assert_array_equal(got[0], tokens)
    np.testing.assert_array_equal(got[1], logprobs)
    follower.acknowledge({"compilations_after_warmup": 0})
    leader.broadcast({"op": "ping"})  # collects the acknowledgement first
    assert leader.followers[1].compilations_after_warmup == 0
    assert follower.receive() == {"op": "ping"}


def test_a_follower_out_of_step_or_unanswered_is_a_lost_peer(channels):
    leader, follower = channels
    leader.broadcast({"op": "ping"})
    with pytest.raises(PeerLostError, match="expected 'sampled'.*got 'ping'"):
        follower.receive_relayed("sampled")
    start = time.monotonic()
    with pytest.raises(PeerLostError, match="follower process 1: no answer"):
        leader.broadcast({"op": "step"})  # the ping was never acknowledged
    assert 1.5 < time.monotonic() - start < 10


def test_the_watchdog_fires_once_for_a_step_past_its_timeout_and_never_for_quick_ones():
    fired = []
    watchdog = StepWatchdog(0.3, fired.append)
    for _ in range(3):
        with watchdog:
            time.sleep(0.05)
    time.sleep(0.5)
    assert fired == []
    with watchdog:
        time.sleep(1.0)
    time.sleep(0.5)
    assert len(fired) == 1 and "has not finished in 0.3 s" in str(fired[0])


class _StuckGenerator:
    """A generator whose step never returns, as when a peer stops answering inside a collective."""

    def __init__(self):
        self.running, self.waiting, self.generated_tokens = {}, deque(), 0
        self.fetch_sampled = None
        self.release = threading.Event()

    def submit(self, request):
        self.waiting.append(request)

    def has_work(self):
        return bool(self.running or self.waiting)

    def step(self):
        self.running[0] = self.waiting.popleft()
        self.release.wait()
        return []


class _Engine:
    def __init__(self):
        self.generator = _StuckGenerator()

    def has_adapter(self, name):
        return True


class _Followers:
    """A LeaderChannel's surface, with followers that answer everything."""

    timeout = 0.5

    def broadcast(self, op):
        pass

    def relay(self, message):
        pass

    def close(self):
        pass


def test_a_step_stuck_past_the_peer_timeout_fails_every_request_and_stops_the_server():
    engine, lost = _Engine(), []
    scheduler = Scheduler(engine, replicas=_Followers(), on_peer_lost=lost.append)
    ended: list[Request] = []
    running, waiting = (Request([1, 2], None, SamplingParams(max_tokens=4)) for _ in range(2))
    for request in (running, waiting):
        request.on_token = lambda r, token: ended.append(r) if token is None else None
    scheduler.start()
    scheduler.submit(running)
    deadline = time.monotonic() + 10
    while not engine.generator.running and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.submit(waiting)
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert len(lost) == 1 and isinstance(lost[0], PeerLostError)
        assert {id(r) for r in ended} == {id(running), id(waiting)}
        assert all(r.finish_reason == "error" and r.error is lost[0] for r in (running, waiting))
        late = Request([1], None, SamplingParams(max_tokens=1))
        scheduler.submit(late)
        assert late.finish_reason == "error" and late.error is lost[0]
    finally:
        engine.generator.release.set()
        scheduler.stop()
    assert lost == [lost[0]]  # once, though the step has now returned


def test_a_follower_ends_a_cancelled_request_at_the_cancel_as_the_leader_does():
    """The leader's scheduler ends a cancelled request before its next step (and may send no step at all when
    nothing else runs); its followers end their copy at the cancel too, so their queues stay the same."""
    engine = Engine.from_pretrained("demo", max_batch=2, max_seq_len=32)
    follower = Follower(engine, channel=None, metrics=None)
    request = Request([1, 2], None, SamplingParams(max_tokens=4))
    follower.apply(submit_op(request))
    assert [r.id for r in engine.generator.waiting] == [request.id]
    follower.apply({"op": "cancel", "id": request.id})
    assert not engine.generator.waiting and not engine.generator.has_work() and not follower.requests
