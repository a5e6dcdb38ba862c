"""The explanation methods, one `Method` record each in `METHODS`, and `explain`, the one way to
call any of them. The explain app (--method), the lab's figures, the benchmarks and the table
in docs/explain.md read the records; adding a method is its function (or, for a CAM, its
weights function in cams.py) and one record here (docs/extending.md).

The explain app reads the names before TensorFlow loads, from this file's text
(source_values.record_names): keep each record's name its first argument, a literal.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from research.errors import UserError
from research.explain import attribution, cams, core


@dataclasses.dataclass(frozen=True)
class Method:
    name: str                    # --method; the Explanation's method; output folder names
    display: str                 # figure titles and the docs' table
    run: Callable | None = None  # (ex, images, class_index, [layer], **options) -> Explanation
    cam: cams.CamVariant | None = None  # a CAM: run by cams.run_cam at --layer
    layer: bool = False          # explains one feature map, chosen by --layer
    inside: bool = False         # needs the model's inside: a feature map, the head or ReLUs
    # keyword argument -> the ExplainOptions field (flag) that sets it
    options: dict = dataclasses.field(default_factory=dict)
    class_agnostic: bool = False  # the map ignores the explained class
    requires: Callable | None = None  # model -> raises a UserError if the model cannot have it
    what: str = ""               # how the map is computed, one line (the docs' table)
    paper: str = ""
    # library -> its class that research/benchmarks/explain_vs_<library>.py compares with ours
    references: dict = dataclasses.field(default_factory=dict)

    @property
    def needs_inside(self) -> bool:
        return self.layer or self.inside


_SMOOTH = {"aug_smooth": "cam_aug_smooth", "eigen_smooth": "cam_eigen_smooth"}
_SEED = {"seed": "seed"}
_FORWARD = {"batch_size": "forward_batch"}


def _cam(name: str, display: str, variant: cams.CamVariant, what: str, paper: str,
         options: dict | None = None, **fields) -> Method:
    """A member of the CAM family: `variant` on the skeleton, at --layer, smoothable."""
    return Method(name, display, cam=variant, layer=True, inside=True,
                  options={**_SMOOTH, **(options or {})}, what=what, paper=paper, **fields)


def _pgc(name: str) -> dict:
    return {"pytorch-grad-cam": name}


METHODS = (
    _cam("gradcam", "Grad-CAM", cams.GRAD_CAM, "mean over pixels of G",
         "Selvaraju et al. 2017", references={"pytorch-grad-cam": "GradCAM",
                                              "xplique": "GradCAM"}),
    _cam("gradcam_pp", "Grad-CAM++", cams.CamVariant(cams.gradcam_pp_weights),
         "sum_ij alpha_ij ReLU(G_ij), alpha = G^2 / (2 G^2 + sum A * G^3)",
         "Chattopadhyay et al. 2018", references={"pytorch-grad-cam": "GradCAMPlusPlus",
                                                  "xplique": "GradCAMPP"}),
    _cam("hirescam", "HiResCAM", cams.CamVariant(cams.hirescam_weights),
         "G per pixel (sum_k G_k * A_k)", "Draelos & Carin 2020",
         references=_pgc("HiResCAM")),
    _cam("xgradcam", "XGrad-CAM", cams.CamVariant(cams.xgradcam_weights),
         "sum_ij (A_ij / sum A) G_ij", "Fu et al. 2020", references=_pgc("XGradCAM")),
    _cam("layercam", "LayerCAM", cams.CamVariant(cams.layercam_weights),
         "ReLU(G) per pixel", "Jiang et al. 2021", references=_pgc("LayerCAM")),
    _cam("eigencam", "EigenCAM", cams.CamVariant(
        cams.eigencam_weights, features=lambda acts, grads: cams.centred(acts)),
        "first principal component of the centred A (class-agnostic)",
        "Muhammad & Yeasin 2020", class_agnostic=True, references=_pgc("EigenCAM")),
    _cam("eigengradcam", "EigenGrad-CAM", cams.CamVariant(
        cams.eigengradcam_weights, features=lambda acts, grads: cams.centred(grads * acts)),
        "first principal component of the centred G * A", "pytorch-grad-cam",
        references=_pgc("EigenGradCAM")),
    _cam("fem", "FEM", cams.CamVariant(cams.fem_weights),
         "the fraction of A_k's pixels above its mean + 2 std (class-agnostic)",
         "Fuad et al. 2020", class_agnostic=True, references=_pgc("FEM")),
    _cam("ablationcam", "Ablation-CAM", cams.CamVariant(cams.ablation_weights, forward=True),
         "(y - y_k) / y, y_k the score with channel k zeroed", "Desai & Ramaswamy 2020",
         {"batch_size": "ablation_batch"}, references=_pgc("AblationCAM")),
    _cam("scorecam", "Score-CAM", cams.CamVariant(cams.score_weights, forward=True),
         "softmax over channels of the score of the input masked by each (upsampled, "
         "min-max) channel", "Wang et al. 2020",
         {"max_channels": "scorecam_channels", "batch_size": "scorecam_batch"},
         references=_pgc("ScoreCAM")),
    Method("cam", "CAM", attribution.cam, inside=True, requires=attribution.cam_head,
           what="the Dense head's weights on the map its GlobalAveragePooling2D pools",
           paper="Zhou et al. 2016"),
    Method("saliency", "saliency", core.saliency, what="abs(dS/dx), max over colour channels",
           paper="Simonyan et al. 2014", references={"xplique": "Saliency"}),
    Method("saliency_positive", "positive saliency", core.saliency_positive,
           what="ReLU(dS/dx), max over colour channels", paper="Simonyan et al. 2014"),
    Method("smoothgrad", "SmoothGrad", core.smoothgrad,
           options={"n": "smoothgrad_samples", "noise": "smoothgrad_noise", **_SEED},
           what="saliency averaged over noisy copies of the image",
           paper="Smilkov et al. 2017", references={"xplique": "SmoothGrad"}),
    Method("guided_backprop", "guided backprop", attribution.guided_backprop, inside=True,
           what="input gradient through ReLUs that pass only positive gradients",
           paper="Springenberg et al. 2015", references={"xplique": "GuidedBackprop"}),
    Method("guided_gradcam", "guided Grad-CAM", attribution.guided_grad_cam, layer=True,
           what="guided backprop times the upsampled Grad-CAM map",
           paper="Selvaraju et al. 2017"),
    Method("integrated_gradients", "integrated gradients", attribution.integrated_gradients,
           options={"baseline": "ig_baseline", "steps": "ig_steps", **_SEED, **_FORWARD},
           what="(x - baseline) times the mean gradient along the straight path to x",
           paper="Sundararajan et al. 2017", references={"xplique": "IntegratedGradients"}),
    Method("occlusion", "occlusion", attribution.occlusion,
           options={"patch": "occlusion_patch", "stride": "occlusion_stride",
                    "fill": "occlusion_fill", **_FORWARD},
           what="the score's drop when a sliding square is hidden",
           paper="Zeiler & Fergus 2014", references={"xplique": "Occlusion"}),
    Method("lime", "LIME", attribution.lime,
           options={"samples": "lime_samples", "segments": "lime_segments",
                    "segmentation": "lime_segmentation", "kernel_width": "lime_kernel_width",
                    **_SEED, **_FORWARD},
           what="a weighted linear model of the score on superpixels kept or hidden",
           paper="Ribeiro et al. 2016"),
    Method("rise", "RISE", attribution.rise,
           options={"masks": "rise_masks", "grid": "rise_grid", "keep": "rise_keep", **_SEED,
                    **_FORWARD},
           what="random masks weighted by the score of the image they keep",
           paper="Petsiuk et al. 2018"),
)
BY_NAME = {m.name: m for m in METHODS}
NAMES = tuple(BY_NAME)


def find(name: str) -> Method:
    """The record of method `name`; a UserError listing them for any other name."""
    if name not in BY_NAME:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(NAMES)}")
    return BY_NAME[name]


def display_name(name: str) -> str:
    """The method's name in figures (`name` itself for a name without a record)."""
    return BY_NAME[name].display if name in BY_NAME else name


def explain(ex: core.Explainer, method: str, images, class_index=None, layer=None, **params
            ) -> core.Explanation:
    """`method` (a name of METHODS) on raw 0..255 images; `params` are its keyword arguments.
    `layer` is for the methods that explain one layer (CAM's layer is its head's)."""
    m = find(method)
    if m.cam is not None:
        return cams.run_cam(ex, m.cam, m.name, images, class_index, layer, **params)
    if m.layer:
        return m.run(ex, images, class_index, layer=layer, **params)
    return m.run(ex, images, class_index, **params)


def markdown_table() -> str:
    """The methods table of docs/explain.md (between its methods markers), from the records."""
    rows = ["| `--method` | name | what the map is | options (flags) | paper |",
            "| --- | --- | --- | --- | --- |"]
    for m in METHODS:
        flags = ", ".join(f"`--{f}`" for f in dict.fromkeys(m.options.values()))
        what = f"CAM with weights: {m.what}" if m.cam else m.what
        where = " (at `--layer`)" if m.layer else ""
        rows.append(f"| `{m.name}` | {m.display} | {what}{where} | {flags or '-'} | "
                    f"{m.paper} |")
    return "\n".join(rows) + "\n"
