r"""Runs a multi-worker job on this machine: N processes on free loopback ports, each with its
own TF_CONFIG, their output streamed with a `[worker i]` prefix.

  python -m research.apps.launch_local --workers=2 -- --data_dir=data/cifar10 --run_name=mw

Everything after `--` goes to every worker (`research.apps.train` by default, with
--strategy=multi_worker added). If a worker fails, the others are stopped (SIGTERM, then
SIGKILL after --grace_seconds) and the launcher exits with the failed worker's status; a
SIGTERM or SIGINT to the launcher is passed on to every worker (they checkpoint and exit 75).
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

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 2, "Worker processes.", lower_bound=1)
flags.DEFINE_string("module", "research.apps.train", "Python module each worker runs.")
flags.DEFINE_float("grace_seconds", 30.0, "After a failure, time the other workers get to exit "
                   "on SIGTERM before SIGKILL.", lower_bound=0.0)


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


def tf_configs(ports: list[int]) -> list[dict]:
    workers = [f"127.0.0.1:{p}" for p in ports]
    return [{"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
            for i in range(len(ports))]


def _stream(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()


def _status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal s: 128 + s, as a shell says


def launch(workers: int, args: list[str], module: str = "research.apps.train",
           grace_seconds: float = 30.0) -> int:
    """Runs the workers to the end; returns 0, or the status of the first that failed."""
    if any(a.startswith("--strategy=") and a != "--strategy=multi_worker" for a in args):
        raise ValueError("--strategy: launch_local runs --strategy=multi_worker")
    args = [*args, "--strategy=multi_worker"]
    lock, procs, threads = threading.Lock(), [], []
    for i, tf_config in enumerate(tf_configs(free_ports(workers))):
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        procs.append(proc)
        print(f"[launch] worker {i}: pid {proc.pid}, {tf_config['cluster']['worker'][i]}",
              flush=True)
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
            print(f"[launch] worker {failed} exited with status {code}; stopping the others",
                  flush=True)
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
        code = launch(FLAGS.workers, argv[1:], FLAGS.module, FLAGS.grace_seconds)
    except ValueError as e:
        sys.exit(f"error: {e}")
    sys.exit(code)


if __name__ == "__main__":
    app.run(main)
