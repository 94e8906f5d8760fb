"""The leader-to-followers channel of a multi-process server: process 0 sends each engine operation (a request
submitted or cancelled, an adapter loaded or unloaded, a step) as one JSON line before running it, and every
follower runs the same operation, so all processes enter the same jitted computations in the same order.

One TCP connection per follower. A follower acknowledges every operation with its status (compilations since
warm-up); in the middle of a step the leader relays the tokens it sampled, which the followers take instead of
reading their own (the leader's values are the ones clients get, so every process keeps the same histories and
schedules the same next step). The leader waits for the previous acknowledgement before sending again, so
processes stay within one operation of each other and a follower that dies or stops answering is noticed within
`timeout` seconds. The leader pings while idle; a follower that hears nothing for `timeout` seconds, or loses the
connection, exits.
JSON, not pickle: a message can describe an operation, never run code.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

from ..errors import PeerLostError


@dataclass
class FollowerStatus:
    """What the leader last heard from one follower."""

    process_id: int
    compilations_after_warmup: int | None = None
    last_seen: float = field(default_factory=time.monotonic)


def _send(stream, message: dict) -> None:
    """Write one JSON line and flush it."""
    stream.write((json.dumps(message) + "\n").encode())
    stream.flush()


def _receive(stream, peer: str) -> dict:
    """Read one JSON line, or PeerLostError when the peer closed the connection or timed out."""
    try:
        line = stream.readline()
    except (TimeoutError, OSError) as e:
        raise PeerLostError(f"{peer}: no answer ({e})") from None
    if not line:
        raise PeerLostError(f"{peer}: connection closed")
    return json.loads(line)


class LeaderChannel:
    """Process 0's side: accepts every follower, then broadcasts operations and collects acknowledgements."""

    def __init__(self, num_followers: int, timeout: float, host: str = "0.0.0.0"):
        self.timeout = timeout
        self._server = socket.create_server((host, 0))
        self._server.settimeout(timeout)
        self.port = self._server.getsockname()[1]
        self.num_followers = num_followers
        self.followers: dict[int, FollowerStatus] = {}
        self._streams: dict[int, tuple[socket.socket, object]] = {}
        self._awaiting = False

    def accept(self) -> None:
        """Wait (up to timeout) until every follower has connected and said which process it is."""
        while len(self._streams) < self.num_followers:
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                raise PeerLostError(f"only {len(self._streams)} of {self.num_followers} followers connected within "
                                    f"{self.timeout:g} s") from None
            conn.settimeout(self.timeout)
            stream = conn.makefile("rwb")
            hello = _receive(stream, "a connecting follower")
            pid = int(hello["process_id"])
            self._streams[pid] = (conn, stream)
            self.followers[pid] = FollowerStatus(pid)
        self._server.close()

    def broadcast(self, op: dict) -> None:
        """Send op to every follower after their acknowledgement of the previous one; PeerLostError naming the
        follower that did not answer in time."""
        self._collect()
        self.relay(op)
        self._awaiting = True

    def relay(self, message: dict) -> None:
        """Send message to every follower without waiting for an acknowledgement: what they wait for in the middle
        of the operation they are running (the step's sampled tokens), or the next operation (broadcast)."""
        for pid, (_, stream) in self._streams.items():
            try:
                _send(stream, message)
            except OSError as e:
                raise PeerLostError(f"follower process {pid}: {e}") from None

    def _collect(self) -> None:
        """Read each follower's acknowledgement of the last message."""
        if not self._awaiting:
            return
        for pid, (_, stream) in self._streams.items():
            status = _receive(stream, f"follower process {pid}")
            self.followers[pid] = FollowerStatus(pid, status.get("compilations_after_warmup"))
        self._awaiting = False

    def close(self) -> None:
        """Tell the followers to stop and close the connections."""
        for _, stream in self._streams.values():
            try:
                _send(stream, {"op": "stop"})
            except OSError:
                pass
        for conn, _ in self._streams.values():
            conn.close()


class FollowerChannel:
    """A follower's side: connects to the leader, receives operations and acknowledges each."""

    def __init__(self, host: str, port: int, process_id: int, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._conn = socket.create_connection((host, port), timeout=timeout)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise PeerLostError(f"leader {host}:{port}: cannot connect within {timeout:g} s") from None
                time.sleep(0.1)
        self.timeout = timeout
        self._conn.settimeout(timeout)
        self._stream = self._conn.makefile("rwb")
        _send(self._stream, {"process_id": process_id})

    def receive(self) -> dict:
        """The next operation; PeerLostError when the leader is gone or silent for longer than the timeout."""
        return _receive(self._stream, "leader (process 0)")

    def receive_relayed(self, kind: str) -> dict:
        """The message of `kind` the leader relays in the middle of an operation; PeerLostError when another
        arrives (the processes are out of step) or none in time."""
        message = self.receive()
        if message.get("op") != kind:
            raise PeerLostError(f"leader (process 0): expected {kind!r} in the middle of an operation, "
                                f"got {message.get('op')!r}")
        return message

    def acknowledge(self, status: dict) -> None:
        """Tell the leader this operation is done, with this process's status."""
        try:
            _send(self._stream, status)
        except OSError as e:
            raise PeerLostError(f"leader (process 0): {e}") from None
