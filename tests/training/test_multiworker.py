"""Two workers on loopback (MultiWorkerMirroredStrategy over TF_CONFIG, started by
launch_local) against one process with the same global batch and seed; a worker killed
mid-run, then the job restarted from the chief's latest checkpoint. The helpers here also
drive the simulated SLURM and TFJob runs of test_schedulers.py."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from research.apps import launch_local
from research.training import loop
from research.training.config import TrainConfig

FLAGS = ["--run_name=r", "--batch_size=32", "--widths=8,16", "--res_blocks=1,0",
         "--stem_width=8", "--learning_rate=0.03", "--gradcam_images=0", "--progress=false",
         "--precision=float32", "--deterministic", "--train_steps=20", "--steps_per_loop=1",
         "--eval_every_steps=1000", "--checkpoint_every_steps=5", "--eval_batch_size=16"]


def dirs(root):
    return [f"--checkpoint_dir={root}/ck", f"--log_dir={root}/logs"]


_REFERENCE = {}


def one_process_run(syn, tmp_path_factory):
    """The folder of the reference run: FLAGS' run in this process (no process start-up to
    pay), one device; made once per session, for this module and test_schedulers.py."""
    if syn not in _REFERENCE:
        root = tmp_path_factory.mktemp("one")
        loop.train_and_evaluate(TrainConfig(
            data_dir=syn, run_name="r", checkpoint_dir=str(root / "ck"),
            log_dir=str(root / "logs"),
            model_options={"widths": (8, 16), "res_blocks": (1, 0), "stem_width": 8},
            batch_size=32, learning_rate=0.03, gradcam_images=0, progress=False,
            precision="float32", train_steps=20, steps_per_loop=1, eval_every_steps=1000,
            checkpoint_every_steps=5, eval_batch_size=16, strategy="default"))
        _REFERENCE[syn] = root
    return _REFERENCE[syn]


def launch_command(syn, root, *launcher_flags):
    """launch_local running FLAGS' run on 2 workers into `root`."""
    return [sys.executable, "-m", "research.apps.launch_local", "--workers=2",
            "--grace_seconds=5", *launcher_flags, "--", f"--data_dir={syn}", *FLAGS, *dirs(root)]


def launch_until(command, step, act, timeout=240):
    """Runs `command`; once worker 0 logs train step `step`, calls act({worker: pid}).
    Returns the launcher's status, its output, and the seconds from `act` to its exit."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines, pids, acted, deadline = [], {}, None, time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.match(r"\[launch\] worker (\d+): pid (\d+)", line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
        if line.startswith("[worker 0]") and f"train | step {step:6d}" in line:
            act(pids)
            acted = time.time()
            break
    else:
        proc.kill()
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    return proc.returncode, out, (time.time() - acted if acted else None)


def launch_to_the_end(command, timeout=300):
    res = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    return res.stdout


def assert_resumed(out, run_dir, steps):
    """Every worker resumed from the chief's checkpoint at one of `steps`."""
    for worker in (0, 1):
        assert re.search(rf"\[worker {worker}\].*Resumed {re.escape(str(run_dir))}/ckpt-"
                         rf"({'|'.join(map(str, steps))}) at step", out), out[-3000:]


def assert_same_as_one_process(one, two):
    """Per-step losses (1e-4 relative) and final weights (1e-5 of the norm) of the run in
    `two` equal the one-process run in `one`; it finished and exported."""
    assert os.path.exists(two / "ck" / "r" / "export" / "model.keras")
    logged = os.listdir(two / "logs" / "r")  # the chief's: train, eval and HParams sessions
    assert sorted(x for x in logged if not x.startswith("events.out.tfevents")) == [
        "eval", "train"]
    l1, l2 = step_losses(str(one / "logs" / "r")), step_losses(str(two / "logs" / "r"))
    assert sorted(l1) == sorted(l2) == list(range(1, 21))
    np.testing.assert_allclose([l2[s] for s in range(1, 21)], [l1[s] for s in range(1, 21)],
                               rtol=1e-4)
    w1, w2 = model_weights(str(one / "ck" / "r")), model_weights(str(two / "ck" / "r"))
    assert np.linalg.norm(w2 - w1) <= 1e-5 * np.linalg.norm(w1)


def step_losses(logdir):
    """{step: train loss} from the TensorBoard events (a replayed step: its last value)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "train", "events*")),
                       key=os.path.getmtime):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag == "loss":
                    out[event.step] = float(tf.make_ndarray(v.tensor))
    return out


def model_weights(run_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(run_dir))
    names = sorted(k for k in reader.get_variable_to_shape_map() if k.startswith("model/"))
    assert names
    return np.concatenate([np.ravel(reader.get_tensor(k)) for k in names])


def test_tf_configs_and_ports():
    ports = launch_local.free_ports(3)
    assert len(set(ports)) == 3
    configs = launch_local.tf_configs(ports)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert configs[2]["cluster"]["worker"][0] == f"127.0.0.1:{ports[0]}"


def test_tf_config_is_checked_before_any_work(monkeypatch):
    from research.training import cluster
    from research.training.config import ConfigError

    assert cluster.resolve("auto") is None
    for bad in ("{", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
                '{"cluster": {"worker": ["a:1"]}}'):
        monkeypatch.setenv("TF_CONFIG", bad)
        with pytest.raises(ConfigError, match="TF_CONFIG is not a valid cluster description"):
            cluster.resolve("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps(launch_local.tf_configs([1, 2])[1]))
    assert cluster.check_tf_config(os.environ["TF_CONFIG"])["task"]["index"] == 1
    assert cluster.resolve("multi_worker").task_id == 1


@pytest.mark.slow
@pytest.mark.xdist_group("one_process_run")  # shares its session reference
def test_two_workers_match_one_process_and_resume_after_a_kill(syn, tmp_path, tmp_path_factory):
    one, two = one_process_run(syn, tmp_path_factory), tmp_path / "two"
    launch = launch_command(syn, two)
    code, out, _ = launch_until(launch, 12, lambda pids: os.kill(pids[1], signal.SIGKILL))
    assert code == 128 + signal.SIGKILL, out[-3000:]  # ckpt-10 was written
    assert "[launch] worker 1 exited with status 137; stopping the others" in out
    assert not glob.glob(os.path.join(str(two), "ck", "r", "export"))

    assert_resumed(launch_to_the_end(launch), two / "ck" / "r", (10, 15))
    assert_same_as_one_process(one, two)
