"""airbench's lookahead: slow copies of the weights that the trained weights are pulled back
to every few steps, more strongly as training ends."""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf


@dataclasses.dataclass
class Lookahead:
    """Slow copies of the model's float variables (weights and BN statistics), as in
    airbench's LookaheadState: every `every` steps the slow copies move toward the trained
    variables, keeping `decay**every * (step / total_steps)**3` of themselves (so the pull
    strengthens as training ends), and the trained variables are reset to them; the last step
    ends on the slow copies: pulled as usual when it is also a multiple of `every` (airbench
    pulls, then resets with decay 1.0, a no-op after the pull), else left as they are."""
    slow: list
    fast: list
    every: int
    decay: float
    total_steps: int

    @classmethod
    def create(cls, model: keras.Model, every: int, decay: float, total_steps: int):
        """Call inside the strategy scope."""
        fast = [v for v in model.weights
                if "float" in str(v.dtype) and "seed_generator" not in v.path]
        slow = [tf.Variable(v.value, trainable=False, name=f"slow_{i}")
                for i, v in enumerate(fast)]
        return cls(slow, fast, int(every), float(decay), int(total_steps))

    def keep(self, step):
        """The slow copies' share at `step` (1.0 at a last step that is not a pull step)."""
        frac = tf.cast(step, tf.float32) / float(self.total_steps)
        pull = tf.logical_or(step % self.every == 0, step < self.total_steps)
        return tf.where(pull, self.decay ** self.every * frac ** 3, 1.0)

    def due(self, step):
        return tf.logical_or(step % self.every == 0, step >= self.total_steps)

    def update(self, step) -> None:
        """In cross-replica context (the train loop, between steps)."""
        keep = self.keep(step)
        for s, f in zip(self.slow, self.fast):
            k = tf.cast(keep, s.dtype)
            s.assign(k * s + (1.0 - k) * tf.cast(f.value, s.dtype))
            f.assign(tf.cast(s, f.dtype))
