"""The operations process 0 of a multi-process server sends its followers, as JSON-ready dicts, and the follower
that replays them on its own engine so that every process runs the same computations in the same order."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from pathlib import Path

import numpy as np

from ..adapters.adapter import LoraAdapter
from ..distributed import needs_gather, to_host
from ..errors import PeerLostError
from .generator import Request
from .replica_channel import FollowerChannel, LeaderChannel
from .sampler import SamplingParams


def submit_op(request: Request) -> dict:
    """A request handed to the generator: its id (which also seeds it), prompt, adapter and sampling parameters."""
    return {"op": "submit", "id": request.id, "prompt": list(request.prompt), "adapter": request.adapter,
            "params": dataclasses.asdict(request.params)}


def request_from_op(op: dict) -> Request:
    """The follower's copy of a submitted request, with the leader's id."""
    params = dict(op["params"])
    for key in ("stop", "stop_token_ids"):
        params[key] = tuple(params[key])
    params["logit_bias"] = tuple((int(t), float(v)) for t, v in params["logit_bias"])
    return Request(list(op["prompt"]), op["adapter"], SamplingParams(**params), id=op["id"])


def adapter_op(kind: str, name: str, adapter: str | Path | LoraAdapter | None = None) -> dict | None:
    """An adapter load (from a directory every process reads) or unload; None for an adapter object in memory,
    which the followers do not have."""
    if isinstance(adapter, LoraAdapter):
        return None
    return {"op": kind, "name": name, **({"path": str(adapter)} if adapter is not None else {})}


def sampled_message(arrays: list[np.ndarray]) -> dict:
    """A step's sampled host arrays (tokens, log-probabilities) as the JSON-ready message the leader relays."""
    return {"op": "sampled", "arrays": [{"dtype": a.dtype.str, "shape": list(a.shape), "values": a.ravel().tolist()}
                                        for a in arrays]}


def arrays_from_message(message: dict) -> list[np.ndarray]:
    """The host arrays of a sampled message, with their dtypes and shapes (JSON keeps float32 and -inf exact)."""
    return [np.asarray(a["values"], np.dtype(a["dtype"])).reshape(a["shape"]) for a in message["arrays"]]


def leader_fetch(channel: LeaderChannel):
    """Process 0's fetch of a step's sampled arrays: read them, then relay them to the followers."""

    def fetch(*arrays) -> list[np.ndarray]:
        host = [to_host(a) for a in arrays]
        channel.relay(sampled_message(host))
        return host

    return fetch


def follower_fetch(channel: FollowerChannel):
    """A follower's fetch: the leader's values, read from the channel. It copies nothing off its devices, and joins
    the gather only where the mesh splits the rows over processes (process 0 cannot read them without it)."""

    def fetch(*arrays) -> list[np.ndarray]:
        for a in arrays:
            if needs_gather(a):
                to_host(a)
        host = arrays_from_message(channel.receive_relayed("sampled"))
        if len(host) != len(arrays):
            raise PeerLostError(f"leader (process 0): relayed {len(host)} sampled arrays, expected {len(arrays)}")
        return host

    return fetch


class StepWatchdog:
    """Calls `on_stuck` once when an operation has run longer than `timeout` seconds: a peer that stops answering
    inside a collective would otherwise hold this process there for ever."""

    def __init__(self, timeout: float, on_stuck):
        self.timeout, self.on_stuck = timeout, on_stuck
        self._since: float | None = None
        self._fired = False
        self._thread = threading.Thread(target=self._watch, name="bdlora-step-watchdog", daemon=True)
        self._thread.start()

    def __enter__(self):
        self._since = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self._since = None

    def _watch(self) -> None:
        while not self._fired:
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                self._fired = True
                self.on_stuck(PeerLostError(f"a step has not finished in {self.timeout:g} s: another process "
                                            "stopped answering inside a collective"))
                return
            time.sleep(min(1.0, self.timeout / 10))


class Follower:
    """A follower process's loop: replay each operation from the leader on this process's engine, acknowledge it
    with the compilations since warm-up, until the leader says stop (or is lost: PeerLostError)."""

    def __init__(self, engine, channel: FollowerChannel, metrics, on_stuck=None):
        self.engine, self.channel, self.metrics = engine, channel, metrics
        self.requests: dict[int, Request] = {}
        engine.generator.fetch_sampled = follower_fetch(channel)
        self.watching = StepWatchdog(channel.timeout, on_stuck) if on_stuck is not None else contextlib.nullcontext()

    def run(self) -> None:
        """Replay operations until the leader stops the job."""
        while True:
            op = self.channel.receive()
            if op["op"] == "stop":
                return
            self.apply(op)
            self.channel.acknowledge({"compilations_after_warmup": self.metrics.compilations_since_warm_up()})

    def apply(self, op: dict) -> None:
        """Run one operation as the leader did."""
        kind, generator = op["op"], self.engine.generator
        if kind == "submit":
            request = request_from_op(op)
            self.requests[request.id] = request
            generator.submit(request)
        elif kind == "cancel":
            self.requests[op["id"]].cancelled = True  # in flight here as on the leader, which cancels only those
            for request in generator.drop_cancelled():  # ended at once, as the leader ends it
                self.requests.pop(request.id, None)
        elif kind == "step":
            with self.watching:
                finished = generator.step()
            for request in finished:
                self.requests.pop(request.id, None)
        elif kind == "add_adapter":  # it succeeded on the leader; failing here (another file) ends this process
            self.engine.add_adapter(op["name"], op["path"])
        elif kind == "remove_adapter":
            self.engine.remove_adapter(op["name"])
        elif kind != "ping":
            raise ValueError(f"unknown operation {kind!r} from the leader")
