"""Devices placed before TensorFlow starts: for each app, in a subprocess, the environment CUDA
reads (CUDA_VISIBLE_DEVICES, memory growth) is set before the first device listing; SLURM's
GPU binding and launch_local's --gpus_per_worker; a GPU expected and not found is one line;
precision 'auto' by compute capability."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from research import devices, machine
from research.training.config import TrainConfig

pytestmark = pytest.mark.gpu
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def probe(tmp_path, module, *args, env=None, name="probe"):
    """What `module` had set when TensorFlow first listed the devices."""
    out = tmp_path / f"{name}.json"
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(DEVICES_PROBE_OUT=str(out), **extra)
    res = subprocess.run([sys.executable, os.path.join(TESTS, "devices_probe.py"), module,
                          *args], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.exists(), f"{module} finished without listing a device:\n{res.stderr[-2000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fake_run(syn, tmp_path_factory):
    """A run folder (config.json) and an export (metadata.json, model.keras) that get every
    app past its checks to the point where it needs a device."""
    root = tmp_path_factory.mktemp("devices")
    run = root / "ck" / "r"
    (run / "export").mkdir(parents=True)
    cfg = TrainConfig(data_dir=syn, run_name="r", checkpoint_dir=str(root / "ck"))
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    import zipfile

    with zipfile.ZipFile(run / "export" / "model.keras", "w") as z:  # whole, if not a model
        z.writestr("config.json", "{}")
    (run / "export" / "metadata.json").write_text(json.dumps({
        "objective": "multiclass", "positive_class": "cat", "positive_class_id": 3,
        "class_names": ["a"] * 10, "image_shape": [32, 32, 3], "scale": "unit",
        "threshold": 0.5, "tta": False}))
    image = root / "cat.png"
    import numpy as np
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    return root


APPS = {
    "train": lambda syn, r: ["research.apps.train", f"--data_dir={syn}", "--run_name=t",
                             f"--checkpoint_dir={r}/ck2", f"--log_dir={r}/logs"],
    "evaluate": lambda syn, r: ["research.apps.evaluate", "--run_name=r",
                                f"--checkpoint_dir={r}/ck"],
    "explain": lambda syn, r: ["research.apps.explain", "--model=vgg16", "--weights=none",
                               f"--images={r}/cat.png", f"--out_dir={r}/ex"],
    "predict": lambda syn, r: ["research.apps.predict", f"--model={r}/ck/r/export/model.keras",
                               f"--images={r}/cat.png"],
    "export": lambda syn, r: ["research.apps.export", f"--model={r}/ck/r/export/model.keras"],
    "compare": lambda syn, r: ["research.apps.compare", "--runs=r", f"--checkpoint_dir={r}/ck",
                               f"--output={r}/cmp"],
    "lab": lambda syn, r: ["research.apps.lab", f"--workdir={r}/lab", f"--source={syn}",
                           "--stages=scratch"],
}


@pytest.mark.slow
@pytest.mark.parametrize("app,growth",
                         [(a, True) for a in sorted(APPS)] + [("train", False)])
def test_every_app_places_devices_before_tensorflow_lists_them(
        syn, fake_run, tmp_path, app, growth):
    args = APPS[app](syn, fake_run) + [f"--gpu_memory_growth={str(growth).lower()}"]
    seen = probe(tmp_path, *args)
    assert seen["TF_FORCE_GPU_ALLOW_GROWTH"] == str(growth).lower(), (app, seen)


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost",
         "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURMD_NODENAME":
         "localhost", "SLURM_GPUS_ON_NODE": "4", "RESEARCH_PORT": "23456"}


@pytest.mark.parametrize("local,expected", [("0", "0,1"), ("1", "2,3")])
def test_a_slurm_task_gets_its_gpus_before_cuda_starts(syn, tmp_path, local, expected):
    env = {**SLURM, "SLURM_PROCID": local, "SLURM_LOCALID": local}
    seen = probe(tmp_path, *APPS["train"](syn, tmp_path), "--strategy=multi_worker", env=env)
    assert seen["CUDA_VISIBLE_DEVICES"] == expected


def test_slurm_binding_rules():
    env = {**SLURM, "SLURM_LOCALID": "1"}
    assert devices.slurm_task_gpus(env) == "2,3"
    # SLURM made physical GPUs 4-7 visible to the step: the task's share of those
    assert devices.slurm_task_gpus({**env, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == "6,7"
    # --gpus-per-task bound the task already: left alone
    assert devices.slurm_task_gpus({**env, "CUDA_VISIBLE_DEVICES": "5,6"}) is None
    assert devices.slurm_task_gpus({**env, "SLURM_GPUS_ON_NODE": "0"}) is None
    with pytest.raises(devices.DeviceError, match="1 GPU.*2 tasks"):
        devices.slurm_task_gpus({**env, "SLURM_GPUS_ON_NODE": "1"})


@pytest.mark.slow
def test_launch_local_gives_each_worker_its_gpus_before_it_starts(syn, tmp_path):
    fake_smi = tmp_path / "bin" / "nvidia-smi"
    fake_smi.parent.mkdir()
    fake_smi.write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: Fake (UUID: x$i)\"; done\n")
    fake_smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PATH=f"{fake_smi.parent}{os.pathsep}{env['PATH']}",
               PYTHONPATH=os.pathsep.join([TESTS, env.get("PYTHONPATH", "")]),
               DEVICES_PROBE_OUT=str(tmp_path / "w"), DEVICES_PROBE_MODULE="research.apps.train")
    cmd = [sys.executable, "-m", "research.apps.launch_local", "--workers=2",
           "--gpus_per_worker=2", "--gpu_memory_growth=false", "--module=devices_probe", "--",
           *APPS["train"](syn, tmp_path)[1:]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    seen = [json.loads((tmp_path / f"w.{i}").read_text()) for i in (0, 1)]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in seen] == ["0,1", "2,3"]
    assert all(s["TF_FORCE_GPU_ALLOW_GROWTH"] == "false" for s in seen)
    res = subprocess.run([*cmd[:4], "--gpus_per_worker=3", *cmd[5:]], capture_output=True,
                         text=True, timeout=60, env=env)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "error: --gpus_per_worker=3: 2 workers need 6 GPUs, 4 present "
        "(CUDA_VISIBLE_DEVICES=unset, nvidia-smi -L)")


def test_split_gpus():
    assert devices.split_gpus(2, 0, {"CUDA_VISIBLE_DEVICES": "3,4,5,6"}) == ["3,4", "5,6"]
    assert devices.split_gpus(4, 0, {"CUDA_VISIBLE_DEVICES": "3"}) == [None] * 4
    assert devices.split_gpus(2, 1, {"CUDA_VISIBLE_DEVICES": "3,4,5"}) == ["3", "4"]
    with pytest.raises(devices.DeviceError, match="2 workers need 4 GPUs, 3 present"):
        devices.split_gpus(2, 2, {"CUDA_VISIBLE_DEVICES": "3,4,5"})


@pytest.mark.skipif(os.environ.get("RESEARCH_TESTS_ON_GPU") == "1", reason="a GPU is there")
def test_a_gpu_expected_and_not_found_is_one_line_with_cudas_reason(syn, tmp_path):
    """CUDA_VISIBLE_DEVICES names a GPU on this machine without one: one line that says why
    a GPU was expected and quotes CUDA (or the build), not a quiet CPU run."""
    cmd = [sys.executable, "-m", *APPS["train"](syn, tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: CUDA_VISIBLE_DEVICES=0, but TensorFlow sees no GPU: "), last
    assert "CUDA_VISIBLE_DEVICES= to run on the CPU" in last
    assert not os.path.exists(tmp_path / "ck2" / "t" / "config.json")
    assert devices.gpu_expected("mirrored", 0, {"PATH": ""}) is not None
    assert devices.gpu_expected("mirrored", 2, {"PATH": ""}) is None
    assert devices.gpu_expected("auto", 0, {"PATH": "", "CUDA_VISIBLE_DEVICES": ""}) is None


@pytest.mark.parametrize("capability,float16,expected", [
    ((7, 0), True, "mixed_float16"), ((7, 5), True, "mixed_float16"),
    ((8, 0), True, "mixed_bfloat16"), ((9, 0), True, "mixed_bfloat16"),
    ((7, 5), False, "float32"), ((8, 6), False, "mixed_bfloat16")])
def test_precision_auto_by_compute_capability(capability, float16, expected):
    assert machine.resolve_precision("auto", capability, float16) == expected


def test_the_device_line_reads_the_capability_from_the_device_details(monkeypatch):
    import tensorflow as tf

    gpus = [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU"),
            tf.config.PhysicalDevice("/physical_device:GPU:1", "GPU")]
    details = {gpus[0].name: {"device_name": "NVIDIA A100", "compute_capability": (8, 0)},
               gpus[1].name: {"device_name": "Tesla T4", "compute_capability": (7, 5)}}
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda d: details[d.name])
    found = devices.describe(gpus)
    assert found == devices.Devices(("NVIDIA A100", "Tesla T4"), (7, 5))
    assert devices.precision_note(found) == "compute capability 7.5, auto: mixed_float16"
