"""Nothing lost, ever: a lost or unreadable checkpoint index, a full disk, a careless
--overwrite, an edited manifest, and the history of a resumed run."""

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers
import warm
from research import files, runs
from research.apps import config_flags
from research.data import manifest as manifest_lib
from research.data import pipeline, tfrecords
from research.evaluation import run as scoring
from research.training import checkpoints, loop, resume
from research.training.config import load_run_config


def config(syn, tmp_path, **kw):
    return helpers.tiny_config(syn, tmp_path, **{"steps_per_loop": 2, "train_steps": 8,
                                                 "checkpoint_every_steps": 2,
                                                 "eval_every_steps": 4, **kw})


def _files(folder):
    return {n: os.path.getmtime(os.path.join(folder, n)) for n in os.listdir(folder)
            if os.path.isfile(os.path.join(folder, n))}


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "unreadable"])
def test_a_lost_index_is_rebuilt_not_overwritten(syn, tmp_path, damage):
    cfg = config(syn, tmp_path, keep_checkpoints=10)
    loop.train_and_evaluate(cfg)
    index = os.path.join(cfg.run_dir, checkpoints.INDEX)
    history = open(os.path.join(cfg.run_dir, runs.HISTORY)).read()
    summary = runs.read_summary(cfg.run_dir)
    if damage == "deleted":
        os.remove(index)
    else:
        with open(index, "w") as f:
            f.write("model_checkpoint_path: \x00garbage {{{\n")
    before = {n: t for n, t in _files(cfg.run_dir).items() if n.startswith("ckpt-")}
    again = loop.train_and_evaluate(cfg)  # finished: nothing to do, nothing overwritten
    assert again == summary
    assert open(os.path.join(cfg.run_dir, runs.HISTORY)).read() == history
    assert {n: t for n, t in _files(cfg.run_dir).items() if n.startswith("ckpt-")} == before
    assert tf.train.latest_checkpoint(cfg.run_dir).endswith("ckpt-8")  # the index is back

    if damage != "deleted":
        return  # the part below does not depend on `damage`: once is enough
    # An unfinished run without its index resumes where it was, not at step 0.
    mid = config(syn, tmp_path / "mid", train_steps=12)
    loop.train_and_evaluate(config(syn, tmp_path / "mid", train_steps=12, stop_at_step=6))
    os.remove(os.path.join(mid.run_dir, checkpoints.INDEX))
    assert loop.train_and_evaluate(mid)["start_step"] == 6


def test_a_run_that_cannot_be_resumed_is_not_started_over(syn, tmp_path):
    cfg = config(syn, tmp_path)
    loop.train_and_evaluate(cfg)
    shutil.move(os.path.join(cfg.run_dir, runs.CONFIG), tmp_path / "config.json")
    with pytest.raises(resume.RunWouldBeLostError, match=r"ckpt-4, ckpt-6, ckpt-8\) but no "
                       r"config.json.*--restart.*--run_name"):
        loop.train_and_evaluate(cfg)
    shutil.move(tmp_path / "config.json", os.path.join(cfg.run_dir, runs.CONFIG))
    for prefix in checkpoints.on_disk(cfg.run_dir):
        for path in tf.io.gfile.glob(prefix + ".*"):
            os.remove(path)
    os.remove(os.path.join(cfg.run_dir, checkpoints.INDEX))
    with pytest.raises(resume.RunWouldBeLostError, match="trained to step 8 .*no checkpoint"):
        loop.train_and_evaluate(cfg)
    assert runs.read_summary(cfg.run_dir)["final_step"] == 8  # untouched
    assert loop.train_and_evaluate(dataclasses.replace(cfg, restart=True))["final_step"] == 8


def test_the_fallback_keeps_the_older_checkpoints_rotating(syn, tmp_path):
    cfg = config(syn, tmp_path, train_steps=14, keep_checkpoints=3, eval_every_steps=100)
    loop.train_and_evaluate(dataclasses.replace(cfg, stop_at_step=6))  # ckpt-2, 4, 6
    path = os.path.join(cfg.run_dir, "ckpt-6.data-00000-of-00001")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert loop.train_and_evaluate(cfg)["start_step"] == 4
    # ckpt-2 and ckpt-4 stayed in the index after the fallback and rotated out as usual.
    assert [os.path.basename(p) for p in checkpoints.on_disk(cfg.run_dir)] == [
        "ckpt-10", "ckpt-12", "ckpt-14"]
    listed = tf.train.get_checkpoint_state(cfg.run_dir).all_model_checkpoint_paths
    assert [os.path.basename(p) for p in listed] == ["ckpt-10", "ckpt-12", "ckpt-14"]


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_loses_nothing(syn, tmp_path, monkeypatch):
    cfg = config(syn, tmp_path)
    loop.train_and_evaluate(dataclasses.replace(cfg, stop_at_step=4))
    real_save = tf.train.CheckpointManager.save
    monkeypatch.setattr(tf.train.CheckpointManager, "save", _no_space)
    with pytest.raises(files.OutOfSpaceError) as e:
        loop.train_and_evaluate(cfg)
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_status == files.OUT_OF_SPACE_EXIT == 74
    assert msg.startswith("out of disk space writing checkpoint 6 to ") and " free)" in msg
    assert "run the same command again" in msg
    monkeypatch.setattr(tf.train.CheckpointManager, "save", real_save)
    assert loop.train_and_evaluate(cfg)["start_step"] == 4  # older checkpoints survived

    # The export: the previous model stays, no truncated file, no leftover.
    export = runs.exported_model_path(cfg.checkpoint_dir, cfg.run_name)
    good = open(export, "rb").read()

    def half_then_full(model, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(good[:1000])
        _no_space()

    monkeypatch.setattr(keras.Model, "save", half_then_full)
    with pytest.raises(files.OutOfSpaceError, match="writing the exported model"):
        loop.train_and_evaluate(dataclasses.replace(cfg, train_steps=10))
    assert open(export, "rb").read() == good
    assert sorted(os.listdir(os.path.dirname(export))) == ["metadata.json", "model.keras",
                                                           "saved_model"]


def test_the_app_exits_74_on_a_full_disk():
    with pytest.raises(SystemExit) as e:
        config_flags.fail(files.out_of_space("a report", "/somewhere/report.html"))
    assert e.value.code == 74


def test_a_real_full_disk_leaves_the_previous_file(tmp_path):
    """On a small tmpfs where one can be mounted (root on Linux); else skipped."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        target = str(mnt / "report.json")
        files.write_json(target, {"ok": 1})
        with pytest.raises(files.OutOfSpaceError, match=r"writing the report .*free\)"):
            files.write_bytes(target, b"x" * 200_000, "the report")
        assert json.load(open(target)) == {"ok": 1}
        assert os.listdir(mnt) == ["report.json"]
    finally:
        subprocess.run(["umount", str(mnt)])


def test_overwrite_deletes_only_what_we_wrote(syn, tmp_path):
    foreign = tmp_path / "thesis"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "important.txt").write_text("mine")
    (foreign / "sub" / "thesis.tex").write_text("mine")
    with pytest.raises(tfrecords.OutputExistsError, match=r"not a TFRecords folder .*"
                       r"important.txt, sub/; nothing was deleted"):
        tfrecords.check_out_dir(str(foreign), overwrite=True)
    ours = tmp_path / "ours"
    shutil.copytree(syn, ours)
    tfrecords.check_out_dir(str(ours), overwrite=True)  # all ours: may be replaced
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(tfrecords.OutputExistsError, match="also holds .*notes.txt"):
        tfrecords.check_out_dir(str(ours), overwrite=True)
    # The app decides before it reads the source (a missing source would be the other error).
    res = warm.run([sys.executable, "-m", "research.apps.make_tfrecords",
                    f"--source={tmp_path}/no_such.tar", f"--out_dir={foreign}",
                    "--overwrite"], timeout=300)
    assert res.returncode == 1
    assert "is not a TFRecords folder" in res.stderr.strip().splitlines()[-1]
    assert (foreign / "important.txt").read_text() == "mine"


def _edit(folder, fn):
    path = os.path.join(folder, manifest_lib.MANIFEST)
    m = json.load(open(path))
    fn(m)
    json.dump(m, open(path, "w"), indent=1)


def test_edited_manifests_are_caught_before_any_work(syn, tmp_path):
    cfg = config(syn, tmp_path)
    loop.train_and_evaluate(cfg)
    cases = {
        "inconsistent": lambda m: m["splits"]["test"].update(num_examples=99),
        "consistent": lambda m: _consistent(m, 1),
        "consistent, no digest": lambda m: (_consistent(m, 1), m.pop("digest")),
    }
    for name, edit in cases.items():
        data = tmp_path / name.replace(" ", "_").replace(",", "")
        shutil.copytree(syn, data)
        _edit(str(data), edit)
        pipeline._verified.cache_clear()
        run_cfg = load_run_config(cfg.checkpoint_dir, cfg.run_name, str(data))
        with pytest.raises(pipeline.DataError) as e:
            scoring.evaluate_run(run_cfg, "test", progress=False)
        msg = str(e.value)
        assert str(data) in msg and "\n" not in msg, (name, msg)
        with pytest.raises(pipeline.DataError):
            loop.train_and_evaluate(dataclasses.replace(cfg, data_dir=str(data),
                                                        run_name="other"))
        assert not os.path.exists(os.path.join(cfg.checkpoint_dir, "other", runs.CONFIG))


def _consistent(m, k):
    """k more examples in the first test shard, its split and its first class: every sum
    still adds up, but the shard holds k records fewer than listed."""
    s = m["splits"]["test"]
    s["shards"][0]["num_examples"] += k
    s["num_examples"] += k
    first = next(iter(s["class_counts"]))
    s["class_counts"][first] += k
    if first == m["positive_class"]:
        s["num_positive"] += k


@pytest.mark.slow
def test_train_loss_history_is_the_same_after_a_resume(syn, tmp_path):
    whole = config(syn, tmp_path / "whole", train_steps=12, eval_every_steps=6,
                   checkpoint_every_steps=2, deterministic=True)
    loop.train_and_evaluate(whole)
    parts = config(syn, tmp_path / "parts", train_steps=12, eval_every_steps=6,
                   checkpoint_every_steps=2, deterministic=True)
    loop.train_and_evaluate(dataclasses.replace(parts, stop_at_step=4))
    loop.train_and_evaluate(parts)
    a, b = runs.read_history(whole.run_dir), runs.read_history(parts.run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [6, 12]
    for x, y in zip(a, b):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-6)
        assert y["train_accuracy"] == pytest.approx(x["train_accuracy"], rel=1e-6)


def test_flag_errors_and_the_lock_come_before_the_heavy_imports(syn, tmp_path):
    base = [sys.executable, "-X", "importtime", "-m", "research.apps.train",
            f"--data_dir={syn}", f"--checkpoint_dir={tmp_path}/ck", "--run_name=r"]
    res = subprocess.run(base + ["--optimizer=nosuch"], capture_output=True, text=True,
                         timeout=120)
    lines = [x for x in res.stderr.splitlines() if not x.startswith("import time:")]
    assert res.returncode == 1 and lines == [
        "error: flag --optimizer=nosuch: value should be one of <sgd|sgd_l2|adamw|muon>"]
    assert "tensorflow" not in res.stderr  # not even imported
    from research.training.runlock import RunLock

    with RunLock(str(tmp_path / "ck" / "r")):
        res = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "is being trained by pid" in res.stderr
    assert not any("tensorflow" in x for x in res.stderr.splitlines()
                   if x.startswith("import time:"))


def test_a_checkpoint_missing_a_weight_of_the_model_is_refused_not_scored(tmp_path):
    """A layer added to the network since the checkpoint was written shifts Keras' layer
    order: the restore must fail naming the weight, not leave it at its initial value."""
    import keras
    import tensorflow as tf

    from research.training import checkpoints

    def net(extra: bool):
        x = inp = keras.Input((4,))
        x = keras.layers.Dense(3, name="hidden")(x)
        if extra:
            x = keras.layers.Flatten(name="flat")(x)
        return keras.Model(inp, keras.layers.Dense(2, name="logits")(x), name="net")

    old = net(False)
    path = tf.train.Checkpoint(model=old).write(str(tmp_path / "ckpt"))
    same = net(False)
    checkpoints.restore_model(same, path)
    np.testing.assert_array_equal(same.get_layer("logits").kernel.numpy(),
                                  old.get_layer("logits").kernel.numpy())
    with pytest.raises(checkpoints.CheckpointError, match="logits/kernel"):
        checkpoints.restore_model(net(True), path)
