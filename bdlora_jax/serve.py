"""`python -m bdlora_jax.serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the multi-adapter engine.

Handlers validate, enqueue a request for the scheduler thread and await its tokens; the scheduler thread
is the only code that touches the device. `model` in a request names the base model or an adapter, as
in vLLM. Bad input gets a 4xx with an OpenAI error body and never disturbs other requests.
"""

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from .config import DTYPES, KV_CACHES, STRATEGIES
from .distributed import Cluster, add_cluster_flags, start_from_args
from .engine.replica_channel import FollowerChannel, LeaderChannel
from .host_memory import keep_freed_memory

log = logging.getLogger("bdlora_jax.serve")


def __getattr__(name: str):
    """`create_app` of bdlora_jax.server, imported lazily so main can set XLA flags before jax is imported."""
    if name == "create_app":
        from .server import create_app

        return create_app
    raise AttributeError(f"module 'bdlora_jax.serve' has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of `python -m bdlora_jax.serve`."""
    p = argparse.ArgumentParser(prog="python -m bdlora_jax.serve", description=__doc__)
    p.add_argument("--model", default="demo", help="Hugging Face Llama directory, or 'demo' (the default)")
    p.add_argument("--served-model-name", default=None, help="name of the base model in requests (default: its dir)")
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH", help="adapters to register at start")
    p.add_argument("--lora-root", type=Path, default=None, help="only load adapters from under this directory")
    p.add_argument("--compressed-bank", type=Path, default=None, metavar="DIR",
                   help="a compressed-bank directory (python -m bdlora_jax.compress) whose adapters are served by name")
    p.add_argument("--mesh", default="1x1", help="DxM device mesh, e.g. 1x8 (emulated on a CPU-only host)")
    p.add_argument("--strategy", default="bdlora", choices=STRATEGIES)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--kv-cache", default="contiguous", choices=KV_CACHES,
                   help="contiguous: max_seq_len tokens a row; paged: a pool of pages taken as tokens arrive, and "
                        "ragged steps that mix prompt chunks with decode tokens")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page (paged)")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV pages per layer (paged; default: max_batch x max_seq_len tokens' worth)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="BYTES|FRACTION",
                   help="size the page pool by memory instead: bytes of each device, or a fraction (< 1) of its free "
                        "memory (paged)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256,
                   help="tokens of one ragged step: decode tokens plus prompt chunks (paged)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="close a connection idle this long before its request has fully arrived (default 30)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, refuse new requests (503) and let those in flight finish for up to this "
                        "long before exiting (default 30)")
    add_cluster_flags(p)
    p.add_argument("--peer-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="multi-process: a process silent this long is lost; process 0 then fails every request "
                        "(503) and exits non-zero, and followers exit when process 0 is lost (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Start the engine and scheduler as the flags say, warm up, and serve until SIGTERM/SIGINT has drained it."""
    keep_freed_memory()
    args = build_parser().parse_args(argv)
    for flag, seconds in (("--request-timeout", args.request_timeout), ("--shutdown-timeout", args.shutdown_timeout),
                          ("--peer-timeout", args.peer_timeout)):
        if not 0 < seconds < float("inf"):
            raise SystemExit(f"{flag} {seconds}: expected a positive number of seconds")
    cluster = start_from_args(args, args.mesh)
    if cluster.multi_process and args.kv_cache_memory is not None and args.kv_cache_memory < 1:
        raise SystemExit(f"--kv-cache-memory {args.kv_cache_memory}: a fraction of free memory differs between "
                         "processes, and every process must hold the same pages; give bytes or --num-pages")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import uvicorn

    from .demo import DEMO_MODEL, demo_adapters, is_demo_model
    from .engine.engine import Engine
    from .engine.scheduler import Scheduler
    from .server import create_app
    from .server.graceful import GracefulServer
    from .server.http_protocol import with_request_timeout

    modules = {}
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora-modules {item!r}: expected NAME=PATH")
        modules[name] = Path(path)
    engine = Engine.from_pretrained(args.model, mesh=args.mesh, strategy=args.strategy, max_loras=args.max_loras,
                                    max_lora_rank=args.max_lora_rank, max_batch=args.max_batch,
                                    max_seq_len=args.max_seq_len, dtype=args.dtype,
                                    compressed_bank=args.compressed_bank, kv_cache=args.kv_cache,
                                    page_size=args.page_size, num_pages=args.num_pages,
                                    kv_cache_memory=args.kv_cache_memory,
                                    max_num_batched_tokens=args.max_num_batched_tokens)
    if is_demo_model(args.model):  # the shipped task adapters, unless a compressed bank already serves their names
        shipped = {name: path for name, path in demo_adapters().items() if not engine.has_adapter(name)}
        if len(shipped) < len(demo_adapters()):
            log.info("demo adapters %s are served from the compressed bank", sorted(set(demo_adapters()) - set(shipped)))
        modules = {**shipped, **modules}
    for name, path in modules.items():
        engine.add_adapter(name, path)
    served = args.served_model_name or (DEMO_MODEL if is_demo_model(args.model) else Path(args.model).resolve().name)
    channel = connect_processes(cluster, args.peer_timeout) if cluster.multi_process else None
    leads = isinstance(channel, LeaderChannel)
    scheduler = Scheduler(engine, replicas=channel if leads else None,
                          on_peer_lost=(lambda _: os.kill(os.getpid(), signal.SIGTERM)) if leads else None)
    log.info("warming up (compiling prefill buckets, decode step and slot writes) ...")
    scheduler.warm_up()
    if isinstance(channel, FollowerChannel):  # replay process 0's operations until it says stop
        return follow(engine, channel, scheduler.metrics)
    scheduler.start()
    log.info("serving %s with %d adapters on mesh %s (%s) at http://%s:%d", served, len(engine.adapters), args.mesh,
             args.strategy, args.host, args.port)
    app = create_app(engine, scheduler, served, api_key=args.api_key, lora_root=args.lora_root)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            http=with_request_timeout(args.request_timeout))
    GracefulServer(config, app.state.drain, args.shutdown_timeout).run()
    scheduler.stop()
    if scheduler.peer_lost is not None:  # skip jax.distributed's shutdown barrier, which the lost peer never joins
        log.error("stopped: %s", scheduler.peer_lost)
        logging.shutdown()
        os._exit(1)
    log.info("stopped")
    return 0


def connect_processes(cluster: Cluster, timeout: float) -> LeaderChannel | FollowerChannel:
    """Multi-process: process 0 opens a LeaderChannel on its host (the coordinator's, when the address was given),
    tells every process its address and waits for them all to connect; the others get their FollowerChannel."""
    import jax

    from .distributed import broadcast_text

    if jax.process_index() == 0:
        leader = LeaderChannel(jax.process_count() - 1, timeout)
        host = cluster.coordinator_address.rpartition(":")[0] if cluster.coordinator_address else socket.gethostname()
        broadcast_text(f"{host}:{leader.port}")
        leader.accept()
        log.info("process 0 leads %d followers", leader.num_followers)
        return leader
    host, _, port = broadcast_text("").rpartition(":")
    return FollowerChannel(host, int(port), jax.process_index(), timeout)


def follow(engine, channel: FollowerChannel, metrics) -> int:
    """A follower's serving: replay process 0's operations until it says stop (0), or exit 1 at once when it is
    lost or a step stays stuck in a collective past the timeout (jax.distributed's shutdown barrier would wait)."""
    import jax

    from .engine.replica_ops import Follower
    from .errors import PeerLostError

    def exit_lost(error: PeerLostError) -> None:
        log.error("process %d stops: %s", jax.process_index(), error)
        logging.shutdown()
        os._exit(1)

    try:
        Follower(engine, channel, metrics, on_stuck=exit_lost).run()
    except PeerLostError as e:
        exit_lost(e)
    log.info("process %d stopped by process 0", jax.process_index())
    return 0


if __name__ == "__main__":
    sys.exit(main())
