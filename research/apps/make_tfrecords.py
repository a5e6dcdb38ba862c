r"""Turns CIFAR-10/100, MNIST or a folder of images into sharded TFRecords with a manifest.

  python -m research.apps.make_tfrecords --source=../shared/data/cifar10-jpg.tar.gz \
      --out_dir=data/cifar10
  python -m research.apps.make_tfrecords --source=../shared/data/dogs-vs-cats-2000.tar \
      --out_dir=data/dvc150 --image_size=150 --positive_class=cats
  python -m research.apps.make_tfrecords --source=../shared/data/dogs-vs-cats-2000.tar \
      --out_dir=data/dvc150_counts --image_size=150 --positive_class=cats \
      --split_counts=500,250,250
  python -m research.apps.make_tfrecords --source=cifar100 --label=coarse \
      --positive_class=large_carnivores --out_dir=data/cifar100_coarse
  python -m research.apps.make_tfrecords --source=mnist --positive_class=7 --out_dir=data/mnist
  python -m research.apps.make_tfrecords --source=cifar100 --positive_class=none \
      --out_dir=data/cifar100_classes
  python -m research.apps.make_tfrecords --source=horse2zebra.zip --class_names=horse,zebra \
      --positive_class=zebra --out_dir=data/horse2zebra

Two runs with the same source and flags write byte-identical shards and manifest.json (the
wall time is printed, not stored).
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags, logging

from research import machine, plots
from research.apps import config_flags
from research.data import imaging, pipeline, sources, tfrecords
from research.errors import UserError
from research.progress import Bar

FLAGS = flags.FLAGS
config_flags.define_max_image_pixels()
flags.DEFINE_string("source", None, sources.source_help())
flags.DEFINE_string("out_dir", None, "Output folder, e.g. data/cifar10.")
flags.DEFINE_string("positive_class", "cat", "Class whose examples get label 1. It must be one "
                    "of the source's classes: cat (CIFAR-10), cats (dogs-vs-cats); CIFAR-100 "
                    "has no cat: e.g. leopard (--label=fine) or large_carnivores "
                    "(--label=coarse); MNIST: a digit, e.g. 7; trainA/trainB: one of "
                    "--class_names. A wrong name is an error that lists the classes. none: no "
                    "positive class, data for plain N-class classifiers (recorded as null; the "
                    "labels are the class ids).")
flags.DEFINE_enum("label", "fine", ["fine", "coarse"], "CIFAR-100 only: the 100 fine classes "
                  "or the 20 coarse superclasses.")
flags.DEFINE_list("class_names", None, "trainA/trainB layout only: the names of the A and B "
                  "classes, A first, e.g. horse,zebra (default: A,B).")
config_flags.define_float("val_fraction", 0.1, "Stratified fraction of train held out as val.",
                          ge=0, lt=1)
config_flags.define_float("test_fraction", 0.2, "Stratified fraction held out as test, only "
                          "for sources without a test split.", ge=0, lt=1)
flags.DEFINE_list("split_counts", None, "TRAIN,VAL,TEST: exact images per class in each "
                  "split, e.g. 500,250,250, instead of --val_fraction/--test_fraction (giving "
                  "it with either is an error). Chosen per class from one seeded permutation "
                  "(--seed), train first, then val, then test. A source without a test split "
                  "(the dogs-vs-cats tar, a flat or class folder without test/) has all three "
                  "cut from its images; a source with one (CIFAR, MNIST, train/ + test/ or "
                  "testA/ testB/ folders) has train and val cut from its train split and test "
                  "from its own test split (seed + 1), never from train. A class with too few "
                  "images is an error naming it and its count; images no split uses are left "
                  "out, printed and counted per class in manifest.json (left_out).")
config_flags.define_integer("seed", 0, "Seed for the val split and shard order.", ge=0,
                            le=2**32 - 1)
config_flags.define_integer("train_shards", 12, "Number of train shards.", ge=1)
config_flags.define_integer("val_shards", 2, "Number of val shards.", ge=1)
config_flags.define_integer("test_shards", 4, "Number of test shards.", ge=1)
config_flags.define_integer("image_size", 32, "Height and width images from folders are "
                            "resized to at conversion time (CIFAR and MNIST keep their own "
                            "32x32 / 28x28).", ge=1)
flags.DEFINE_enum("resize_policy", imaging.DEFAULT_RESIZE_POLICY, imaging.RESIZE_POLICIES,
                  "center_crop keeps the aspect ratio; stretch distorts it.")
flags.DEFINE_bool("reduced_decode", True, "Decode a JPEG at 1/2, 1/4 or 1/8 of its size "
                  "(libjpeg's scaled decoding, several times faster) when the --image_size "
                  "target is at most half of it on both sides, then resize with INTER_AREA as "
                  "always; false: decode every image at full size (the pixels of earlier "
                  "versions, bit for bit). Recorded in manifest.json's flags when true. See "
                  "docs/data_at_scale.md.")
flags.DEFINE_string("download_dir", "data/downloads", "Where official archives are kept.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out_dir.")
config_flags.define_integer("sample_grid", 32, "Images in samples.png (0: none).", ge=0)
flags.mark_flags_as_required(["source", "out_dir"])

# Where the output goes and whether to replace it do not change its content: not recorded,
# so that conversions into two folders give byte-identical manifests.
UNRECORDED_FLAGS = ("out_dir", "overwrite")


def recorded_flags() -> dict:
    """This app's flags as manifest.json records them. --reduced_decode only when true: a
    manifest without it (every earlier one) means full decoding, so --reduced_decode=false
    writes the manifest earlier versions wrote, byte for byte."""
    values = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])
              if f.name not in UNRECORDED_FLAGS}
    if not values["reduced_decode"]:
        del values["reduced_decode"]
    return values


def write_sample_grid(data_dir: str, n: int) -> str:
    """Reads the first n train examples back from the TFRecords and draws them. The title
    names the source, not `data_dir`, so the figure too is the same in any output folder."""
    manifest = pipeline.load_manifest(data_dir)
    batch = next(iter(pipeline.make_dataset(data_dir, "train", n, training=False, scale="uint8")))
    names = manifest["class_names"]
    positive = manifest["positive_class"]
    labels = batch["label"].numpy()
    titles = [f"{names[c]} / label {lab}" if positive else names[c]
              for c, lab in zip(batch["class_id"].numpy(), labels)]
    colors = ["red" if lab else "black" for lab in labels]
    what = (f"red: label 1 = {positive}" if positive else "no positive class: labels are the "
            "class ids")
    fig = plots.image_grid(batch["image"].numpy(), titles, ncols=8, title_colors=colors,
                           title=f"{manifest['source']}: first {len(titles)} train examples "
                                 f"read back from TFRecords ({what})")
    return plots.save_figure(fig, os.path.join(data_dir, tfrecords.SAMPLES))


def split_counts_from_flags() -> tuple[int, int, int] | None:
    """--split_counts as three ints, or None (the fractions apply); a UserError/ValueError
    before any work when it is malformed or given with a fraction flag."""
    fractions = [f"--{n}" for n in ("val_fraction", "test_fraction") if FLAGS[n].present]
    if FLAGS.split_counts is None:
        if FLAGS.val_fraction + FLAGS.test_fraction >= 1:
            raise UserError("--val_fraction + --test_fraction must be < 1, got "
                            f"{FLAGS.val_fraction + FLAGS.test_fraction}")
        return None
    if fractions:
        raise UserError(f"--split_counts and {', '.join(fractions)} both given: "
                        "--split_counts replaces --val_fraction and --test_fraction, give one "
                        "or the other")
    return tfrecords.check_split_counts(FLAGS.split_counts)


def main(argv):
    del argv
    start = time.time()
    try:
        split_counts = split_counts_from_flags()
        tfrecords.check_out_dir(FLAGS.out_dir, FLAGS.overwrite)  # before decoding anything
        logging.info("Reading %s", FLAGS.source)
        data = sources.load_source(FLAGS.source, image_size=(FLAGS.image_size, FLAGS.image_size),
                                   resize_policy=FLAGS.resize_policy,
                                   download_dir=FLAGS.download_dir, label_set=FLAGS.label,
                                   class_names=FLAGS.class_names,
                                   reduced_decode=FLAGS.reduced_decode)
        total = sum(len(s) for s in data.splits.values())
        logging.info("Listed %d images in %.1fs (%d skipped); image folders are decoded as "
                     "they are written", total, time.time() - start, len(data.skipped))
        cfg = tfrecords.WriteConfig(
            out_dir=FLAGS.out_dir,
            positive_class=(None if FLAGS.positive_class == tfrecords.NO_POSITIVE_CLASS
                            else FLAGS.positive_class),
            val_fraction=FLAGS.val_fraction, test_fraction=FLAGS.test_fraction,
            split_counts=split_counts, seed=FLAGS.seed,
            shards={"train": FLAGS.train_shards, "val": FLAGS.val_shards,
                    "test": FLAGS.test_shards},
            overwrite=FLAGS.overwrite)
        bar = Bar(total, "image", label="decoding + writing")
        manifest = tfrecords.write_tfrecords(data, cfg, FLAGS.source, recorded_flags(),
                                             progress=lambda k: bar.add(k))
    except (UserError, ValueError) as e:
        config_flags.fail(e)
    seconds = time.time() - start
    print()
    print(tfrecords.summary_table(manifest))
    for e in data.empty_classes:
        print(sources.describe_empty_class(e))
    for s in data.skipped[:20]:
        print(f"skipped {s['file']}: {s['reason']}")
    if len(data.skipped) > 20:
        print(f"... and {len(data.skipped) - 20} more skipped files, all listed in manifest.json")
    if FLAGS.sample_grid:
        print(f"sample grid: {write_sample_grid(FLAGS.out_dir, FLAGS.sample_grid)}")
    print(f"wrote {FLAGS.out_dir} in {seconds:.1f}s (read + decode + write) on {machine.banner()}")


if __name__ == "__main__":
    config_flags.run(main)
