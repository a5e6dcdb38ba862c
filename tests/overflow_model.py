"""A float16 overflow injected at chosen steps on chosen replicas, for the loss-scale tests.

`OverflowAt` passes its input through and, in training, multiplies the gradient flowing back
through it by 1e30 (inf in float16) on the batches it is told to (counted by a weight of its
own, so a resumed run counts on) and only on the replicas it is told to (global replica ids:
under MultiWorkerMirroredStrategy with one replica per worker, the worker's index).

Run as a module (`PYTHONPATH=tests python -m overflow_model <train flags>`, or as
launch_local's `--module=overflow_model`) it is `research.apps.train` with the scratch CNN
followed by this layer, at the steps and replicas in OVERFLOW_STEPS and OVERFLOW_REPLICAS
(comma-separated; 1-based steps).
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf


class OverflowAt(keras.layers.Layer):
    def __init__(self, steps=(), replicas=(0,), **kw):
        super().__init__(**kw)
        self.steps, self.replicas = tuple(int(s) for s in steps), tuple(replicas)

    def build(self, shape):
        # Counted on the first replica and copied to the others: every replica sees one
        # batch per step, so all agree on the step.
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                    dtype="float32", aggregation="only_first_replica",
                                    name="batches_seen")

    def call(self, x, training=False):
        if not training or not self.steps:
            return x
        self.seen.assign_add(1.0)
        ctx = tf.distribute.get_replica_context()
        replica = ctx.replica_id_in_sync_group if ctx is not None else 0
        hit = tf.logical_and(
            tf.reduce_any(tf.equal(tf.cast(self.seen, tf.int32), list(self.steps))),
            tf.reduce_any(tf.equal(tf.cast(replica, tf.int32), list(self.replicas))))

        @tf.custom_gradient
        def inject(x):
            def grad(dy):
                return dy * tf.cast(tf.where(hit, 1e30, 1.0), dy.dtype)
            return tf.identity(x), grad

        return inject(x)


def with_overflow(builder, steps, replicas):
    """A model builder: `builder`'s network, then OverflowAt (same dtype policy)."""
    def build(image_shape, num_outputs, dtype=None, **options):
        base = builder(image_shape=image_shape, num_outputs=num_outputs, dtype=dtype,
                       **options)
        out = OverflowAt(steps, replicas, dtype=dtype, name="overflow")(base.output)
        return keras.Model(base.input, out)
    return build


def _ints(name):
    return [int(v) for v in os.environ.get(name, "").split(",") if v.strip()]


if __name__ == "__main__":
    from research import models
    from research.apps import config_flags, train

    models.MODELS["scratch"] = with_overflow(models.MODELS["scratch"],
                                             _ints("OVERFLOW_STEPS"),
                                             _ints("OVERFLOW_REPLICAS") or [0])
    config_flags.run(train.main)
