"""The lab: the in-memory training stream replays the TFRecord one batch for batch, and the
whole lab runs end to end on a tiny synthetic CIFAR-10 archive (the cpu profile shrunk by
flags), leaves every stage's outputs and a self-contained report, and reuses them all on a
second invocation."""

import base64
import html.parser
import json
import os
import re
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import helpers
import warm
from research.data import pipeline
from helpers import LOG_LINE, event_tags
from research.lab import memory_check, profiles
from research.lab import report as lab_report
from research.lab.stages import STAGES


@pytest.mark.parametrize("shuffle_buffer,start_step,replicas", [
    (16384, 0, 1), (50, 7, 1), (64, 3, 2)])
def test_memory_stream_is_the_tfrecord_stream(syn, shuffle_buffer, start_step, replicas):
    manifest = pipeline.load_manifest(syn)
    arrays = memory_check.load_train_split(syn)
    for rid in range(replicas):
        ctx = tf.distribute.InputContext(replicas, rid, replicas) if replicas > 1 else None
        kw = dict(seed=3, shuffle_buffer=shuffle_buffer, start_step=start_step,
                  global_batch_size=16, input_context=ctx)
        disk = pipeline.make_dataset(syn, "train", 16 // replicas, training=True, **kw)
        mem = memory_check.memory_dataset(arrays, manifest, 16 // replicas, **kw)
        for a, b in zip(disk.take(40), mem.take(40)):  # more than two epochs
            for k in ("image", "label", "class_id"):
                np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())


class _Page(html.parser.HTMLParser):
    """Images, links, table rows (of numbers), header cells, and the <summary> of each table
    folded in a <details> block, of the report."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.rows, self.headers = [], [], [], []
        self.folded: dict[str, int] = {}  # <summary> text: tables in its <details>
        self._table_info, self._row, self._cell, self._th = [], None, None, None
        self._summary = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        elif tag in ("a", "link", "script"):
            self.links.append(a.get("href") or a.get("src") or "")
        elif tag == "table":
            self._table_info.append(a.get("class") in ("info", "facts"))
            if self._summary is not None:
                self.folded[self._summary] += 1
        elif tag == "tr":
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag == "th":
            self._th = ""
        elif tag == "summary":
            self._summary = ""

    def handle_endtag(self, tag):
        if tag == "th" and self._th is not None:
            self.headers.append(self._th)
            self._th = None
        elif tag == "summary":
            self.folded[self._summary] = 0
        elif tag == "details":
            self._summary = None
        elif tag == "td" and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row and not self._table_info[-1]:
                self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._table_info.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._th is not None:
            self._th += data
        if self._summary is not None and self._summary not in self.folded:
            self._summary += data


def lab(workdir, *flags, timeout=900, fresh=False):
    """(the lab's CompletedProcess, its seconds); `fresh`: in a new interpreter, not a warm
    one (tests/warm.py), to see what TensorFlow's import says too."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    res = warm.run([sys.executable, "-m", "research.apps.lab", *flags], cwd=workdir,
                   timeout=timeout, env=env, fresh=fresh)
    return res, time.perf_counter() - start


TINY = ["--weights=source_task", "--train_steps=8", "--batch_size=16", "--eval_every_steps=8",
        "--eval_batch_size=100", "--widths=8,16", "--res_blocks=1,0", "--stem_width=8",
        "--transfer_epochs=0.4", "--gradcam_images=0", "--precision=float32",
        "--explain_per_class=2", "--faithfulness_steps=4", "--num_filters=2",
        "--filter_steps=2", "--few_labels=0.5", "--few_labels_epochs=1"]


def lab_sources(tmp_path):
    """(a tiny CIFAR-10 archive, a tiny dogs-vs-cats folder of photos of their own sizes, an
    empty workdir) for a lab run."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    helpers.make_cifar10_python(str(archive), per_batch=40)
    photos = tmp_path / "dvc"
    for c in ("cats", "dogs"):
        (photos / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(helpers.rgb(70, 90, seed=i + 10 * (c == "dogs"))).save(
                photos / c / f"{c[:-1]}.{i}.png")
    work = tmp_path / "work"
    work.mkdir()
    return archive, photos, work


@pytest.mark.slow
def test_lab_end_to_end_and_reuse(tmp_path):
    archive, photos, work = lab_sources(tmp_path)
    photo = tmp_path / "my_cat.png"
    Image.fromarray(helpers.rgb(45, 60, seed=3)).save(photo)
    flags = [f"--source={archive}", f"--images={photo}", f"--photo_source={photos}",
             "--photo_counts=4,2,2", *TINY]

    bad, _ = lab(work, "--stages=data,bogus")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --stages: bogus")

    first, t1 = lab(work, *flags, fresh=True)  # TensorFlow's import noise checked below
    assert first.returncode == 0, first.stderr[-4000:]
    noise = re.compile(r"cuinit|cuda|cudart|absl::InitializeLog|sharding callback|retracing",
                       re.I)
    said = (first.stdout + first.stderr).splitlines()
    assert not [line for line in said if noise.search(line)], "TensorFlow's noise got through"
    assert not [line for line in said if "\x1b[" in line], "ANSI escapes in a redirected log"
    out = first.stdout.splitlines()
    assert out[0] == f"source: {archive} (--source)"
    stages = [s.name for s in STAGES]  # every stage ran (the source task: for the fallback)
    for s in stages:
        assert f"[lab] {s}: done" in first.stdout, s

    ck, lab_dir = work / "checkpoints", work / "logs" / "lab"
    assert (work / "data" / "cifar10" / "manifest.json").is_file()
    runs = ["lab_scratch", "lab_src_nocat", "lab_transfer_fast_fine_tune_src",
            "lab_mem_tfrecords", "lab_mem_memory"]
    for run in runs:
        assert (ck / run / "export" / "model.keras").is_file(), run
        assert (work / "logs" / run / "train").is_dir(), run  # TensorBoard, side by side
    for run in runs[::2]:
        report = json.loads((ck / run / "eval_test.json").read_text())
        assert report["num_examples"] == 40 and report["split"] == "test"
    comp = json.loads((lab_dir / "lab_compare.json").read_text())
    assert list(comp["runs"]) == ["lab_scratch", "lab_transfer_fast_fine_tune_src"]
    assert (lab_dir / "lab_compare.png").is_file()
    explained = {p.name for p in (lab_dir / "lab_explain").glob("*.png")}
    assert explained == {f"{m}_{w}.png" for m in profiles.METHODS for w in ("test", "photos")}
    assert {"integrated_gradients", "guided_gradcam", "occlusion"} <= set(profiles.METHODS)
    faith = json.loads((lab_dir / "lab_explain" / "faithfulness.json").read_text())
    assert set(faith) == set(comp["runs"])
    assert all(set(v) == set(profiles.METHODS) for v in faith.values())
    vis = {p.name for p in (lab_dir / "lab_visualize").glob("*.png")}
    assert sum("activations" in n for n in vis) == 4 and sum("filters" in n for n in vis) == 4
    # The source task (no cats) is a plain classifier: class accuracy, no detection metric.
    src = json.loads((ck / "lab_src_nocat" / "train_summary.json").read_text())
    assert set(src["final_val"]) == {"class_accuracy", "top5_class_accuracy"}
    assert src["best_val_metric"] == "class_accuracy"
    src_tags = event_tags(work / "logs" / "lab_src_nocat" / "eval")["tags"]
    assert {"class_accuracy", "top5_class_accuracy"} <= src_tags
    assert not {"roc_auc", "pr_auc", "f1", "threshold", "hparams/val_roc_auc"} & src_tags
    # The photos: exact counts, zero-shot and fine-tuned rows on the same held-out photos,
    # the figures drawn on the original photos (70x90 here, not the stored 64x64).
    pm = json.loads((work / "data" / "photos64" / "manifest.json").read_text())
    assert pm["splits"]["test"]["class_counts"] == {"cats": 2, "dogs": 2}
    assert pm["positive_class"] == "cats"
    prec = json.loads((lab_dir / "stages" / "lab_photos.json").read_text())["outputs"]
    assert [r["num_examples"] for r in prec["rows"]] == [4, 4, 4, 4]
    assert prec["rows"][0]["run"].startswith("zero-shot")
    assert prec["rows"][0]["train_seconds"] == 0
    assert prec["class_map"] == {"cats": "cat", "dogs": "dog"}
    figures = {os.path.basename(f) for f in prec["figures"]}
    assert figures == {"photos_explain.png", "photos_mistakes.png"}
    assert (ck / "lab_photos" / "export" / "model.keras").is_file()
    # The few-labels pair: the same fraction of the train split, equal steps, scored on all
    # of test, beside the full-data pair.
    few = json.loads((lab_dir / "stages" / "lab_few_labels.json").read_text())["outputs"]
    assert [r["run"] for r in few["rows"]] == ["lab_few_scratch",
                                               "lab_few_transfer_fast_fine_tune_src"]
    assert few["rows"][0]["steps"] == few["rows"][1]["steps"] > 0
    assert few["rows"][0]["labels"] == few["rows"][1]["labels"]
    assert [r["run"] for r in few["full"]] == ["lab_scratch", "lab_transfer_fast_fine_tune_src"]
    for run in ("lab_few_scratch", "lab_few_transfer_fast_fine_tune_src"):
        assert json.loads((ck / run / "eval_test.json").read_text())["num_examples"] == 40
        cfg = json.loads((ck / run / "config.json").read_text())
        assert cfg["train_fraction"] == 0.5, run
    mem = json.loads((lab_dir / "lab_memory_check.json").read_text())
    assert mem["same_batches"] is True
    assert {"roc_auc", "pr_auc", "f1"} <= set(mem["test"])

    page = _Page()
    text = (lab_dir / "report.html").read_text()
    page.feed(text)
    page.close()
    assert len(page.images) >= 20
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert tf.image.decode_png(png).shape[-1] in (3, 4)
    assert not [h for h in page.links if h.startswith(("http", "//"))]
    assert page.rows
    for row in page.rows:  # every table row has its numbers
        assert all(any(ch.isdigit() for ch in cell) for cell in row[1:]), row
    assert all(h.strip() for h in page.headers), page.headers  # no empty header cell
    head = text.split("<h2", 1)[0]  # the facts under the title: key/value rows only
    assert '<table class="facts"><tbody><tr><th scope="row">written</th>' in head
    assert "<thead>" not in head and '<th scope="row">transfer weights</th>' in head
    for s in stages:  # each stage's flags folded in a <details> block, as a table
        assert page.folded.get(f"{s}: flags") == 1, (s, page.folded)
    assert "flags {" not in text  # no raw JSON paragraphs
    for run in ("lab_scratch", "lab_transfer_fast_fine_tune_src"):
        assert f'alt="{run}: test_confusion.png"' in text, run
    for needle in ("Comparison on the test set", "test ROC-AUC", "deletion AUC",
                   "Reading from disk vs from memory", "tensorboard --logdir",
                   "source-task backbone", "(PR-AUC)", "(class accuracy)",
                   "Real photos: dogs vs cats", "Chollet", "Few labels: where transfer pays"):
        assert needle in text, needle
    md = (lab_dir / "report.md").read_text()
    assert "- **workdir**: " in md and "| | |" not in md
    assert "is a plain classifier of every class but cat" in md
    assert re.search(r"class accuracy [01]\.\d{4}, top-5 accuracy [01]\.\d{4}\.", md)
    assert not re.search(r"\bnan\b", md, re.I), "a NaN in the report"
    assert "scratch: flags:\n```\n" in md
    for target in [line.split("](", 1)[1].rstrip(")") for line in md.splitlines()
                   if line.startswith("![")]:
        assert (lab_dir / target).is_file(), target

    second, t2 = lab(work, *flags)
    assert second.returncode == 0, second.stderr[-4000:]
    for s in stages:
        assert f"[lab] {s}: reused" in second.stdout, s
    assert "done in" not in second.stdout
    assert t2 < t1 / 2, (t1, t2)
    rec = json.loads((lab_dir / "stages" / "lab_scratch.json").read_text())
    assert rec["reused"] is True and rec["ran_seconds"] is not None
    assert "reused" in (lab_dir / "report.html").read_text()

    # A truncated export is one line through the lab too (issue 39): "damaged", exit 1.
    export = ck / "lab_scratch" / "export" / "model.keras"
    export.write_bytes(export.read_bytes()[:1000])
    third, _ = lab(work, *flags, "--stages=explain")
    assert third.returncode == 1, third.stdout[-2000:] + third.stderr[-3000:]
    said = [x for x in third.stderr.splitlines() if x.strip() and not LOG_LINE.match(x)]
    assert len(said) == 1 and said[0].startswith("error: ") and (
        "lab_scratch/export/model.keras is damaged (not a whole .keras archive" in said[0])


def test_report_facts_and_flags(tmp_path):
    doc = lab_report.Doc(str(tmp_path))
    doc.facts([("written", "today"), ("command", "a | b")])
    doc.facts([(k, lab_report.flag_value(v)) for k, v in {
        "runs": ["a", "b"], "steps": 8, "layers": {"a": ["c1"]}, "note": "x"}.items()],
        summary="visualize: flags")
    page = _Page()
    page.feed("\n".join(doc.html))
    assert page.headers == ["written", "command", "runs", "steps", "layers", "note"]
    assert page.folded == {"visualize: flags": 1}
    assert "<thead>" not in "".join(doc.html) and "<td>a,b</td>" in doc.html[1]
    assert '<td>{&quot;a&quot;: [&quot;c1&quot;]}</td>' in doc.html[1]
    assert doc.md[:2] == ["- **written**: today", "- **command**: a | b"]
    assert doc.md[-1] == ("visualize: flags:\n```\nruns = a,b\nsteps = 8\n"
                          'layers = {"a": ["c1"]}\nnote = x\n```\n')


def test_weights_fall_back_to_the_source_task_only_when_allowed(tmp_path, monkeypatch):
    from research.lab import weights
    from research.lab.lab import Lab
    from research.lab.settings import LabSettings
    from research.models.backbones import BackboneError

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty cache

    def offline(backbone):
        raise BackboneError(f"--weights=imagenet: could not get the ImageNet weights of "
                            f"{backbone}; place vgg16_weights_tf_dim_ordering_tf_kernels_notop"
                            ".h5 in ...")

    monkeypatch.setattr(weights, "fetch_imagenet", offline)
    auto = Lab(LabSettings(workdir=str(tmp_path)), "cifar10", "")
    weights.resolve_weights(auto)
    assert auto.weights == "lab_src_nocat" and "Fallback" in auto.weights_note
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in auto.weights_note
    key, settings = weights.transfer_settings(auto)
    assert settings["model_options"]["weights"] == "lab_src_nocat" and key.endswith("_src")
    strict = Lab(LabSettings(workdir=str(tmp_path), weights="imagenet"), "cifar10", "")
    with pytest.raises(BackboneError, match="notop.h5"):
        weights.resolve_weights(strict)


def test_stage_notes_a_resumed_training_and_reads_old_summaries(syn):
    from research.lab import detectors as stages
    from research.training.config import TrainConfig

    summary = {"run_name": "src", "train_seconds": 2847.4, "sessions": [
        {"start_step": 0, "final_step": 50}, {"start_step": 50, "final_step": 450},
        {"start_step": 450, "final_step": 1264}]}
    (note,) = stages.resume_notes(summary)
    assert note.startswith("Trained in 3 sessions") and "at steps 50, 450" in note
    assert "2,847.4 s in the train steps in all" in note
    assert "(src, interrupted" in note
    assert stages.resume_notes({"sessions": summary["sessions"][:1]}) == []
    assert len(stages.resume_notes(summary, {"sessions": []}, summary)) == 2
    # A summary written before best_val_metric existed: its best_val_pr_auc held the metric
    # the run was selected by, val class accuracy for a source task without cats.
    old = {"final_step": 8, "train_seconds": 1.0, "best_val_pr_auc": 0.7}
    source = stages.run_summary(TrainConfig(data_dir=syn, exclude_classes=("cat",)), old)
    assert (source["best_val"], source["best_val_metric"]) == (0.7, "class_accuracy")
    detector = stages.run_summary(TrainConfig(data_dir=syn), old)
    assert detector["best_val_metric"] == "pr_auc"


@pytest.mark.slow
@pytest.mark.gpu
def test_gpu_profile_quick_on_two_simulated_replicas_in_float16(tmp_path):
    """`lab --profile=gpu --quick --cpu_replicas=2 --precision=mixed_float16`: every stage
    that trains, every run under MirroredStrategy over 2 logical CPU devices in float16,
    per-replica batches made global, and the report. Not compare, explain and visualize:
    they read the runs' exports, which are float32 whatever the training (research.export),
    with the settings the end-to-end test gives them (TINY), so the cpu profile's run there
    covers them (they were 35 of this test's 147 CPU-s)."""
    archive, photos, work = lab_sources(tmp_path)
    shrink = [f for f in TINY if not f.startswith(("--precision", "--batch_size"))]
    stages = [s.name for s in STAGES if s.name not in ("compare", "explain", "visualize")]
    chosen = ",".join(s for s in stages if s != "source_task")  # (run as transfer's need)
    res, _ = lab(work, "--profile=gpu", "--quick", "--cpu_replicas=2",
                 "--precision=mixed_float16", f"--source={archive}", f"--photo_source={photos}",
                 "--photo_counts=4,2,2", f"--stages={chosen}", *shrink, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    for name in stages:
        assert f"[lab] {name}: done" in res.stdout, name
    trained = re.findall(r"\[lab\] training (\S+): python -m research.apps.train (.*)",
                         res.stdout)
    assert len(trained) >= 6, res.stdout[-3000:]
    for run, command in trained:
        assert "--cpu_replicas=2" in command and "--precision=mixed_float16" in command, run
        batch = int(re.search(r"--batch_size=(\d+)", command).group(1))
        assert batch % 2 == 0, (run, batch)
    assert "--batch_size=128" in dict(trained)["lab_quick_scratch"]  # 64 per replica x 2
    said = res.stdout + res.stderr
    assert re.search(r"global batch \d+ on 2 replica\(s\), mixed_float16", said)
    assert "MirroredStrategy with 2 replica(s)" in said
    report = (work / "logs" / "lab" / "report.html").read_text()
    assert "lab_quick_scratch" in report and "gpu + quick" in report
