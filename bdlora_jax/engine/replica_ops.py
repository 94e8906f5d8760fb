"""The operations process 0 of a multi-process server sends its followers, as JSON-ready dicts, and the follower
that replays them on its own engine so that every process runs the same computations in the same order."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..adapters.adapter import LoraAdapter
from .generator import Request
from .replica_channel import FollowerChannel
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


class Follower:
    """A follower process's loop: replay each operation from the leader on this process's engine, acknowledge it
    with the compilations since warm-up, until the leader says stop (or is lost: PeerLostError)."""

    def __init__(self, engine, channel: FollowerChannel, metrics):
        self.engine, self.channel, self.metrics = engine, channel, metrics
        self.requests: dict[int, Request] = {}

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
        elif kind == "step":
            for request in generator.step():
                self.requests.pop(request.id, None)
        elif kind == "add_adapter":  # it succeeded on the leader; failing here (another file) ends this process
            self.engine.add_adapter(op["name"], op["path"])
        elif kind == "remove_adapter":
            self.engine.remove_adapter(op["name"])
        elif kind != "ping":
            raise ValueError(f"unknown operation {kind!r} from the leader")
