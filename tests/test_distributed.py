"""Where a process stands in a multi-process job: flags over BDLORA_* variables over a detected cluster, and every
incomplete or out-of-range value refused naming the flag or variable."""

import argparse

import pytest

from bdlora_jax.distributed import Cluster, add_cluster_flags, cluster_from_args, detect_cluster


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    return parser.parse_args(list(argv))


ENV = {"BDLORA_COORDINATOR_ADDRESS": "10.0.0.1:1234", "BDLORA_NUM_PROCESSES": "4", "BDLORA_PROCESS_ID": "2",
       "BDLORA_CPU_DEVICES_PER_PROCESS": "8"}


def test_no_flags_and_no_environment_is_one_process():
    assert cluster_from_args(_args(), {}) == Cluster()
    assert not Cluster().multi_process


def test_flags_describe_the_job():
    cluster = cluster_from_args(_args("--coordinator-address", "host:99", "--num-processes", "2", "--process-id", "1",
                                      "--cpu-devices-per-process", "4"), {})
    assert cluster == Cluster("host:99", 2, 1, 4) and cluster.multi_process


def test_environment_variables_fill_in_and_flags_win():
    assert cluster_from_args(_args(), ENV) == Cluster("10.0.0.1:1234", 4, 2, 8)
    assert cluster_from_args(_args("--process-id", "3"), ENV) == Cluster("10.0.0.1:1234", 4, 3, 8)


@pytest.mark.parametrize("argv,env,message", [
    (("--num-processes", "2"), {}, "go together"),
    (("--coordinator-address", "nohost", "--num-processes", "2", "--process-id", "0"), {}, "nohost.*HOST:PORT"),
    (("--coordinator-address", "h:1", "--num-processes", "0", "--process-id", "0"), {}, "--num-processes=0"),
    (("--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"), {}, r"--process-id=2.*0\.\.1"),
    (("--cpu-devices-per-process", "0"), {}, "--cpu-devices-per-process=0"),
    ((), {**ENV, "BDLORA_PROCESS_ID": "two"}, "BDLORA_PROCESS_ID='two': expected an integer"),
])
def test_bad_values_are_refused_naming_them(argv, env, message):
    with pytest.raises(ValueError, match=message):
        cluster_from_args(_args(*argv), env)


def test_clusters_are_detected_only_for_jobs_of_several_processes():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert detect_cluster(slurm) == "SLURM"
    assert detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None
    assert detect_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None  # any pod; only an indexed Job counts
    assert detect_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "0"}) == "Kubernetes"
    assert cluster_from_args(_args(), slurm) == Cluster(detected="SLURM")
