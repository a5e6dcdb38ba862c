r"""Runs a multi-worker job on this machine: N processes on free loopback ports, each with the
environment a scheduler would give it, their output streamed with a `[worker i]` prefix.

  python -m research.apps.launch_local --workers=2 -- --data_dir=data/cifar10 --run_name=mw

--scheduler=tf_config (default) gives each worker its TF_CONFIG (with --chief, the first is a
"chief" task, as a Kubeflow TFJob with a Chief replica writes it); --scheduler=slurm sets the
variables `srun --ntasks=N` sets on one node (`localhost`, RESEARCH_PORT), so the SLURM
resolver runs as on a cluster. Everything after `--` goes to every worker
(`research.apps.train` by default, with --strategy=multi_worker added). If a worker fails,
the others are stopped (SIGTERM, then SIGKILL after --grace_seconds) and the launcher exits
with the failed worker's status; a worker that exits 75 (preempted) is not a failure of the
others: they stop at the same step by themselves and get --grace_seconds to do so. A SIGTERM
or SIGINT to the launcher is passed on to every worker (they checkpoint and exit 75).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from research.apps import config_flags
from research import devices
from research.errors import PREEMPTED_EXIT, UserError

FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 2, "Worker processes.", lower_bound=1)
flags.DEFINE_string("module", "research.apps.train", "Python module each worker runs.")
flags.DEFINE_float("grace_seconds", 30.0, "After a failure, time the other workers get to exit "
                   "on SIGTERM before SIGKILL.", lower_bound=0.0)
flags.DEFINE_enum("scheduler", "tf_config", ["tf_config", "slurm"], "The environment the "
                  "workers get: TF_CONFIG, or the variables of an srun step on this node.")
flags.DEFINE_integer("gpus_per_worker", 0, "GPUs each worker gets (its CUDA_VISIBLE_DEVICES, set "
                     "before it starts); 0: an even share of the GPUs present (every worker "
                     "sees all when there are fewer GPUs than workers).", lower_bound=0)
config_flags.define_device_flags()
flags.DEFINE_bool("chief", False, "--scheduler=tf_config: the first worker is a 'chief' task "
                  "(a TFJob with a Chief replica) instead of worker 0.")


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so none is picked twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(n: int, tries: int = 50) -> int:
    """The first of n consecutive free loopback ports (an srun step's tasks on one node
    listen on consecutive ports)."""
    for _ in range(tries):
        first = free_ports(1)[0]
        if first + n > 65535:
            continue
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free loopback ports")


def tf_configs(ports: list[int], chief: bool = False) -> list[dict]:
    """Each worker's TF_CONFIG as a Kubeflow TFJob writes it (with `chief`: the first task is
    the chief and the others workers 0, 1, ...)."""
    cluster: dict = {}
    tasks = []
    for k, port in enumerate(ports):
        job = "chief" if chief and k == 0 else "worker"
        tasks.append({"type": job, "index": len(cluster.get(job, []))})
        cluster.setdefault(job, []).append(f"127.0.0.1:{port}")
    return [{"cluster": cluster, "task": task, "environment": "cloud"} for task in tasks]


def slurm_envs(n: int, first_port: int, job_id: int = 1) -> list[dict]:
    """What srun sets in each of n tasks of one step on one node, `localhost` (the variables
    research.training.cluster reads, and the job's own), RESEARCH_PORT its first port."""
    step = {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_ID": "0", "SLURM_NNODES": "1",
            "SLURM_NTASKS": str(n), "SLURM_STEP_NUM_TASKS": str(n),
            "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_TASKS_PER_NODE": str(n), "SLURM_STEP_TASKS_PER_NODE": str(n),
            "SLURMD_NODENAME": "localhost", "SLURM_NODEID": "0",
            "RESEARCH_PORT": str(first_port)}
    return [{**step, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)} for i in range(n)]


def worker_envs(workers: int, scheduler: str = "tf_config",
                chief: bool = False) -> list[tuple[dict, str]]:
    """Each worker's variables on top of this process's environment, and its address."""
    if scheduler == "slurm":
        if chief:
            raise ValueError("--chief: SLURM tasks are all workers (use --scheduler=tf_config)")
        first = free_port_range(workers)
        return [(env, f"localhost:{first + i}")
                for i, env in enumerate(slurm_envs(workers, first))]
    out = []
    for tf_config in tf_configs(free_ports(workers), chief):
        task = tf_config["task"]
        out.append(({"TF_CONFIG": json.dumps(tf_config)},
                    tf_config["cluster"][task["type"]][task["index"]]))
    return out


def _stream(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()


def _status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal s: 128 + s, as a shell says


def launch(workers: int, args: list[str], module: str = "research.apps.train",
           grace_seconds: float = 30.0, scheduler: str = "tf_config", chief: bool = False,
           gpus_per_worker: int = 0, memory_growth: bool = True) -> int:
    """Runs the workers to the end; returns 0, or the status of the first that failed."""
    if any(a.startswith("--strategy=") and a != "--strategy=multi_worker" for a in args):
        raise ValueError("--strategy: launch_local runs --strategy=multi_worker")
    args = [*args, "--strategy=multi_worker", f"--gpu_memory_growth={str(memory_growth).lower()}"]
    gpus = devices.split_gpus(workers, gpus_per_worker)  # before any worker starts
    # Only the chosen scheduler's description: TF_CONFIG would win over SLURM's variables, and
    # a real allocation's SLURM_* would mix with the simulated ones.
    base = {k: v for k, v in os.environ.items()
            if k != "TF_CONFIG" and not (scheduler == "slurm" and k.startswith("SLURM"))}
    lock, procs, threads = threading.Lock(), [], []
    for i, (extra, address) in enumerate(worker_envs(workers, scheduler, chief)):
        env = {**base, **extra, "PYTHONUNBUFFERED": "1",
               devices.GROWTH_ENV: "true" if memory_growth else "false"}
        if gpus[i] is not None:
            env[devices.GPU_ENV] = gpus[i]
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        procs.append(proc)
        print(f"[launch] worker {i}: pid {proc.pid}, {address}"
              + (f", GPUs {gpus[i] or 'none'}" if gpus[i] is not None else ""), flush=True)
        threads.append(threading.Thread(target=_stream, args=(proc, f"[worker {i}] ", lock),
                                        daemon=True))
        threads[-1].start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    start, reported = time.time(), set()
    try:
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            for i, p in enumerate(procs):
                if p.returncode == 0 and i not in reported:
                    reported.add(i)
                    print(f"[launch] worker {i} finished after {time.time() - start:.0f} s",
                          flush=True)
            time.sleep(0.2)
        if failed is None:
            failed = next((i for i, p in enumerate(procs) if p.returncode), None)
        if failed is not None:
            code = _status(procs[failed].returncode)
            if code == PREEMPTED_EXIT:
                # The others stop at the same step on their own; a SIGTERM now would be their
                # second signal, which stops a worker at once (maybe mid-save).
                print(f"[launch] worker {failed} exited with status {code} (preempted); "
                      "waiting for the others", flush=True)
            else:
                print(f"[launch] worker {failed} exited with status {code}; stopping the "
                      "others", flush=True)
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            deadline = time.time() + grace_seconds
            for p in procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for t in threads:
                t.join(timeout=5)
            return code
        for t in threads:
            t.join(timeout=5)
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv):
    try:
        code = launch(FLAGS.workers, argv[1:], FLAGS.module, FLAGS.grace_seconds,
                      FLAGS.scheduler, FLAGS.chief, FLAGS.gpus_per_worker,
                      FLAGS.gpu_memory_growth)
    except (ValueError, RuntimeError, UserError) as e:
        sys.exit(f"error: {e}")
    sys.exit(code)


if __name__ == "__main__":
    config_flags.run(main)
