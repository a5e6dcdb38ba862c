"""A training-loop hook: Grad-CAM overlays of fixed val images in TensorBoard at every eval."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from research import plots
from research.data import pipeline
from research.explain.core import Explainer, grad_cam


def pick_examples(data_dir: str, split: str, num: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first num/2 positives and num - num/2 negatives of a split, in split order."""
    want_pos, want_neg = num // 2, num - num // 2
    images, labels, class_ids = [], [], []
    pos = neg = 0
    for b in pipeline.make_dataset(data_dir, split, 500, training=False, scale="uint8"):
        for img, lab, cid in zip(b["image"].numpy(), b["label"].numpy(), b["class_id"].numpy()):
            if lab and pos < want_pos:
                pos += 1
            elif not lab and neg < want_neg:
                neg += 1
            else:
                continue
            images.append(img)
            labels.append(lab)
            class_ids.append(cid)
        if pos == want_pos and neg == want_neg:
            break
    order = np.argsort(-np.asarray(labels), kind="stable")  # positives first
    return (np.asarray(images)[order], np.asarray(labels)[order],
            np.asarray(class_ids)[order])


class GradCamHook:
    """Call with (model, summary writer, step): logs one image grid named 'gradcam'.

    The explained score is the positive class's logit (the detector's evidence for 'cat'),
    so the overlays show where the network finds cat-ness, in cats and in non-cats.
    """

    def __init__(self, data_dir: str, num_images: int, scale: str, objective: str,
                 positive_id: int, split: str = "val"):
        self.images, self.labels, self.class_ids = pick_examples(data_dir, split, num_images)
        self.names = pipeline.load_manifest(data_dir)["class_names"]
        self.scale = scale
        self.class_index = positive_id if objective == "multiclass" else 0
        self._explainer = None

    def __call__(self, model, writer, step: int) -> None:
        if self._explainer is None or self._explainer.model is not model:
            pre = (lambda x: x / 255.0) if self.scale == "unit" else (lambda x: x)
            self._explainer = Explainer(model, pre)
        ex = grad_cam(self._explainer, self.images.astype(np.float32), self.class_index)
        titles = [f"{self.names[c]} p={p:.2f}" for c, p in zip(self.class_ids,
                                                               ex.probabilities)]
        from research.explain.render import overlay_grid

        fig = overlay_grid(self.images, ex.maps, titles,
                           title=f"Grad-CAM of the positive-class score at step {step} "
                                 f"(layer {ex.layer})")
        png = plots.figure_to_png(fig)
        with writer.as_default(step=step):
            tf.summary.image("gradcam", tf.image.decode_png(png)[None], step=step)
