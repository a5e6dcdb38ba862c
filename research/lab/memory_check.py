"""Does reading from disk cost anything in quality? The same run trained from the whole
training split held in memory, batch for batch as the TFRecord pipeline would feed it.

The pipeline's training stream is a pure function of (seed, step): epoch e reads the shards
in a stateless-shuffled order, cuts the records into chunks of `shuffle_buffer`, permutes each
chunk with a stateless shuffle keyed on (seed, e, chunk), and augments example i of the stream
with draws keyed on (seed, i). `memory_dataset` replays exactly that over arrays in memory,
so the two runs of the check see the same images, in the same batches, augmented the same
way; only where the bytes come from differs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from research import files
from research.data import pipeline
from research.lab.detectors import (eval_command, evaluate, finished, resume_notes, train,
                                    train_config)
from research.lab.lab import Lab, changed_flags, command, read_marker
from research.lab.stage import Done
from research.training import loop
from research.training.config import TrainConfig
from research.training.inputs import train_stream


def load_train_split(data_dir: str) -> dict[str, np.ndarray]:
    """The whole train split as uint8 arrays, in split position order (one read)."""
    return pipeline.take_examples(data_dir, "train")


memory_dataset = pipeline.make_memory_dataset  # one implementation: the input pipeline's


def check_supported(cfg) -> None:
    """Refuses settings whose stream the in-memory input does not replay (TrainConfig's own
    rule for --input=memory)."""
    dataclasses.replace(cfg, input="memory").validate()


METRICS = ("roc_auc", "pr_auc", "f1", "precision", "recall", "class_accuracy", "loss")


def stage_memory_check(lab: Lab) -> Done:
    settings = lab.profile.memory_check
    disk = train_config(lab, "mem_tfrecords", settings)
    mem = dataclasses.replace(train_config(lab, "mem_memory", settings), input="memory")
    check_supported(disk)
    out = lab.out_dir("memory_check") + ".json"
    flags = changed_flags(disk)
    commands = [command("research.apps.train", flags),
                command("research.apps.train", changed_flags(mem)),
                eval_command(lab, disk.run_name), eval_command(lab, mem.run_name)]
    notes = ["`train --input=memory` reads the whole training split once and feeds the loop "
             "the same batches from memory (checked element by element below)."]
    d_summary, d_reused = train(lab, disk)
    m_summary = finished(mem)
    m_reused = m_summary is not None
    if not m_reused:
        m_summary, _ = train(lab, mem)
    d_report, d_eval = evaluate(lab, disk.run_name, figures=False)
    m_report, m_eval = evaluate(lab, mem.run_name, figures=False)
    old = read_marker(out)
    if old and d_reused and m_reused and d_eval and m_eval and "same_batches" in old:
        same = old["same_batches"]
    else:
        same = same_batches(lab, disk)
    result = {"runs": {"tfrecords": disk.run_name, "memory": mem.run_name},
              "settings": flags, "same_batches": same,
              "test": {}, "train_seconds": {"tfrecords": d_summary.get("train_seconds"),
                                            "memory": m_summary.get("train_seconds")}}
    for k in METRICS:
        a, b = d_report.get(k), m_report.get(k)
        if a is not None and b is not None:
            result["test"][k] = {"tfrecords": a, "memory": b, "difference": b - a}
    files.write_json(out, result, "the memory check")
    diff = result["test"].get("roc_auc", {}).get("difference")
    print(f"[lab] memory check: same batches {same}; test ROC-AUC difference (memory - "
          f"tfrecords) {diff:+.4f}" if diff is not None else "[lab] memory check done",
          flush=True)
    reused = d_reused and m_reused and d_eval and m_eval
    return Done(commands, flags, {"json": out, **result},
                notes + resume_notes(d_summary, m_summary), reused=reused,
                ran_seconds=(d_summary.get("train_seconds") or 0)
                + (m_summary.get("train_seconds") or 0))


def same_batches(lab: Lab, cfg: TrainConfig, num_batches: int = 3) -> bool:
    """The first batches of both streams compared element for element."""
    run = loop.prepare_config(cfg)
    manifest = pipeline.load_manifest(run.data_dir)
    arrays = load_train_split(run.data_dir)
    stream = train_stream(run)
    a = pipeline.make_dataset(run.data_dir, "train", run.batch_size, training=True,
                              stream=stream)
    b = memory_dataset(arrays, manifest, run.batch_size, stream=stream)
    for x, y in zip(a.take(num_batches), b.take(num_batches)):
        for k in ("image", "label", "class_id"):
            if not np.array_equal(x[k].numpy(), y[k].numpy()):
                logging.warning("memory check: batches differ in %s", k)
                return False
    return True
