"""Writing a `SourceData` to sharded TFRecords with a manifest.

One `tf.train.Example` per image: the raw uint8 pixels (never scaled), their shape, the
preprocessed binary `label` (1 for the positive class), the source's `class_id`/`class_name`,
`coarse_id` (CIFAR-100, else -1) and a `source_id`. Data for plain classifiers
(`positive_class=None`, make_tfrecords --positive_class=none) has no `label`: its labels
are the class ids alone (readers see label 0, research.data.pipeline). The whole output
folder is built under a temporary name and renamed into place at the end, so a crash never
leaves a half dataset. Each split is planned here (its seeded shards); research.data.shards
decodes and writes them, in threads or worker processes, and research.data.records encodes
the Examples without TensorFlow.

The output is a pure function of the source and the settings: Examples are serialized with
deterministic (sorted) map order, whatever PYTHONHASHSEED is, and manifest.json holds no
timing, paths of the output or other run-specific values, so two conversions are byte for
byte identical, shards and manifest alike, whether threads or processes wrote them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable, Sequence

import numpy as np

from research import files
from research.data import records, shards
from research.data.manifest import MANIFEST, SCHEMA_VERSION, digest, sha256_file  # noqa: F401
from research.data.sources import SourceData, Split
from research.errors import UserError

SPLITS = ("train", "val", "test")
DEFAULT_SHARDS = {"train": 12, "val": 2, "test": 4}


NO_POSITIVE_CLASS = "none"  # make_tfrecords --positive_class=none: data for plain classifiers
SAMPLES = "samples.png"  # the sample grid make_tfrecords draws beside the shards
CACHES = "features"     # the feature caches training keeps beside them


class OutputExistsError(UserError):
    """--out_dir holds something --overwrite must not delete; the message names it."""


def _ours(out_dir: str) -> set[str] | None:
    """The entries make_tfrecords (and training's feature caches) put in a TFRecords folder:
    its manifest, the shards it lists, the sample grid, the caches. None: not our folder."""
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        listed = {sh["file"] for s in manifest["splits"].values() for sh in s["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return listed | {MANIFEST, SAMPLES, CACHES}


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Decided before any source is read: an empty or new --out_dir is written; a non-empty
    one only with --overwrite, and only if everything in it is ours (a folder without our
    manifest, or with files we did not write, is refused with a line naming them: nothing of
    anyone else's is ever deleted)."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise OutputExistsError(f"--out_dir: {out_dir} is a file, not a folder")
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    if not overwrite:
        raise OutputExistsError(f"--out_dir: {out_dir} already exists and is not empty; pass "
                                "--overwrite to replace it")

    def shown(names):
        listed = ", ".join(n + ("/" if os.path.isdir(os.path.join(out_dir, n)) else "")
                           for n in names[:6])
        return listed + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    ours = _ours(out_dir)
    if ours is None:
        raise OutputExistsError(f"--overwrite: {out_dir} is not a TFRecords folder written by "
                                f"make_tfrecords (no readable {MANIFEST}) and holds "
                                f"{shown(entries)}; nothing was deleted: move them away or "
                                "choose another --out_dir")
    foreign = [e for e in entries if e not in ours]
    if foreign:
        raise OutputExistsError(f"--overwrite: {out_dir} also holds files make_tfrecords did "
                                f"not write: {shown(foreign)}; nothing was deleted: move them "
                                "away first, or choose another --out_dir")


@dataclasses.dataclass
class WriteConfig:
    out_dir: str
    positive_class: str | None = "cat"  # None: no positive class (data for classifiers)
    val_fraction: float = 0.1
    test_fraction: float = 0.2   # only for sources without a test split of their own
    # Exact images per class (train, val, test) instead of the two fractions; see make_splits.
    split_counts: tuple[int, int, int] | None = None
    seed: int = 0
    shards: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SHARDS))
    overwrite: bool = False
    # How image files are decoded and written (research.data.shards): auto (threads for a
    # small source, worker processes from shards.PROCESS_MIN_IMAGES files), threads,
    # processes. The output is the same, byte for byte.
    parallel: str = "auto"


def stratified_split(class_ids: np.ndarray, fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices into (keep, held_out), holding out round(fraction * n) of every class."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(class_ids):
        idx = np.flatnonzero(class_ids == c)
        idx = idx[rng.permutation(len(idx))]
        n = int(round(fraction * len(idx)))
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def stratified_counts(class_ids: np.ndarray, counts: Sequence[int], num_classes: int,
                      seed: int) -> list[np.ndarray]:
    """Cuts exactly counts[0], counts[1], ... images of every class, in that order, from one
    seeded permutation per class; returns their sorted indices, then those left over (the
    last array). Raising a later count never changes what the earlier parts hold."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(counts) + 1)]
    ends = np.cumsum([0, *counts])
    for c in range(num_classes):
        idx = np.flatnonzero(class_ids == c)
        if len(idx) < ends[-1]:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than {ends[-1]}")
        idx = idx[rng.permutation(len(idx))]
        for k in range(len(counts)):
            parts[k].append(idx[ends[k]:ends[k + 1]])
        parts[-1].append(idx[ends[-1]:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def _shown(counts: Sequence) -> str:
    return f"--split_counts={','.join(str(k) for k in counts)}"


def check_split_counts(counts: Sequence) -> tuple[int, int, int]:
    """Three whole numbers >= 1 (train, val, test images per class), else ValueError: known
    before any source is read."""
    try:
        ok = len(counts) == 3 and all(int(k) == float(k) >= 1 for k in counts)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{_shown(counts)}: give three whole numbers >= 1, TRAIN,VAL,TEST "
                         "images per class (an empty split cannot be written)")
    return tuple(int(k) for k in counts)


def split_counts_problem(data: SourceData, counts: Sequence[int]) -> str | None:
    """Why `counts` (train, val, test per class) cannot be cut from `data`, naming every class
    short of images and how many it has; None if they can."""
    train, val, test = check_split_counts(counts)
    shown = _shown(counts)
    own_test = "test" in data.splits
    asks = ([("train", train + val, f"train + val ask for {train + val:,}"),
             ("test", test, f"test asks for {test:,}")] if own_test else
            [("train", train + val + test, f"train + val + test ask for {train + val + test:,}")])
    short = []
    for part, wanted, what in asks:
        have = np.bincount(data.splits[part].class_ids, minlength=len(data.class_names))
        where = f" in the source's {part} split" if own_test else ""
        short += [f"class {name} has {int(n):,} images{where}, {what}"
                  for name, n in zip(data.class_names, have) if n < wanted]
    return f"{shown}: {'; '.join(short)}" if short else None


def make_splits(data: SourceData, cfg: WriteConfig
                ) -> tuple[dict[str, Split], dict[str, dict[str, int]]]:
    """(train/val/test, images left out of them per source split and class).

    Fractions: val is a stratified slice of train; test is the source's own when it has one,
    otherwise a stratified slice too; nothing is left out.
    Counts (cfg.split_counts = train, val, test per class): a source without a test split has
    all three cut from its images, in that order; a source with one has train and val cut
    from its train split and test from its own test split (seed + 1), so test images never
    come from train. What the counts do not use is left out, and returned."""
    names = data.class_names
    if cfg.split_counts is not None:
        problem = split_counts_problem(data, cfg.split_counts)
        if problem:
            raise ValueError(problem)
        train_n, val_n, test_n = check_split_counts(cfg.split_counts)
        src = data.splits["train"]
        if "test" in data.splits:
            tr, va, rest = stratified_counts(src.class_ids, (train_n, val_n), len(names), cfg.seed)
            src_test = data.splits["test"]
            te, rest_test = stratified_counts(src_test.class_ids, (test_n,), len(names),
                                              cfg.seed + 1)
            splits = {"train": src.take(tr), "val": src.take(va), "test": src_test.take(te)}
            left = {"train": src.take(rest), "test": src_test.take(rest_test)}
        else:
            tr, va, te, rest = stratified_counts(src.class_ids, (train_n, val_n, test_n),
                                                 len(names), cfg.seed)
            splits = {"train": src.take(tr), "val": src.take(va), "test": src.take(te)}
            left = {"train": src.take(rest)}
        left_out = {part: {n: int(k) for n, k in zip(
            names, np.bincount(s.class_ids, minlength=len(names)))} for part, s in left.items()}
        return splits, left_out
    train = data.splits["train"]
    test = data.splits.get("test")
    if test is None:
        if cfg.test_fraction <= 0:
            raise ValueError("The source has no test split; set --test_fraction > 0 to hold "
                             "one out")
        keep, held = stratified_split(train.class_ids, cfg.test_fraction, cfg.seed + 1)
        train, test = train.take(keep), train.take(held)
    keep, held = stratified_split(train.class_ids, cfg.val_fraction, cfg.seed)
    return {"train": train.take(keep), "val": train.take(held), "test": test}, {}


def serialize_example(image: np.ndarray, label: int | None, class_id: int, class_name: str,
                      coarse_id: int, source_id: str) -> bytes:
    """One image's tf.train.Example, as `Example.SerializeToString(deterministic=True)`
    writes it (research.data.records); `label` None: no binary label is written."""
    return records.image_example(image.tobytes(), image.shape, label, class_id, class_name,
                                 coarse_id, source_id)


def plan_split(split: Split, name: str, num_shards: int, seed: int) -> list[shards.Shard]:
    """The shards of one split: a seeded permutation (shards mix classes) cut into
    `num_shards` nearly equal runs, in the order they are written."""
    n = len(split)
    if n == 0:
        raise ValueError(f"split {name!r} would be empty; with so few images per class, raise "
                         "--val_fraction / --test_fraction")
    num_shards = max(1, min(num_shards, n))
    order = np.random.default_rng(seed).permutation(n)
    return [shards.Shard(name, f"{name}-{s:05d}-of-{num_shards:05d}.tfrecord", idx)
            for s, idx in enumerate(np.array_split(order, num_shards))]


def split_entry(plan: list[shards.Shard], results: dict[str, shards.ShardResult],
                class_names: list[str], positive_id: int | None) -> dict:
    """A split's manifest entry: what its shards hold (files that did not decode left out)."""
    counts = np.zeros(len(class_names), np.int64)
    for shard in plan:
        counts += results[shard.file].class_counts
    return {
        "num_examples": int(counts.sum()),
        "num_positive": 0 if positive_id is None else int(counts[positive_id]),
        "class_counts": {c: int(k) for c, k in zip(class_names, counts)},
        "shards": [{"file": s.file, "num_examples": results[s.file].num_examples,
                    "sha256": results[s.file].sha256, "bytes": results[s.file].bytes}
                   for s in plan],
    }


def positive_class_error(data: SourceData, positive_class: str, source: str) -> str:
    """One line: the missing class and every class name that does exist."""
    what = f"{source} ({data.label_set} labels)" if data.label_set else source
    msg = (f"--positive_class={positive_class!r} is not a class of {what}; its "
           f"{len(data.class_names)} classes are: {', '.join(data.class_names)}")
    dropped = sorted({e["class"] for e in data.empty_classes if not e["kept"]})
    if dropped:
        msg += f" (dropped, no images: {', '.join(dropped)})"
    return msg


def _manifest_head(data: SourceData, cfg: WriteConfig, source: str, flags: dict | None,
                   splits: dict[str, Split], left_out: dict, positive_id: int | None) -> dict:
    """manifest.json before its splits are written, keys in the order it is written in."""
    held_out_test = "test" not in data.splits
    counts = cfg.split_counts
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "source_format": data.format,
        "label_set": data.label_set,
        "positive_class": cfg.positive_class,
        "positive_class_id": positive_id,
        "class_names": list(data.class_names),
        "coarse_class_names": data.coarse_class_names,
        "image_shape": list(splits["train"].images.shape[1:]),
        "seed": cfg.seed,
        # Both None under split_counts, which replaces them.
        "val_fraction": cfg.val_fraction if counts is None else None,
        # None: the source's own test split; else the stratified fraction held out.
        "test_fraction": cfg.test_fraction if held_out_test and counts is None else None,
        # The images per class asked for, and the source split the test count cut.
        "split_counts": None if counts is None else {
            "train": int(counts[0]), "val": int(counts[1]), "test": int(counts[2]),
            "test_from": "train" if held_out_test else "test"},
        # Source split -> class -> images in no split (only split_counts leaves any out).
        "left_out": left_out,
        "splits": {},
        "skipped": list(data.skipped),
        "empty_classes": list(data.empty_classes),
        "flags": dict(sorted((flags or {}).items())),
    }


def write_tfrecords(data: SourceData, cfg: WriteConfig, source: str, flags: dict | None = None,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Writes train/val/test shards and manifest.json into cfg.out_dir; returns the manifest.
    `cfg.positive_class` None: no positive class (recorded as null; labels are class ids)."""
    if cfg.positive_class is not None and cfg.positive_class not in data.class_names:
        raise ValueError(positive_class_error(data, cfg.positive_class, source))
    out_dir = os.path.abspath(cfg.out_dir)
    check_out_dir(out_dir, cfg.overwrite)
    for split, k in cfg.shards.items():
        if split not in SPLITS or k < 1:
            raise ValueError(f"bad shard count {split}={k}; splits are {SPLITS}, counts >= 1")
    positive_id = (None if cfg.positive_class is None
                   else data.class_names.index(cfg.positive_class))
    splits, left_out = make_splits(data, cfg)
    if positive_id is not None and not np.any(splits["train"].class_ids == positive_id):
        raise ValueError(f"--positive_class={cfg.positive_class!r} has no train images; see "
                         "the empty class folders or pick another class")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    files.remove_leftovers(parent or ".", f".{os.path.basename(out_dir)}.tmp-")  # killed runs
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-{files.temp_tag()}",
                           dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename into place
    manifest = _manifest_head(data, cfg, source, flags, splits, left_out, positive_id)
    try:
        plan = {name: plan_split(splits[name], name, cfg.shards.get(name, DEFAULT_SHARDS[name]),
                                 cfg.seed + 100 + i) for i, name in enumerate(SPLITS)}
        results = shards.write_shards([s for p in plan.values() for s in p], splits, tmp,
                                      data.class_names, positive_id, cfg.parallel, progress)
        for name in SPLITS:
            manifest["splits"][name] = split_entry(plan[name], results, data.class_names,
                                                   positive_id)
            # Files that failed to decode, in the order they were planned (workers finish
            # shards in any order).
            data.skipped.extend(e for s in plan[name] for e in results[s.file].skipped)
        manifest["skipped"] = list(data.skipped)
        manifest["digest"] = digest(manifest)  # any later edit of the manifest shows
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
        files.fsync_tree(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        files.fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if files.is_out_of_space(e):
            raise files.out_of_space("the TFRecords", out_dir,
                                     "run make_tfrecords again") from None
        raise
    return manifest


def summary_table(manifest: dict) -> str:
    """A plain-text table of counts per split and class, shards and bytes. The wall time is
    not in the manifest (it must not vary between runs); the app prints it."""
    names = manifest["class_names"]
    splits = manifest["splits"]
    width = max(12, max(len(n) for n in names) + 2)
    rows = [f"{'class':<{width}}" + "".join(f"{s:>10}" for s in splits)]
    if len(names) <= 20:  # CIFAR-100: per-class rows would drown the table
        for n in names:
            mark = " *" if n == manifest["positive_class"] else ""
            rows.append(f"{(n + mark):<{width}}" +
                        "".join(f"{splits[s]['class_counts'][n]:>10,}" for s in splits))
    rows.append("-" * len(rows[0]))
    positive = manifest["positive_class"]
    for key in ("num_examples", "num_positive") if positive else ("num_examples",):
        rows.append(f"{key:<{width}}" + "".join(f"{splits[s][key]:>10,}" for s in splits))
    rows.append(f"{'shards':<{width}}" + "".join(f"{len(splits[s]['shards']):>10}" for s in splits))
    rows.append(f"{'MB':<{width}}" + "".join(
        f"{sum(sh['bytes'] for sh in splits[s]['shards']) / 1e6:>10.1f}" for s in splits))
    what = (f"positive class: {positive} (*)" if positive else
            "positive class: none (data for classifiers: the labels are the class ids)")
    rows.append(f"{what}   skipped files: {len(manifest['skipped'])}   empty class folders: "
                f"{len(manifest.get('empty_classes', []))}")
    if manifest.get("test_fraction") is not None:
        rows.append(f"test: {manifest['test_fraction']:g} of every class held out of train "
                    f"(stratified, seed {manifest['seed'] + 1}); the source has no test split")
    if manifest.get("split_counts"):
        rows += split_counts_lines(manifest)
    return "\n".join(rows)


def split_counts_lines(manifest: dict) -> list[str]:
    """What --split_counts cut from which source split, and what it left out, per class."""
    c, seed = manifest["split_counts"], manifest["seed"]
    asked = f"--split_counts={c['train']},{c['val']},{c['test']}"
    if c["test_from"] == "test":
        cut = (f"train {c['train']:,} + val {c['val']:,} of every class cut from the source's "
               f"train split (seed {seed}), test {c['test']:,} from its own test split "
               f"(seed {seed + 1})")
    else:
        cut = (f"train {c['train']:,} + val {c['val']:,} + test {c['test']:,} of every class "
               f"cut from the source's images (seed {seed}; it has no test split)")
    lines = [f"{asked}: {cut}"]
    left = manifest["left_out"]
    total = sum(sum(per_class.values()) for per_class in left.values())
    if not total:
        return lines + ["left out (in no split): none, every image of the source is used"]
    parts = []
    for part, per_class in left.items():
        where = f"of the source's {part} split" if c["test_from"] == "test" else "of the source"
        values = set(per_class.values())
        if len(values) == 1:
            parts.append(f"{values.pop():,} of every class {where}")
        elif len(per_class) <= 20:
            parts.append(", ".join(f"{n} {k:,}" for n, k in per_class.items()) + f" {where}")
        else:
            parts.append(f"{sum(per_class.values()):,} {where} (per class in manifest.json)")
    return lines + [f"left out (in no split): {'; '.join(parts)}; {total:,} images in all"]
