"""Multi-controller JAX (jax.distributed): every process runs the same program over one global mesh of all
processes' devices. Flags, environment variables or a detected cluster (SLURM, Open MPI, a Kubernetes indexed Job)
say where the coordinator is; on CPU, each process emulates its devices and collectives go over gloo."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .mesh import emulate_host_devices

if TYPE_CHECKING:
    import jax
    import numpy as np

ENV = {"coordinator_address": "BDLORA_COORDINATOR_ADDRESS", "num_processes": "BDLORA_NUM_PROCESSES",
       "process_id": "BDLORA_PROCESS_ID", "cpu_devices_per_process": "BDLORA_CPU_DEVICES_PER_PROCESS"}
# environment variables that jax.distributed.initialize() reads itself when started with no arguments
CLUSTER_ENV = {"SLURM": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
               "Open MPI": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
               "Kubernetes": ("KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX")}
CLUSTER_SIZE = {"SLURM": "SLURM_NTASKS", "Open MPI": "OMPI_COMM_WORLD_SIZE"}


@dataclass(frozen=True)
class Cluster:
    """Where this process stands among the job's processes; a single process when num_processes is 1."""

    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    cpu_devices_per_process: int | None = None
    detected: str | None = None  # a cluster whose environment jax.distributed reads itself

    @property
    def multi_process(self) -> bool:
        """Whether jax.distributed must start (more than one process, or a detected cluster)."""
        return self.num_processes > 1 or self.detected is not None


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags shared by serve, train and the bench commands that take --mesh."""
    group = parser.add_argument_group("multi-process (jax.distributed); each flag falls back to its BDLORA_* "
                                      "environment variable, then to SLURM / Open MPI / Kubernetes detection")
    group.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help=f"process 0's address for jax.distributed ({ENV['coordinator_address']})")
    group.add_argument("--num-processes", type=int, default=None, help=f"processes in the job ({ENV['num_processes']})")
    group.add_argument("--process-id", type=int, default=None, help=f"this process, 0..P-1 ({ENV['process_id']})")
    group.add_argument("--cpu-devices-per-process", type=int, default=None, metavar="K",
                       help=f"CPU only: emulate K devices in each process ({ENV['cpu_devices_per_process']})")


def _integer(value, name: str) -> int | None:
    """An integer flag or environment value, or a ValueError naming it."""
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def detect_cluster(environ: Mapping[str, str]) -> str | None:
    """The cluster manager whose multi-process job this is (one with more than one task), or None."""
    for name, variables in CLUSTER_ENV.items():
        if all(v in environ for v in variables):
            size = CLUSTER_SIZE.get(name)
            if size is None or _integer(environ[size], size) > 1:
                return name
    return None


def cluster_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Cluster:
    """The Cluster that the flags, else the BDLORA_* variables, else a detected cluster describe; ValueError naming
    the flag or variable when they are incomplete or out of range."""
    values = {}
    for field, variable in ENV.items():
        flag = getattr(args, field, None)
        name = f"--{field.replace('_', '-')}" if flag is not None else variable
        raw = flag if flag is not None else environ.get(variable)
        values[field] = raw if field == "coordinator_address" else _integer(raw, name)
    address, count, pid = values["coordinator_address"], values["num_processes"], values["process_id"]
    devices = values["cpu_devices_per_process"]
    if devices is not None and devices < 1:
        raise ValueError(f"--cpu-devices-per-process={devices}: expected at least 1")
    given = [address is not None, count is not None, pid is not None]
    if any(given) and not all(given):
        raise ValueError("--coordinator-address, --num-processes and --process-id go together (or "
                         f"{', '.join(ENV[f] for f in ('coordinator_address', 'num_processes', 'process_id'))})")
    if not any(given):
        return Cluster(cpu_devices_per_process=devices, detected=detect_cluster(environ))
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--coordinator-address={address!r}: expected HOST:PORT")
    if count < 1:
        raise ValueError(f"--num-processes={count}: expected at least 1")
    if not 0 <= pid < count:
        raise ValueError(f"--process-id={pid}: expected 0..{count - 1} for --num-processes={count}")
    return Cluster(address, count, pid, devices)


def start(cluster: Cluster, mesh: str | None = None) -> None:
    """Emulate CPU devices, choose gloo collectives and join the job; call before anything imports jax's backends.
    A single process only emulates the devices `mesh` needs, as before."""
    if cluster.cpu_devices_per_process is not None:  # replaces a device count inherited from the environment
        flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                                   f"{cluster.cpu_devices_per_process}").strip()
    elif mesh is not None and not cluster.multi_process:
        emulate_host_devices(mesh)
    if not cluster.multi_process:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster.detected:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes, cluster.process_id)


def start_from_args(args: argparse.Namespace, mesh: str | None = None) -> Cluster:
    """cluster_from_args then start, turning a bad value into a command-line error."""
    try:
        cluster = cluster_from_args(args)
    except ValueError as e:
        raise SystemExit(f"{sys.argv[0]}: {e}") from None
    start(cluster, mesh)
    return cluster


def is_leader() -> bool:
    """Whether this is process 0, the one that logs, writes results and talks to clients."""
    import jax

    return jax.process_index() == 0


def needs_gather(array) -> bool:
    """Whether reading `array` on one process takes a collective: its rows are split over several processes."""
    return not getattr(array, "is_fully_addressable", True) and not array.is_fully_replicated


def to_host(array) -> np.ndarray:
    """A device array's whole value on this process, gathering the shards other processes hold when it spans them
    (a collective: every process of the array's mesh calls it)."""
    import numpy as np

    if not needs_gather(array):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def process_rows(full: np.ndarray, sharding) -> jax.Array:
    """A global array of `full`'s value in which each process feeds only its part (the rows its devices hold),
    as jax.make_array_from_process_local_data expects; one process simply places it."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(full, sharding)
    rows = [index[0].indices(full.shape[0])[:2] for index in sharding.addressable_devices_indices_map(full.shape).values()]
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    return jax.make_array_from_process_local_data(sharding, full[start:stop], full.shape)


def broadcast_text(text: str, size: int = 512) -> str:
    """Process 0's text on every process (a collective: every process calls it; the others' text is ignored)."""
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.zeros(size, np.uint8)
    encoded = text.encode()[:size]
    data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(data))).rstrip(b"\0").decode()
