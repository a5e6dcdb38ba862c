"""Dynamic loss scaling for mixed_float16 that is right on any number of replicas and workers.

Keras' `LossScaleOptimizer` decides "finite or not" from the first local replica's gradients,
before they are all-reduced (its comment assumes they already were): under MirroredStrategy a
replica other than 0 that overflows alone writes inf into the weights while the scale stays
and the step counts, and under MultiWorkerMirroredStrategy each worker decides from its own
replica, so workers can take different branches around a collective and hang.

`DynamicLossScaleOptimizer` all-reduces one flag (the count of replicas whose local gradients
are not finite) before deciding, so every replica of every worker takes the same branch: a
non-finite gradient anywhere skips the step everywhere, halves the scale once and leaves every
weight as it was. A skipped step does not advance `iterations` (the learning-rate schedule
follows applied steps, as in Keras) but it did consume a batch: `skipped_steps` counts it, and
`batches_consumed` (iterations + skipped) is the run's step: where the input stream resumes,
and the clock of the plan and of lookahead. The counter and the scale are optimizer
variables, so they are in every checkpoint.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="research")
class DynamicLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """keras.optimizers.LossScaleOptimizer with the finiteness agreed by all replicas."""

    def build(self, var_list):
        super().build(var_list)
        # Outside the base class's automatic tracking, as its own scale variables are.
        self.skipped_steps = self.add_variable(shape=(), dtype="int", aggregation="none",
                                               initializer=keras.initializers.Zeros(),
                                               name="skipped_steps")

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.skipped_steps.assign_add(1)

    def all_finite(self, grads) -> tf.Tensor:
        """True iff every replica's gradients (of every worker) are finite: the same value on
        every replica. Call in a replica context."""
        finite = self.check_finite(grads)
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return finite
        bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                             tf.cast(tf.logical_not(finite), tf.float32))
        return tf.equal(bad, 0.0)

    def _tf_apply(self, grads, trainable_variables=None):
        if tf.distribute.in_cross_replica_context():
            raise ValueError("apply() must be called in a replica context.")
        finite = self.all_finite(grads)
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            ops.cond(finite,
                     lambda: self._stateful_handle_finite_grads(grads, trainable_variables),
                     self._stateful_handle_non_finite_grads)
            return

        def cross_replica(distribution, finite, grads, trainable_variables):
            # Every replica holds the same all-reduced flag, so any one may be read.
            agreed = distribution.experimental_local_results(finite)[0]

            def apply_fn():
                distribution.extended.call_for_each_replica(
                    self._stateful_handle_finite_grads, args=(grads, trainable_variables))

            # In the cross-replica context: a branch that calls merge_call (the inner
            # optimizer's apply does) cannot sit in a replica-context cond.
            ops.cond(agreed, apply_fn, self._stateful_handle_non_finite_grads)

        tf.distribute.get_replica_context().merge_call(
            cross_replica, args=(finite, grads, trainable_variables))


def batch_clock(optimizer) -> tf.Tensor:
    """`batches_consumed` as a tensor, for a tf.function: the clock lookahead runs on, so a
    skipped step neither pulls twice on one iteration nor shifts the pulls off the plan."""
    clock = tf.cast(optimizer.iterations, tf.int64)
    skipped = getattr(optimizer, "skipped_steps", None)
    return clock if skipped is None else clock + tf.cast(skipped, tf.int64)


def batches_consumed(optimizer) -> int:
    """The batches an optimizer has stepped through: its iterations, plus the steps a loss
    scale skipped (each consumed a batch without an update)."""
    steps = int(optimizer.iterations.numpy())
    skipped = getattr(optimizer, "skipped_steps", None)
    return steps + (int(skipped.numpy()) if skipped is not None else 0)
