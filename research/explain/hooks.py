"""A training-loop hook: Grad-CAM overlays of fixed val images in TensorBoard at every eval.

The train app wraps it in `research.training.actions.OnEval`; `training` never imports
`explain`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from absl import logging

from research import plots
from research.data import pipeline
from research.detector import preprocess_fn
from research.explain.cams import grad_cam
from research.explain.core import Explainer, LayerNotFoundError
from research.explain.render import overlay_grid
from research.training.actions import OnEval


class GradCamHook:
    """Call with (model, summary writer, step): logs one image grid named 'gradcam'.

    The explained score is the positive class's logit (the detector's evidence for 'cat'),
    so the overlays show where the network finds cat-ness, in cats and in non-cats. The
    images (half positives, first in split order) are read at the first call.
    """

    def __init__(self, data_dir: str, num_images: int, scale: str, objective: str,
                 split: str = "val", run_name: str = ""):
        self.data_dir, self.num_images, self.split = data_dir, num_images, split
        self.run_name = run_name
        self.scale, self.objective = scale, objective
        self.examples = None
        self._explainer = None
        self.off = False  # the model has no feature map (the dense baseline)

    def _load(self) -> None:
        manifest = pipeline.load_manifest(self.data_dir)
        self.names = manifest["class_names"]
        self.class_index = manifest["positive_class_id"] if self.objective == "multiclass" else 0
        self.examples = pipeline.take_examples(self.data_dir, self.split, self.num_images,
                                               filter="balanced")

    def __call__(self, model, writer, step: int) -> None:
        if self.off:
            return
        if self.examples is None:
            self._load()
        if self._explainer is None or self._explainer.model is not model:
            self._explainer = Explainer(model, preprocess_fn(self.scale))
        images = self.examples["image"]
        try:
            ex = grad_cam(self._explainer, images.astype(np.float32), self.class_index)
        except LayerNotFoundError as e:
            logging.warning("No Grad-CAM in TensorBoard: %s", e)
            self.off = True
            return
        titles = [f"{self.names[c]} p={p:.2f}" for c, p in zip(self.examples["class_id"],
                                                               ex.probabilities)]
        title = (f"{self.run_name}: " if self.run_name else "") + (
            f"Grad-CAM of the positive-class score at step {step} (layer {ex.layer})")
        fig = overlay_grid(images, ex.maps, titles, title=title)
        png = plots.figure_to_png(fig)
        with writer.as_default(step=step):
            tf.summary.image("gradcam", tf.image.decode_png(png)[None], step=step)


def gradcam_actions(cfg) -> list:
    """The training actions that log Grad-CAM overlays at every eval for a TrainConfig:
    none with --gradcam_images=0, nor for the features recipe (its head trains on feature
    vectors: nothing spatial to map), nor for a classifier (no positive-class score)."""
    if not cfg.gradcam_images or cfg.transfer == "features" or cfg.objective == "simclr" or \
            cfg.positive_class(pipeline.load_manifest(cfg.data_dir)) is None:
        return []
    return [OnEval(GradCamHook(cfg.data_dir, cfg.gradcam_images, scale=cfg.input_scale,
                               objective=cfg.objective, run_name=cfg.run_name))]
