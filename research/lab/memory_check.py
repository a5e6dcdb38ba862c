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

from research.data import pipeline


def load_train_split(data_dir: str) -> dict[str, np.ndarray]:
    """The whole train split as uint8 arrays, in split position order (one read)."""
    return pipeline.take_examples(data_dir, "train")


memory_dataset = pipeline.make_memory_dataset  # one implementation: the input pipeline's


def check_supported(cfg) -> None:
    """Refuses settings whose stream the in-memory input does not replay (TrainConfig's own
    rule for --input=memory)."""
    dataclasses.replace(cfg, input="memory").validate()
