"""The explanation methods by name, and `explain`, the one way to call any of them."""

from __future__ import annotations

from research.explain import attribution, cams, core
from research.errors import UserError

# The CAM family (cams.VARIANTS, one skeleton), then the others.
METHODS = {
    **{v.name: cams.method(v.name) for v in cams.VARIANTS},
    "cam": attribution.cam,
    "saliency": core.saliency,
    "saliency_positive": core.saliency_positive,
    "smoothgrad": core.smoothgrad,
    "guided_backprop": attribution.guided_backprop,
    "guided_gradcam": attribution.guided_grad_cam,
    "integrated_gradients": attribution.integrated_gradients,
    "occlusion": attribution.occlusion,
    "lime": attribution.lime,
    "rise": attribution.rise,
}
# Methods that explain one feature map, chosen by --layer (default: the last spatial one).
LAYER_METHODS = tuple(v.name for v in cams.VARIANTS) + ("guided_gradcam",)


def explain(ex: core.Explainer, method: str, images, class_index=None, layer=None, **params
            ) -> core.Explanation:
    """`method` (a key of METHODS) on raw 0..255 images; `params` are its keyword arguments.
    `layer` is for LAYER_METHODS (CAM's layer is its head's)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    fn = METHODS[method]
    if method in LAYER_METHODS:
        return fn(ex, images, class_index, layer=layer, **params)
    return fn(ex, images, class_index, **params)
