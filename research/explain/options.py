"""How the explain app and the lab explain: the knobs of the methods and of the pictures, one
field each (the explain app's flags are derived from them). Each default is the library
function's own, read from its signature, so it lives in one place."""

from __future__ import annotations

import dataclasses
import inspect

from research.explain import activations, core, dream, render
from research.fields import first_error, setting


def _arg(fn, name: str):
    """The default of parameter `name` of `fn`."""
    return inspect.signature(fn).parameters[name].default


@dataclasses.dataclass
class ExplainOptions:
    smoothgrad_samples: int = setting(_arg(core.smoothgrad, "n"), "SmoothGrad: noisy samples.",
                                      ge=1)
    smoothgrad_noise: float = setting(_arg(core.smoothgrad, "noise"), "SmoothGrad: noise std "
                                      "as a fraction of the image's value range.", ge=0)
    scorecam_channels: int = setting(_arg(core.score_cam, "max_channels"), "Score-CAM: "
                                     "channels used (highest mean first).", ge=1)
    scorecam_batch: int = setting(_arg(core.score_cam, "batch_size"), "Score-CAM: masked "
                                  "images per forward pass (bounds the memory).", ge=1)
    alpha: float = setting(_arg(render.save_explanation, "alpha"), "Overlay opacity of the "
                           "heatmap.", ge=0, le=1)
    num_filters: int = setting(16, "Filters per layer for --visualize=filters.", ge=1)
    filter_steps: int = setting(_arg(activations.visualize_filter, "steps"), "Gradient-ascent "
                                "steps per filter.", ge=1)
    filter_step_size: float = setting(_arg(activations.visualize_filter, "step_size"), "RMS "
                                      "pixel change (0..255) per ascent step.", gt=0)
    max_channels: int = setting(_arg(activations.activation_grid, "max_channels"), "Channels "
                                "drawn per layer for --visualize=activations.", ge=1)
    dream_octaves: int = setting(_arg(dream.dream, "octaves"), "DeepDream: octaves.", ge=1)
    dream_octave_scale: float = setting(_arg(dream.dream, "octave_scale"), "DeepDream: size "
                                        "ratio between octaves.", ge=1)
    dream_steps: int = setting(_arg(dream.dream, "steps"), "DeepDream: gradient-ascent steps "
                               "per octave.", ge=1)
    dream_step_size: float = setting(_arg(dream.dream, "step_size"), "DeepDream: mean "
                                     "absolute pixel change (0..255) per step.", gt=0)
    batch_size: int = setting(16, "Images explained per batch.", ge=1)
    seed: int = setting(0, "Seed for SmoothGrad noise, filter start images and DeepDream "
                        "jitter.", ge=0, le=2**32 - 1)

    def validate(self) -> tuple[str, str] | None:
        return first_error(self)

    def method_params(self, method: str) -> dict:
        """The keyword arguments of `core.explain` for `method`."""
        return {"smoothgrad": {"n": self.smoothgrad_samples, "noise": self.smoothgrad_noise,
                               "seed": self.seed},
                "scorecam": {"max_channels": self.scorecam_channels,
                             "batch_size": self.scorecam_batch}}.get(method, {})

    def dream_params(self) -> dict:
        return {"octaves": self.dream_octaves, "octave_scale": self.dream_octave_scale,
                "steps": self.dream_steps, "step_size": self.dream_step_size,
                "seed": self.seed}
