"""Faults of shared machines: bad numbers, preemption, corrupt checkpoints, a second process
on a run, and a resume with changed settings."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import helpers
import warm
from research import runs
from research.training import checkpoints, loop, preemption, resume, runlock
from research.training.config import ConfigError

TINY = helpers.TINY_NET


def config(syn, tmp_path, **kw):
    return helpers.tiny_config(syn, tmp_path, **{"steps_per_loop": 2, **kw})


BAD_NUMBERS = [
    ("learning_rate", -1.0), ("learning_rate", float("nan")), ("eval_every_steps", -1),
    ("eval_every_steps", 0), ("eval_batch_size", 0), ("checkpoint_every_steps", 0),
    ("keep_checkpoints", 0), ("momentum", 1.0), ("momentum", -0.1), ("weight_decay", -1e-4),
    ("label_smoothing", 1.0), ("warmup_epochs", -1.0), ("final_lr_fraction", 1.5),
    ("clip_norm", 0.0), ("cpu_replicas", -1), ("patience", -1), ("stop_at_step", 0),
    ("gradcam_images", -1), ("seed", -1), ("batch_size", 0), ("train_steps", 0),
    ("steps_per_loop", 0), ("epochs", -1.0),
]


@pytest.mark.parametrize("field,value", BAD_NUMBERS)
def test_bad_number_fails_fast_with_one_line(syn, tmp_path, field, value):
    with pytest.raises(ConfigError) as e:
        config(syn, tmp_path, **{field: value}).validate()
    msg = str(e.value)
    assert msg.startswith(f"--{field}: ") and "\n" not in msg, msg
    assert not os.path.exists(tmp_path / "ck")


def test_good_numbers_pass(syn, tmp_path):
    config(syn, tmp_path, learning_rate=0.0, momentum=0.0, label_smoothing=0.0,
           eval_every_steps=1, clip_norm=1.0, final_lr_fraction=1.0, seed=2**32 - 1).validate()


def train_cmd(syn, root, *extra):
    return [sys.executable, "-m", "research.apps.train", f"--data_dir={syn}", "--run_name=r",
            f"--checkpoint_dir={root}/ck", f"--log_dir={root}/logs", "--batch_size=32",
            "--widths=8,16", "--res_blocks=1,0", "--stem_width=8", "--learning_rate=0.03",
            "--gradcam_images=0", "--progress=false", "--precision=float32", "--deterministic",
            "--eval_every_steps=1000", *extra]


def test_bad_flag_in_the_app_is_one_line(syn, tmp_path):
    res = subprocess.run(train_cmd(syn, tmp_path, "--learning_rate=-1"), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == "error: --learning_rate: must be >= 0, got -1.0"
    assert "Traceback" not in res.stderr and not os.path.exists(tmp_path / "ck")


def wait_for(proc, pattern, timeout):
    """Reads proc's stderr lines until one contains `pattern`; returns all read so far."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if pattern in line:
            return lines
    proc.kill()
    raise AssertionError(f"{pattern!r} not seen:\n{''.join(lines[-30:])}")


def checkpoint_values(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if "save_counter" not in k}


@pytest.mark.slow
def test_sigterm_and_kill_resume_exactly(syn, tmp_path):
    """SIGTERM: a checkpoint past the last periodic one, status 75, the same command
    finishes the run. kill -9 after a periodic checkpoint: the stale lock is taken over and
    the resumed run ends on the same weights as the SIGTERM'd one, bit for bit."""
    flags = ("--train_steps=40", "--steps_per_loop=2", "--checkpoint_every_steps=1000")
    a = tmp_path / "a"
    proc = warm.Popen(train_cmd(syn, a, *flags), stderr=subprocess.PIPE, text=True)
    wait_for(proc, "train | step", 120)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == preemption.PREEMPTED_EXIT, err[-3000:]
    step = int(tf.train.latest_checkpoint(f"{a}/ck/r").rsplit("-", 1)[1])
    assert 0 < step < 40 and step % 2 == 0
    assert f"preempted by SIGTERM at step {step}" in err.strip().splitlines()[-1]
    assert not os.path.exists(f"{a}/ck/r.lock")
    res = warm.run(train_cmd(syn, a, *flags), timeout=300)
    assert res.returncode == 0 and f"at step {step}" in res.stderr, res.stderr[-3000:]
    summary = json.loads((a / "ck" / "r" / "train_summary.json").read_text())
    assert [(s["start_step"], s["final_step"]) for s in summary["sessions"]] == [
        (0, step), (step, 40)]

    b = tmp_path / "b"
    flags_b = ("--train_steps=40", "--steps_per_loop=2", "--checkpoint_every_steps=10")
    proc = warm.Popen(train_cmd(syn, b, *flags_b), stderr=subprocess.PIPE, text=True)
    wait_for(proc, "train | step     12", 120)
    proc.kill()
    proc.wait(timeout=60)
    assert os.path.exists(f"{b}/ck/r.lock")
    res = warm.run(train_cmd(syn, b, *flags_b), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Taking over the stale lock" in res.stderr and "Resumed" in res.stderr
    va = checkpoint_values(tf.train.latest_checkpoint(f"{a}/ck/r"))
    vb = checkpoint_values(tf.train.latest_checkpoint(f"{b}/ck/r"))
    assert va.keys() == vb.keys()
    for k in va:
        np.testing.assert_array_equal(va[k], vb[k], err_msg=k)


def truncate(prefix):
    path = prefix + ".data-00000-of-00001"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_and_resume_checks(syn, tmp_path):
    cfg = config(syn, tmp_path, train_steps=12, checkpoint_every_steps=4, eval_every_steps=100)
    loop.train_and_evaluate(config(syn, tmp_path, train_steps=12, checkpoint_every_steps=4,
                                   eval_every_steps=100, stop_at_step=8))
    assert tf.train.latest_checkpoint(cfg.run_dir).endswith("ckpt-8")
    truncate(os.path.join(cfg.run_dir, "ckpt-8"))
    summary = loop.train_and_evaluate(cfg)
    assert summary["final_step"] == 12 and summary["start_step"] == 4
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "corrupt"))) == [
        "ckpt-8.data-00000-of-00001", "ckpt-8.index"]
    assert checkpoints.checkpoint_problem(os.path.join(cfg.run_dir, "ckpt-8")) is None  # new one

    # The network may not change; the length may.
    with pytest.raises(resume.ResumeMismatchError, match=r"--widths: \[8, 16\] -> \[8, 32\]"):
        loop.train_and_evaluate(config(syn, tmp_path, train_steps=16, checkpoint_every_steps=4,
                                       eval_every_steps=100,
                                       model_options={**TINY, "widths": (8, 32)}))
    original = (tmp_path / "ck" / "t" / "config.json").read_text()
    summary = loop.train_and_evaluate(config(syn, tmp_path, train_steps=16,
                                             checkpoint_every_steps=4, eval_every_steps=100))
    assert summary["final_step"] == 16
    assert (tmp_path / "ck" / "t" / "config.json").read_text() == original
    sessions = [json.loads(x) for x in open(os.path.join(cfg.run_dir, runs.SESSIONS))]
    assert [s["start_step"] for s in sessions] == [0, 4, 12]
    assert sessions[-1]["changed"] == {"stop_at_step": [8, None], "train_steps": [12, 16]}

    # Other data under the same flags is refused too.
    other = tmp_path / "other"
    helpers.make_synthetic_tfrecords(str(other), n_train=300, n_test=50, seed=1)
    with pytest.raises(resume.ResumeMismatchError, match="data_dir"):
        loop.train_and_evaluate(config(str(other), tmp_path, train_steps=20))

    # No readable checkpoint left: an error naming each, before any work.
    for prefix in tf.train.get_checkpoint_state(cfg.run_dir).all_model_checkpoint_paths:
        truncate(prefix)
    before = sorted(os.listdir(cfg.run_dir))
    with pytest.raises(checkpoints.CheckpointError, match="ckpt-16 .*ckpt-12 .*ckpt-8 "):
        loop.train_and_evaluate(config(syn, tmp_path, train_steps=20))
    assert sorted(os.listdir(cfg.run_dir)) == before
    with pytest.raises(ConfigError, match="--checkpoint=latest: .*ckpt-16 cannot be read"):
        checkpoints.resolve_checkpoint(cfg.run_dir, "latest")  # evaluate names it before any work


def test_run_lock(tmp_path):
    run = str(tmp_path / "ck" / "r")
    with runlock.RunLock(run):
        with pytest.raises(runlock.RunLockedError, match=f"pid {os.getpid()} on "
                           f"{socket.gethostname()} since"):
            runlock.RunLock(run).acquire()
    assert not os.path.exists(run + ".lock")

    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        for pid, refused in ((live.pid, True), (dead.pid, False)):
            with open(run + ".lock", "w") as f:
                json.dump({"pid": pid, "host": socket.gethostname(), "started": "then"}, f)
            if refused:
                with pytest.raises(runlock.RunLockedError, match=f"pid {pid} .* since then"):
                    runlock.RunLock(run).acquire()
            else:
                lock = runlock.RunLock(run).acquire()  # stale: taken over
                assert json.load(open(run + ".lock"))["pid"] == os.getpid()
                lock.release()
    finally:
        live.kill()
        live.wait()
    # A holder on another host cannot be checked: refused.
    with open(run + ".lock", "w") as f:
        json.dump({"pid": dead.pid, "host": "elsewhere", "started": "then"}, f)
    with pytest.raises(runlock.RunLockedError, match="on elsewhere"):
        runlock.RunLock(run).acquire()


def test_preemption_stops_at_the_next_boundary(syn, tmp_path):
    """In process: a real SIGTERM arrives during the run; the loop stops at the next call
    boundary with a checkpoint there, resumably."""
    from research.training.actions import Action

    class SignalAt(Action):
        def __call__(self, ctx):
            if ctx.step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = config(syn, tmp_path, train_steps=30, checkpoint_every_steps=100,
                 eval_every_steps=100)
    with preemption.Preemption() as signal_catcher:
        summary = loop.train_and_evaluate(cfg, actions=[SignalAt(), signal_catcher])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal_catcher.stopped_at == 6 and summary["final_step"] == 6
    assert tf.train.latest_checkpoint(cfg.run_dir).endswith("ckpt-6")
    assert "export" not in summary
