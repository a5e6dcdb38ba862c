"""How the explain app and the lab explain: the knobs of the methods and of the pictures, one
field each (the explain app's flags are derived from them). Each default is the library
function's own, read from its signature in the source text (source_values: no TensorFlow), so
it lives in one place."""

from __future__ import annotations

import dataclasses

from research import machine
from research.explain.source_values import constant
from research.explain.source_values import default as _arg
from research.fields import first_error, setting

# float16 is left out: unscaled score gradients underflow in it.
PRECISIONS = tuple(p for p in machine.PRECISIONS if p != "mixed_float16")


@dataclasses.dataclass
class ExplainOptions:
    smoothgrad_samples: int = setting(_arg("core.smoothgrad", "n"), "SmoothGrad: noisy samples.",
                                      ge=1)
    smoothgrad_noise: float = setting(_arg("core.smoothgrad", "noise"), "SmoothGrad: noise std "
                                      "as a fraction of the image's value range.", ge=0)
    scorecam_channels: int = setting(_arg("cams.score_weights", "max_channels"), "Score-CAM: "
                                     "channels used (highest mean first).", ge=1)
    scorecam_batch: int = setting(_arg("cams.score_weights", "batch_size"), "Score-CAM: masked "
                                  "images per forward pass (bounds the memory).", ge=1)
    ablation_batch: int = setting(_arg("cams.ablation_weights", "batch_size"), "Ablation-CAM: "
                                  "(image, channel) pairs per forward pass.", ge=1)
    cam_aug_smooth: bool = setting(_arg("cams.run_cam", "aug_smooth"), "CAM family: average "
                                   "the maps of the image flipped and at 0.9/1.0/1.1 "
                                   "brightness (pytorch-grad-cam's aug_smooth; 6x the cost).")
    cam_eigen_smooth: bool = setting(_arg("cams.run_cam", "eigen_smooth"), "CAM family: the "
                                     "first principal component of the weighted activations "
                                     "instead of their sum (pytorch-grad-cam's eigen_smooth).")
    occlusion_patch: float = setting(_arg("attribution.occlusion", "patch"), "Occlusion: side "
                                     "of the square, as a fraction of the input's shorter "
                                     "side.", gt=0, le=1)
    occlusion_stride: float = setting(_arg("attribution.occlusion", "stride"), "Occlusion: step "
                                      "between squares, same unit.", gt=0, le=1)
    occlusion_fill: str = setting(_arg("attribution.occlusion", "fill"), "Occlusion: what hides "
                                  "a patch (mean: the image's mean colour; black: zeros).",
                                  choices=constant("attribution", "FILLS"))
    ig_baseline: str = setting(_arg("attribution.integrated_gradients", "baseline"), "Integrated "
                               "gradients: the baseline image (black: zeros; mean: the "
                               "image's mean colour; uniform: seeded noise).",
                               choices=constant("attribution", "BASELINES"))
    ig_steps: int = setting(_arg("attribution.integrated_gradients", "steps"), "Integrated "
                            "gradients: trapezoid steps along the path (steps + 1 gradients).",
                            ge=1)
    lime_samples: int = setting(_arg("attribution.lime", "samples"), "LIME: masked copies per "
                                "image.", ge=2)
    lime_segments: int = setting(_arg("attribution.lime", "segments"), "LIME: superpixels "
                                 "(about).", ge=2)
    lime_segmentation: str = setting(_arg("attribution.lime", "segmentation"), "LIME: slic "
                                     "(k-means on colour and position) or grid.",
                                     choices=constant("attribution", "SEGMENTATIONS"))
    lime_kernel_width: float = setting(_arg("attribution.lime", "kernel_width"), "LIME: width "
                                       "of the kernel on the cosine distance.", gt=0)
    lime_top: int = setting(3, "LIME: superpixels kept in lime_top_<file>.png.", ge=1)
    rise_masks: int = setting(_arg("attribution.rise", "masks"), "RISE: random masks (forward "
                              "passes) per image.", ge=1)
    rise_grid: int = setting(_arg("attribution.rise", "grid"), "RISE: cells per side of the "
                             "masks' coarse grid.", ge=1)
    rise_keep: float = setting(_arg("attribution.rise", "keep"), "RISE: probability that a "
                               "cell is kept.", gt=0, le=1)
    forward_batch: int = setting(_arg("attribution.occlusion", "batch_size"), "Occlusion, LIME, "
                                 "RISE, integrated gradients: images per forward pass (bounds the "
                                 "memory).", ge=1)
    alpha: float = setting(_arg("render.save_explanation", "alpha"), "Overlay opacity of the "
                           "heatmap.", ge=0, le=1)
    num_filters: int = setting(16, "Filters per layer for --visualize=filters.", ge=1)
    filter_steps: int = setting(_arg("activations.visualize_filter", "steps"), "Gradient-ascent "
                                "steps per filter.", ge=1)
    filter_step_size: float = setting(_arg("activations.visualize_filter", "step_size"), "RMS "
                                      "pixel change (0..255) per ascent step.", gt=0)
    max_channels: int = setting(_arg("activations.activation_grid", "max_channels"), "Channels "
                                "drawn per layer for --visualize=activations.", ge=1)
    dream_octaves: int = setting(_arg("dream.dream", "octaves"), "DeepDream: octaves.", ge=1)
    dream_octave_scale: float = setting(_arg("dream.dream", "octave_scale"), "DeepDream: size "
                                        "ratio between octaves.", ge=1)
    dream_steps: int = setting(_arg("dream.dream", "steps"), "DeepDream: gradient-ascent steps "
                               "per octave.", ge=1)
    dream_step_size: float = setting(_arg("dream.dream", "step_size"), "DeepDream: mean "
                                     "absolute pixel change (0..255) per step.", gt=0)
    batch_size: int = setting(16, "Images explained per batch.", ge=1)
    seed: int = setting(0, "Seed for SmoothGrad noise, LIME masks, the uniform baseline, "
                        "filter start images and DeepDream jitter.", ge=0, le=2**32 - 1)

    def validate(self) -> tuple[str, str] | None:
        return first_error(self)

    def method_params(self, method: str) -> dict:
        """The keyword arguments of `methods.explain` for `method` (its record's options)."""
        from research.explain import methods  # by the time a method runs, TensorFlow is loaded

        return {arg: getattr(self, field) for arg, field in methods.find(method).options.items()}

    def dream_params(self) -> dict:
        return {"octaves": self.dream_octaves, "octave_scale": self.dream_octave_scale,
                "steps": self.dream_steps, "step_size": self.dream_step_size,
                "seed": self.seed}
