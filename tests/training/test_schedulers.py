"""--strategy=multi_worker under the schedulers people use, simulated on loopback, against one
process running the same 20 steps:
- an srun step of 2 tasks (launch_local --scheduler=slurm sets the SLURM variables and
  TensorFlow's SlurmClusterResolver reads them): preempted by SIGTERM to every task (as SLURM
  sends it), relaunched, task 1 killed, relaunched to the end;
- a Kubeflow TFJob with a Chief and a Worker replica (TF_CONFIG as the training operator
  writes it): the worker pod deleted (SIGTERM to it alone, as Kubernetes sends it), both stop,
  relaunched to the end. (A worker killed under TF_CONFIG: test_multiworker.py.)
Also the order in which the cluster is resolved, and its one-line errors."""

import json
import os
import re
import signal

import pytest

from research import devices
from research.apps import launch_local
from research.training import cluster
from research.training.config import ConfigError
from test_multiworker import (assert_resumed, assert_same_as_one_process, launch_command,
                              launch_to_the_end, launch_until, one_process_run)

SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node[9-10]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_LOCALID": "0"}


@pytest.fixture
def env(monkeypatch):
    """A clean slate: no TF_CONFIG, no SLURM_* (the test machine may run under either)."""
    for name in list(os.environ):
        if name == "TF_CONFIG" or name.startswith("SLURM") or name == cluster.PORT_VAR:
            monkeypatch.delenv(name)
    return monkeypatch


def srun_task(env, procid, node, **extra):
    env.setenv("SLURM_PROCID", str(procid))
    env.setenv("SLURMD_NODENAME", node)
    for name, value in {**SRUN, **extra}.items():
        env.setenv(name, value)


def test_resolution_order_and_one_line_errors(env):
    assert cluster.resolve("mirrored") is None
    with pytest.raises(ConfigError, match="no cluster found: set TF_CONFIG .* srun under SLURM"):
        cluster.resolve("multi_worker")
    env.setenv("SLURM_JOB_ID", "7")  # inside sbatch's script, not under srun
    with pytest.raises(ConfigError, match="SLURM job 7 but not an srun step"):
        cluster.resolve("multi_worker")

    srun_task(env, 0, "node9")
    resolver = cluster.resolve("multi_worker")
    port = 20000 + 8 * (4242 % 5000)
    # Hosts sorted by name, as TensorFlow's resolver lists them; each task finds its own
    # address there (SLURM_PROCID 0 runs on node9, the second in that order).
    assert resolver.cluster_spec().as_dict() == {"worker": [f"node10:{port}", f"node9:{port}"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)
    assert resolver.num_accelerators() == {"GPU": 0}  # a CPU node: no nvidia-smi, no error
    srun_task(env, 1, "node10")
    assert cluster.resolve("multi_worker").task_id == 0

    srun_task(env, 1, "localhost", SLURM_STEP_NODELIST="localhost", SLURM_LOCALID="1",
              SLURM_STEP_TASKS_PER_NODE="2", RESEARCH_PORT="31000")
    resolver = cluster.resolve("multi_worker")
    assert resolver.cluster_spec().as_dict() == {"worker": ["localhost:31000",
                                                            "localhost:31001"]}
    assert resolver.task_id == 1
    env.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with env.context() as gpu:
        gpu.setenv("SLURM_GPUS_ON_NODE", "2")
        assert cluster.resolve("multi_worker").num_accelerators() == {"GPU": 1}
        # The resolver no longer sets it (too late once CUDA has started): research.devices
        # does, before TensorFlow lists a device (tests/training/test_devices.py checks the order).
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
        assert devices.slurm_task_gpus() == "1"  # task 1's share of the node
        gpu.setenv("SLURM_GPUS_ON_NODE", "1")
        with pytest.raises(ConfigError, match=r"\(1 GPU\(s\) for 2 tasks on a node\)"):
            cluster.resolve("multi_worker")

    # TF_CONFIG wins over SLURM (launch_local or a TFJob inside an allocation).
    env.setenv("TF_CONFIG", json.dumps(launch_local.tf_configs([5, 6], chief=True)[0]))
    resolver = cluster.resolve("multi_worker")
    assert (resolver.task_type, resolver.task_id) == ("chief", 0)
    env.delenv("TF_CONFIG")

    for name, value, message in (
            ("RESEARCH_PORT", "80", "RESEARCH_PORT: must be a port number in 1024-65000"),
            ("SLURM_STEP_NODELIST", "node[1-", "SLURM's environment does not describe a "
             "cluster .*Invalid hostlist format"),
            ("SLURM_STEP_NUM_TASKS", "3", "SLURM's environment does not describe a cluster "
             r"\(Requested 3 tasks but only 2 were assigned"),
            ("SLURMD_NODENAME", "elsewhere", r"this task \(elsewhere:31001\) is not in the "
             "cluster SLURM describes")):
        with env.context() as one:
            one.setenv(name, value)
            with pytest.raises(ConfigError, match=message) as e:
                cluster.resolve("multi_worker")
            assert "\n" not in str(e.value)
    env.delenv("SLURM_LOCALID")
    with pytest.raises(ConfigError, match="the srun step's environment lacks SLURM_LOCALID$"):
        cluster.resolve("multi_worker")


def test_simulated_schedulers_environments():
    srun = launch_local.slurm_envs(2, 40000)
    assert [e["SLURM_PROCID"] for e in srun] == ["0", "1"]
    assert {e["SLURM_STEP_NODELIST"] for e in srun} == {"localhost"}
    first = launch_local.free_port_range(3)
    assert 1024 < first and first + 2 <= 65535
    chief, worker = launch_local.tf_configs([1, 2], chief=True)
    assert chief["cluster"] == worker["cluster"] == {"chief": ["127.0.0.1:1"],
                                                     "worker": ["127.0.0.1:2"]}
    assert (chief["task"], worker["task"]) == ({"type": "chief", "index": 0},
                                               {"type": "worker", "index": 0})
    assert chief["environment"] == "cloud"  # as the Kubeflow training operator writes it


def preempted_steps(out):
    """{worker: step} from each worker's 'preempted by ... at step N' line."""
    return {int(w): int(s) for w, s in
            re.findall(r"\[worker (\d)\] preempted by .* at step (\d+): saved", out)}


def preempt(launch, run_dir, step, send):
    """Runs `launch` until worker 0's step `step`, then `send(pids)`: both workers must
    stop at the same step with status 75, the chief's checkpoint there. Returns that step."""
    code, out, _ = launch_until(launch, step, send)
    stopped = preempted_steps(out)
    assert code == 75 and sorted(stopped) == [0, 1], out[-3000:]
    assert len(set(stopped.values())) == 1, stopped
    assert "(preempted); waiting for the others" in out  # no second signal from the launcher
    assert os.path.exists(run_dir / f"ckpt-{stopped[0]}.index")
    return stopped[0]


@pytest.mark.slow
@pytest.mark.xdist_group("one_process_run")  # shares its session reference
def test_srun_matches_one_process_through_a_preemption_and_a_kill(syn, tmp_path,
                                                                  tmp_path_factory):
    def scheduler_sigterm(pids):  # SLURM signals every task of the step
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)

    launch, run_dir = launch_command(syn, tmp_path, "--scheduler=slurm"), tmp_path / "ck" / "r"
    step = preempt(launch, run_dir, 6, scheduler_sigterm)

    code, out, seconds = launch_until(launch, 12, lambda pids: os.kill(pids[1], signal.SIGKILL))
    assert code == 128 + signal.SIGKILL, out[-3000:]
    assert "[launch] worker 1 exited with status 137; stopping the others" in out
    # Blocked in a collective, the chief cannot act on the SIGTERM; the SIGKILL after
    # --grace_seconds=5 ends it (alone, TensorFlow's health check would, some seconds later).
    assert seconds < 5 + 3
    assert_resumed(out, run_dir, (step,))

    assert_resumed(launch_to_the_end(launch), run_dir, (10,))
    assert_same_as_one_process(one_process_run(syn, tmp_path_factory), tmp_path)


@pytest.mark.slow
@pytest.mark.xdist_group("one_process_run")  # shares its session reference
def test_tfjob_matches_one_process_through_a_pod_deletion(syn, tmp_path, tmp_path_factory):
    def delete_worker_pod(pids):  # Kubernetes signals the pod it deletes, not the others
        os.kill(pids[1], signal.SIGTERM)

    launch, run_dir = launch_command(syn, tmp_path, "--chief"), tmp_path / "ck" / "r"
    step = preempt(launch, run_dir, 12, delete_worker_pod)
    assert_resumed(launch_to_the_end(launch), run_dir, (step,))
    assert_same_as_one_process(one_process_run(syn, tmp_path_factory), tmp_path)
