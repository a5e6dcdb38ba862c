"""SimCLR pretraining (`train --objective=simclr`): the fast CNN learns from unlabelled images by
telling two augmented views of each image apart from the other images of the batch.

Ported piece by piece from google-research/simclr `tf2/` (the card's reference codebase):
- views (`data_util.preprocess_for_train`, CIFAR settings: no blur): a random resized crop
  (area 8-100%, aspect 3/4-4/3, bicubic back to the model's size), a random horizontal flip,
  colour jitter with probability 0.8 (brightness x[1-0.8s, 1+0.8s], contrast, saturation
  0.8s, hue 0.2s, in random order, clipped after each) and grayscale with probability 0.2;
- the projection head (`model.ProjectionHead`, nonlinear): `projection_layers` Dense+BN layers,
  ReLU after all but the last, the middle ones as wide as the features, the last
  `projection_dim` wide without a bias;
- the loss (`objective.add_contrastive_loss`): NT-Xent over the l2-normalised projections at
  `temperature`, the negatives gathered from every replica (`tpu_cross_replica_concat`), the
  self-similarities masked with -1e9.

Ours where the reference has a flag-driven global: the random draws are stateless, seeded by
(seed, position of the image in the stream), so a resumed run sees exactly the views it would
have seen; the per-anchor losses are averaged with `tf.nn.compute_average_loss` over the
global batch, which is the reference's per-replica mean divided by the replicas.
"""

from __future__ import annotations

import dataclasses
import shutil

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from research import export, runs
from research.data import imaging, pipeline
from research.models.layers import FusedBatchNorm
from research.training import checkpoints, record, resume
from research.training.actions import Action, Checkpoint, LoopContext, NanGuard, drive
from research.training.config import SIMCLR, TrainConfig
from research.training.model import init_model_from_data, make_model
from research.training.optimizers import make_optimizer
from research.training.schedule import learning_rate_schedule
from research.training.state import Plan
from research.training.steps import l2_penalty

LARGE_NUM = 1e9  # the reference's mask of self-similarities
FEATURES_LAYER = "gmp"  # the fast CNN's pooled features: the representation h
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
JITTER_P, GRAYSCALE_P = 0.8, 0.2


# ---------------------------------------------------------------- views (data_util.py)
# Batched: the reference draws per image in a tf.data map; one image at a time ran at ~220
# images/s on our 2 cores (both views), slower than the network. The same draws per image,
# made for a whole batch at once, run in a few vectorised ops.

CROP_ATTEMPTS = 10  # the reference: 100 (tf.image.sample_distorted_bounding_box)
MIN_COVERED = 0.1   # a crop covers at least this fraction of the image (the reference's)


def _seeds(seed, n: int):
    return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def crop_boxes(n: int, seed):
    """[n, 4] normalised boxes (y1, x1, y2, x2): per image the first of CROP_ATTEMPTS draws
    of area in CROP_AREA (at least MIN_COVERED) and log-uniform aspect in CROP_ASPECT that
    fits, at a uniform offset; the whole image if none fits (as the reference's fallback)."""
    s_area, s_aspect, s_y, s_x = _seeds(seed, 4)
    area = tf.random.stateless_uniform([n, CROP_ATTEMPTS], s_area, *CROP_AREA)
    log_r = tf.random.stateless_uniform([n, CROP_ATTEMPTS], s_aspect,
                                        np.log(CROP_ASPECT[0]), np.log(CROP_ASPECT[1]))
    w, h = tf.sqrt(area * tf.exp(log_r)), tf.sqrt(area / tf.exp(log_r))
    fits = (w <= 1.0) & (h <= 1.0) & (area >= MIN_COVERED)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    found = tf.reduce_any(fits, axis=1)
    w = tf.where(found, tf.gather(w, first, batch_dims=1), 1.0)
    h = tf.where(found, tf.gather(h, first, batch_dims=1), 1.0)
    y = tf.random.stateless_uniform([n], s_y) * (1.0 - h)
    x = tf.random.stateless_uniform([n], s_x) * (1.0 - w)
    return tf.stack([y, x, y + h, x + w], axis=1)


def random_crop_resize(pools, offsets, index, size: int, seed):
    """`crop_and_resize` of the images at `index` (positions in the pools, stacked), each
    from its own pool at its own size, to size x size in [0, 1] (bilinear: the reference
    resizes bicubic, which crop_and_resize does not offer)."""
    boxes = crop_boxes(tf.shape(index)[0], seed)
    out = None
    for pool, offset in zip(pools, offsets):
        at = tf.clip_by_value(index - offset, 0, pool.shape[0] - 1)
        crops = tf.image.crop_and_resize(pool, boxes, tf.cast(at, tf.int32), [size, size])
        mine = (index >= offset) & (index < offset + pool.shape[0])
        out = crops if out is None else tf.where(mine[:, None, None, None], crops, out)
    return out / 255.0


YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _per_image(seed, n, low, high):
    return tf.random.stateless_uniform([n, 1, 1, 1], seed, low, high)


def color_jitter(images, strength: float, seed):
    """`color_jitter_rand` (simclrv2 brightness: multiplicative): brightness, contrast,
    saturation and hue factors drawn per image from the reference's ranges, clipped to
    [0, 1] after each, in a random order drawn per batch (the reference: per image).
    Saturation and hue are linear maps here (saturation: a blend with the grayscale image,
    torchvision's definition; hue: a rotation of the YIQ chroma plane), where tf.image goes
    through HSV: that cost 2 HSV round trips per view and ran at 650 images/s on our
    2 cores, slower than the network."""
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
    n = tf.shape(images)[0]
    s_order, sb, sc, ss, sh = _seeds(seed, 5)
    fb = _per_image(sb, n, max(1.0 - b, 0.0), 1.0 + b)
    fc = _per_image(sc, n, 1.0 - c, 1.0 + c)
    fs = _per_image(ss, n, 1.0 - s, 1.0 + s)
    dh = _per_image(sh, n, -h, h)

    def contrast(x):
        mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        return (x - mean) * fc + mean

    def saturation(x):
        gray = tf.image.rgb_to_grayscale(x)
        return gray + (x - gray) * fs

    def hue(x):
        theta = 2.0 * np.pi * dh[:, 0, 0, 0]
        cos, sin, zero, one = tf.cos(theta), tf.sin(theta), tf.zeros_like(theta), \
            tf.ones_like(theta)
        rotate = tf.reshape(tf.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1),
                            [-1, 3, 3])
        m = tf.matmul(tf.matmul(tf.constant(np.linalg.inv(YIQ), tf.float32), rotate),
                      tf.constant(YIQ, tf.float32))  # [n, 3, 3]: rgb -> rgb
        return tf.einsum("nhwc,ndc->nhwd", x, m)

    jitters = [lambda x: x * fb, contrast, saturation, hue]
    order = tf.argsort(tf.random.stateless_uniform([4], s_order))
    for i in range(4):
        images = tf.switch_case(order[i], [lambda f=f, x=images: f(x) for f in jitters])
        images = tf.clip_by_value(images, 0.0, 1.0)
    return images


def to_grayscale(images):
    return tf.tile(tf.image.rgb_to_grayscale(images), [1, 1, 1, 3])


def augment_views(pools, offsets, index, size: int, strength: float, seed):
    """One SimCLR view of each image at `index`: crop and resize, flip, jitter (p 0.8),
    grayscale (p 0.2); [n, size, size, 3] in [0, 1]."""
    crop, flip, jitter_p, jitter, gray_p = _seeds(seed, 5)
    n = tf.shape(index)[0]

    def chance(seed, p):
        return (tf.random.stateless_uniform([n], seed) < p)[:, None, None, None]

    x = random_crop_resize(pools, offsets, index, size, crop)
    x = tf.where(chance(flip, 0.5), tf.reverse(x, axis=[2]), x)
    x = tf.where(chance(jitter_p, JITTER_P), color_jitter(x, strength, jitter), x)
    x = tf.where(chance(gray_p, GRAYSCALE_P), to_grayscale(x), x)
    return tf.clip_by_value(x, 0.0, 1.0)


# ---------------------------------------------------------------- the unlabelled stream

@dataclasses.dataclass(frozen=True)
class Pool:
    """The unlabelled training images: train splits only (never val or test), as uint8
    arrays grouped by size (CIFAR at 32 px, the photos at their own size)."""
    arrays: tuple[np.ndarray, ...]
    sources: tuple[str, ...]

    @property
    def size(self) -> int:
        return sum(len(a) for a in self.arrays)


def load_pool(data_dirs) -> Pool:
    arrays, names = [], []
    for d in data_dirs:
        arrays.append(pipeline.take_examples(d, "train")["image"])
        names.append(f"{d} (train, {len(arrays[-1]):,} images)")
    return Pool(tuple(arrays), tuple(names))


def pair_dataset(pool: Pool, size: int, strength: float, seed: int, global_batch: int,
                 start_step: int = 0) -> tf.data.Dataset:
    """Global batches {view1, view2, index} of the endless stream: epoch e is a permutation of
    the pool seeded by (seed, e); batch n (stream positions n*B .. n*B+B-1, whatever the
    start) draws its two views from the seeds split off (seed, n), so a run resumed at
    `start_step` continues exactly."""
    total = pool.size
    offsets = [int(o) for o in np.cumsum([0] + [len(a) for a in pool.arrays])[:-1]]
    pools = [tf.constant(a) for a in pool.arrays]
    first = start_step * global_batch
    start_epoch = first // total

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(total, dtype=tf.int64), tf.stack([tf.cast(seed, tf.int64), e]))
        return tf.data.Dataset.from_tensor_slices((order, e * total + tf.range(
            total, dtype=tf.int64)))

    def views(index, position):
        n = position[0] // global_batch
        s1, s2 = _seeds(tf.stack([tf.cast(seed, tf.int64), n]), 2)
        return {"view1": augment_views(pools, offsets, index, size, strength, s1),
                "view2": augment_views(pools, offsets, index, size, strength, s2),
                "index": index}

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch)
    ds = ds.skip(first - start_epoch * total).batch(global_batch, drop_remainder=True)
    ds = ds.map(views, num_parallel_calls=2, deterministic=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.prefetch(2).with_options(options)


# ---------------------------------------------------------------- the network (model.py)

def projection_head(feature_dim: int, layers: int, out_dim: int, dtype=None) -> keras.Model:
    """`ProjectionHead` (nonlinear): Dense (N(0, 0.01), no bias) + BN per layer, ReLU after
    all but the last; middle layers as wide as the features. BN is ours (FusedBatchNorm,
    synchronised across replicas as the reference's global_bn; it always has a shift, where
    the reference's last layer has none). Output float32."""
    inputs = keras.Input(shape=(feature_dim,), name="features")
    x = inputs
    for j in range(layers):
        last = j == layers - 1
        x = keras.layers.Dense(out_dim if last else feature_dim, use_bias=False,
                               kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                               name=f"proj_{j}", dtype=dtype)(x)
        width = out_dim if last else feature_dim
        x = keras.layers.Reshape((1, 1, width), name=f"proj_{j}_4d", dtype=dtype)(x)
        x = FusedBatchNorm(name=f"proj_{j}_bn", dtype=dtype)(x)
        x = keras.layers.Reshape((width,), name=f"proj_{j}_2d", dtype=dtype)(x)
        if not last:
            x = keras.layers.ReLU(name=f"proj_{j}_relu", dtype=dtype)(x)
    x = keras.layers.Activation("linear", dtype="float32", name="projection")(x)
    return keras.Model(inputs, x, name="projection_head")


def encoder_of(model: keras.Model) -> keras.Model:
    """The network up to its pooled features (its logits layer is not trained here)."""
    return keras.Model(model.input, model.get_layer(FEATURES_LAYER).output, name="encoder")


# ---------------------------------------------------------------- the loss (objective.py)

def cross_replica_concat(x):
    """`tpu_cross_replica_concat`: every replica's `x`, stacked in replica order (one
    replica: `x`). An all-reduce of a tensor zero but in this replica's slot; its gradient
    is all-reduced too, so the negatives' gradients reach the replica that made them."""
    ctx = tf.distribute.get_replica_context()
    n = ctx.num_replicas_in_sync if ctx is not None else 1
    if n == 1:
        return x
    slot = tf.scatter_nd([[ctx.replica_id_in_sync_group]], x[None],
                         tf.concat([[n], tf.shape(x)], 0))
    return tf.reshape(ctx.all_reduce(tf.distribute.ReduceOp.SUM, slot),
                      tf.concat([[-1], tf.shape(x)[1:]], 0))


def nt_xent(hidden, temperature: float):
    """`add_contrastive_loss(hidden, hidden_norm=True, temperature)` for this replica's
    projections [2b, d] (view 1 of its b images, then view 2), as (per-anchor losses [b]:
    loss_a + loss_b of each image, whose mean is the reference's loss; logits_ab [b, 2B]
    rows; label positions [b]) with B the global batch."""
    hidden = tf.math.l2_normalize(tf.cast(hidden, tf.float32), -1)
    h1, h2 = tf.split(hidden, 2, 0)
    b = tf.shape(h1)[0]
    h1_all, h2_all = cross_replica_concat(h1), cross_replica_concat(h2)
    big = tf.shape(h1_all)[0]
    ctx = tf.distribute.get_replica_context()
    replica = 0 if ctx is None else ctx.replica_id_in_sync_group
    idx = tf.range(b) + tf.cast(replica, tf.int32) * b
    labels = tf.one_hot(idx, big * 2)
    masks = tf.one_hot(idx, big)
    aa = tf.matmul(h1, h1_all, transpose_b=True) / temperature - masks * LARGE_NUM
    bb = tf.matmul(h2, h2_all, transpose_b=True) / temperature - masks * LARGE_NUM
    ab = tf.matmul(h1, h2_all, transpose_b=True) / temperature
    ba = tf.matmul(h2, h1_all, transpose_b=True) / temperature
    loss_a = tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([ab, aa], 1))
    loss_b = tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([ba, bb], 1))
    return loss_a + loss_b, ab, idx


# ---------------------------------------------------------------- state and steps

@dataclasses.dataclass
class SimCLRState:
    strategy: tf.distribute.Strategy
    model: keras.Model      # the whole network; its logits layer stays untrained
    encoder: keras.Model    # image -> pooled features
    head: keras.Model       # features -> projection
    optimizer: keras.optimizers.Optimizer
    checkpoint: tf.train.Checkpoint
    manager: tf.train.CheckpointManager
    epoch: tf.Variable
    train_metrics: dict

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    @property
    def active_optimizer(self):
        return self.optimizer

    @property
    def variables(self):
        return self.encoder.trainable_variables + self.head.trainable_variables


def make_metrics() -> dict:
    return {"loss": keras.metrics.Mean("loss"),
            "contrastive_loss": keras.metrics.Mean("contrastive_loss"),
            "contrastive_acc": keras.metrics.Mean("contrastive_acc"),
            "contrastive_entropy": keras.metrics.Mean("contrastive_entropy")}


def plan_steps(cfg: TrainConfig, pool_size: int) -> Plan:
    per_epoch = max(1, pool_size // cfg.batch_size)
    total = cfg.train_steps or max(1, int(round(cfg.epochs * per_epoch)))
    every = cfg.checkpoint_every_steps or per_epoch
    return Plan(per_epoch, total, every, every)


def create_state(cfg: TrainConfig, strategy, manifest: dict, plan: Plan) -> SimCLRState:
    """Network, projection head, optimizer, metrics and checkpoint, inside strategy.scope()."""
    dtype = None if cfg.precision == "float32" else cfg.precision
    with strategy.scope():
        model = make_model(cfg, manifest)
        init_model_from_data(cfg, model, manifest)
        encoder = encoder_of(model)
        head = projection_head(int(encoder.output.shape[-1]), cfg.simclr_projection_layers,
                               cfg.simclr_projection_dim, dtype)
        optimizer = make_optimizer(cfg, learning_rate_schedule(
            cfg, cfg.learning_rate, int(cfg.warmup_epochs * plan.steps_per_epoch),
            plan.total_steps), steps_per_epoch=plan.steps_per_epoch)
        optimizer.build(encoder.trainable_variables + head.trainable_variables)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        checkpoint = tf.train.Checkpoint(model=model, head=head, optimizer=optimizer,
                                         epoch=epoch)
        manager = tf.train.CheckpointManager(checkpoint, cfg.run_dir,
                                             max_to_keep=cfg.keep_checkpoints,
                                             step_counter=optimizer.iterations)
        metrics = make_metrics()
    return SimCLRState(strategy, model, encoder, head, optimizer, checkpoint, manager, epoch,
                       metrics)


def make_train_loop(cfg: TrainConfig, state: SimCLRState):
    """A tf.function running `num_steps` distributed SimCLR steps from `iterator`."""
    strategy, optimizer, metrics = state.strategy, state.optimizer, state.train_metrics
    variables = state.variables

    def replica_step(batch):
        images = tf.concat([batch["view1"], batch["view2"]], 0)
        with tf.GradientTape() as tape:
            hidden = state.head(state.encoder(images, training=True), training=True)
            per_ex, logits_ab, idx = nt_xent(hidden, cfg.simclr_temperature)
            loss = tf.nn.compute_average_loss(per_ex, global_batch_size=cfg.batch_size)
            if cfg.optimizer == "sgd_l2" and cfg.weight_decay:
                loss += tf.nn.scale_regularization_loss(l2_penalty(cfg, variables))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(grads, variables))
        hits = tf.cast(tf.equal(tf.argmax(logits_ab, 1, output_type=tf.int32), idx), tf.float32)
        prob = tf.nn.softmax(logits_ab)
        entropy = -tf.reduce_sum(prob * tf.math.log(prob + 1e-8), -1)
        metrics["loss"].update_state(per_ex)
        metrics["contrastive_loss"].update_state(per_ex)
        metrics["contrastive_acc"].update_state(hits)
        metrics["contrastive_entropy"].update_state(entropy)

    def train_loop(iterator, num_steps):
        for _ in tf.range(num_steps):
            strategy.run(replica_step, args=(next(iterator),))

    return train_loop if cfg.run_eagerly else tf.function(train_loop)


class SimCLRLog(Action):
    """train/contrastive_loss, train/contrastive_acc (the reference's names), entropy,
    learning rate and speed to TensorBoard and the log; then the metrics reset."""

    def __call__(self, ctx):
        state = ctx.state
        values = {k: float(v.result()) for k, v in state.train_metrics.items()}
        del values["loss"]  # the same number as contrastive_loss, under the loop's name
        record.log_train(ctx.writers.train, values, float(state.optimizer.learning_rate),
                         ctx.steps_run, ctx.seconds, ctx.cfg.batch_size, ctx.step)
        ctx.train_values = values
        for metric in state.train_metrics.values():
            metric.reset_state()
        logging.info("train | step %6d | contrastive loss %.4f | acc %.4f | %.1f steps/s | "
                     "%.0f img/s", ctx.step, values["contrastive_loss"],
                     values["contrastive_acc"], ctx.steps_run / ctx.seconds,
                     ctx.steps_run * ctx.cfg.batch_size / ctx.seconds)


def pool_dirs(cfg: TrainConfig) -> list[str]:
    return [cfg.data_dir] + ([cfg.simclr_extra_data] if cfg.simclr_extra_data else [])


def pretrain(cfg: TrainConfig, flagfile: str | None, strategy, actions=()) -> dict:
    """The SimCLR run in cfg.run_dir (resumed if it has a checkpoint); `cfg` as
    loop.prepare_config returns it, the run locked. Writes train_summary.json and exports
    the network (model.keras, its logits layer untrained) for `--weights=<run>`."""
    manifest = pipeline.load_manifest(cfg.data_dir)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if cfg.restart:
        for d in (cfg.run_dir, cfg.tb_dir):
            shutil.rmtree(d, ignore_errors=True)
    pool = load_pool(pool_dirs(cfg))
    plan = plan_steps(cfg, pool.size)
    latest = None if cfg.restart else checkpoints.latest_good_checkpoint(cfg.run_dir)
    state = create_state(cfg, strategy, manifest, plan)
    if latest:
        state.checkpoint.restore(latest).assert_existing_objects_matched()
        logging.info("Resumed %s at step %d", latest, state.step)
    previous = runs.read_summary(cfg.run_dir)
    if runs.is_finished(previous, plan.total_steps, state.step):
        logging.info("Run %s already finished at step %d", cfg.run_name, state.step)
        if not runs.is_exported(cfg.checkpoint_dir, cfg.run_name):  # ended by a shorter plan
            previous["export"] = export_backbone(state.model, cfg, manifest)
            runs.write_summary(cfg.run_dir, previous)
        return previous
    resume.record_session(cfg, flagfile, state.step)
    size = int(manifest["image_shape"][0])
    iterator = [iter(strategy.experimental_distribute_dataset(pair_dataset(  # pipeline.release
        pool, size, cfg.simclr_color_strength, cfg.seed, cfg.batch_size, state.step)))]
    train_loop = make_train_loop(cfg, state)
    ctx = LoopContext(cfg, state, plan, manifest, record.Writers(cfg.tb_dir), None,
                      start_step=state.step, step=state.step,
                      stop_at=min(plan.total_steps, cfg.stop_at_step or plan.total_steps))
    actions = [NanGuard(), SimCLRLog(), *actions, Checkpoint()]
    record.log_devices(strategy, cfg.precision)
    record.log_model_summary(cfg, state.model)
    logging.info("SimCLR %s: %d steps (%d per epoch of %s), global batch %d (x2 views) on %d "
                 "replica(s), %s", cfg.run_name, plan.total_steps, plan.steps_per_epoch,
                 " + ".join(pool.sources), cfg.batch_size, strategy.num_replicas_in_sync,
                 cfg.precision)
    try:
        drive(ctx, actions, train_loop, iterator[0])
    finally:
        pipeline.release(iterator)
    return finish(ctx, previous, pool)


def export_backbone(model: keras.Model, cfg: TrainConfig, manifest: dict) -> str:
    """model.keras (Keras-only, as every export) and its metadata, for `--weights=<run>`; no
    SavedModel and no threshold: its logits layer is untrained, it is not a detector."""
    path = runs.exported_model_path(cfg.checkpoint_dir, cfg.run_name)
    export.save_keras_only(model, path)
    runs.write_metadata(path, {
        "objective": SIMCLR, "backbone_only": True, "classifier": True, "threshold": None,
        "positive_class": manifest["positive_class"],
        "positive_class_id": manifest["positive_class_id"],
        "class_names": manifest["class_names"], "image_shape": manifest["image_shape"],
        "scale": cfg.scale, "tta": cfg.tta, "tta_shifts": cfg.tta_shifts,
        "resize_policy": imaging.recorded_policy(manifest)})
    return path


def finish(ctx: LoopContext, previous: dict, pool: Pool) -> dict:
    cfg, state = ctx.cfg, ctx.state
    sessions = previous.get("sessions", []) + [
        {"start_step": ctx.start_step, "final_step": state.step,
         "train_seconds": round(ctx.train_seconds, 1)}]
    summary = {"run_name": cfg.run_name, "objective": "simclr", "start_step": ctx.start_step,
               "total_steps": ctx.plan.total_steps, "final_step": state.step,
               "epoch": int(state.epoch.numpy()), "pool": list(pool.sources),
               "train_seconds": round(sum(s["train_seconds"] for s in sessions), 1),
               "final_train": {k: round(v, 4) for k, v in ctx.train_values.items()},
               "stopped_early": False, "sessions": sessions}
    if state.step >= ctx.plan.total_steps:
        summary["export"] = export_backbone(state.model, cfg, ctx.manifest)
    ctx.writers.flush()
    runs.write_summary(cfg.run_dir, summary)
    return summary
