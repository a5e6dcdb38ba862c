"""What can be asked of each model, without building one: every model's options dataclass
(the one home of its defaults, ranges and help; the train app's flags), the backbone
catalogue (input sizes, blocks, weight files), and the check of a model's options.

Outside research/models on purpose: importing that package imports Keras (it registers our
layers), and the train app checks its flags before any heavy import. The builders are in the
model modules (research.models.scratch, .fast, .small_convnet, .backbones); research.models
maps names to them.
"""

from __future__ import annotations

import dataclasses
import os

from research.fields import default_of, first_error, setting

ACTIVATIONS = ("gelu", "relu")
LOGITS_INITS = ("zeros", "uniform", "uniform_unit_std")
HEADS = ("gap", "max", "flatten")
DOWNSAMPLES = ("maxpool", "avgpool", "stride", "none")  # the scratch CNN's, per stage
CONV_DROPOUT_TYPES = ("plain", "spatial")
WEIGHTS_CHOICES_HELP = "imagenet | none | <.h5/.weights.h5 file> | <run name>"


@dataclasses.dataclass(frozen=True)
class Backbone:
    """Everything about one backbone, in one place: the builders (research.models), export,
    explain, style transfer and docs read it. Adding a keras.applications family is one
    record here (docs/extending.md)."""
    name: str                  # --model
    constructor: str | None    # keras.applications.<constructor>, resolved only when built
    preprocess: str            # its preprocess_input's imagenet_utils mode (caffe, tf, torch,
    #                            none: the model normalises inside); "" for ours
    min_size: int              # the smallest input its constructor accepts
    native_size: int           # the size its ImageNet weights were trained at
    default_size: int          # what a 2-core CPU trains in minutes
    blocks: tuple[str, ...]    # block name prefixes, first to last
    cam_layer: str | None = None  # Grad-CAM's default layer: its last feature map
    # Keras' cache names and md5s (from keras/src/applications/<module>.py) of the ImageNet
    # weights without (train) and with (explain --model) the classifier; None: not hashed
    weights_file: str | None = None
    weights_md5: str | None = None
    top_weights_file: str | None = None
    top_weights_md5: str | None = None
    content_layer: str | None = None  # style transfer's defaults (Gatys et al.: VGG)
    style_layers: tuple[str, ...] = ()


_VGG_BLOCKS = ("block1", "block2", "block3", "block4", "block5")
_VGG_STYLE = dict(content_layer="block5_conv2",
                  style_layers=tuple(f"block{i}_conv1" for i in range(1, 6)))
BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("vgg16", "VGG16", "caffe", 32, 224, 64, _VGG_BLOCKS, "block5_conv3",
             "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "6d6bbae143d832006294945121d1f1fc",
             "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
             "64373286793e3c8b2b4e3219cbf3544b", **_VGG_STYLE),
    Backbone("vgg19", "VGG19", "caffe", 32, 224, 64, _VGG_BLOCKS, "block5_conv4",
             "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "253f8cb515780f3b799900260a226db6",
             "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
             "cbe5617147190e668d6c5d5026f83318", **_VGG_STYLE),
    Backbone("resnet50", "ResNet50", "caffe", 32, 224, 64,
             ("conv1", "conv2", "conv3", "conv4", "conv5"), "conv5_block3_out",
             "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "4d473c1dd8becc155b73f8504c6f6626",
             "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
             "2cb95161c43110f7111970584f804107"),
    # Keras downloads MobileNetV2's weights unhashed.
    Backbone("mobilenet_v2", "MobileNetV2", "tf", 32, 224, 96,
             ("Conv1", "expanded_conv", *(f"block_{i}" for i in range(1, 17)), "Conv_1"),
             "out_relu", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
             None, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5", None),
    Backbone("efficientnetb0", "EfficientNetB0", "none", 32, 224, 64,
             ("stem", "block1", "block2", "block3", "block4", "block5", "block6", "block7",
              "top"), "top_activation", "efficientnetb0_notop.h5",
             "50bc09e76180e00e4465e1a485ddc09d", "efficientnetb0.h5",
             "902e53a9f72be733fc0bcb005b3ebbac"),
    # Keras names Inception's layers generically: its blocks are the concatenations that end
    # them (--fine_tune_from=mixed8, the default: the top two blocks train, as keras' example).
    Backbone("inceptionv3", "InceptionV3", "tf", 75, 299, 75,
             tuple(f"mixed{i}" for i in range(9)), "mixed10",
             "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "bcbd6486424b2319ff4ef7d526e38f63",
             "inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
             "9a0d58056eeedaa3f26cb7ebd46da564"),
    Backbone("xception", "Xception", "tf", 71, 299, 75,
             tuple(f"block{i}" for i in range(1, 15)), "block14_sepconv2_act",
             "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
             "b0042744bf5b25fce3cb969f33bebb97",
             "xception_weights_tf_dim_ordering_tf_kernels.h5",
             "0a58e3b7378bc2990ea3b43d5981f1f6"),
    # Our network normalises its own [0, 1] input: the model only rescales raw pixels for it.
    Backbone("scratch", None, "", 8, 32, 32, ("stem", "stage0", "stage1", "stage2")),
    Backbone("fast", None, "", 8, 32, 32, ("whiten", "group0", "group1", "group2")),
    # Any SavedModel / TF-Hub folder (--savedmodel_dir), run whole through keras.layers.
    # TFSMLayer: frozen, no blocks to cut or unfreeze; 224 is TF-Hub's usual input size.
    Backbone("savedmodel", None, "", 1, 224, 224, ()),
)}
# keras.applications backbones (explain --model offers those with a classifier's weights).
APPLICATIONS = tuple(b.name for b in BACKBONES.values() if b.constructor)


def backbones_table() -> str:
    """The keras.applications backbones as a Markdown table, from the records (for a docs
    page between `<!-- backbones:begin -->` and `<!-- backbones:end -->`)."""
    rows = ["| `--model` | keras.applications | preprocess | input px: min / native / "
            "default | Grad-CAM layer | ImageNet weights without the classifier (md5) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name in APPLICATIONS:
        b = BACKBONES[name]
        md5 = f" ({b.weights_md5})" if b.weights_md5 else ""
        rows.append(f"| `{name}` | `{b.constructor}` | {b.preprocess} | {b.min_size} / "
                    f"{b.native_size} / {b.default_size} | `{b.cam_layer}` | "
                    f"`{b.weights_file}`{md5} |")
    return "\n".join(rows) + "\n"


SAVEDMODEL = "savedmodel"
# keras.applications' imagenet_utils modes, and unit ([0, 1]: what most TF-Hub models want)
SAVEDMODEL_PREPROCESS = ("none", "unit", "tf", "caffe")
SAVEDMODEL_TRANSFERS = ("features", "frozen")
# Our own networks: backbones only through one of our runs (--weights=<run name> or a file);
# they normalise their own [0, 1] input, so a transfer model only rescales raw pixels for them.
OWN_NETWORKS = ("scratch", "fast")


@dataclasses.dataclass
class ScratchOptions:
    """The scratch network's options and their one set of defaults (the train app's flags)."""
    widths: tuple[int, ...] = setting((64, 128, 256), "Scratch CNN: channels per stage.", ge=1)
    res_blocks: tuple[int, ...] = setting((1, 0, 1), "Scratch CNN: residual blocks per stage.",
                                          ge=0)
    stem_width: int = setting(32, "Scratch CNN: channels of the stem conv.", ge=1)
    dropout: float = setting(0.0, "Dropout before the logits.", ge=0, lt=1)
    feature_scale: float = setting(0.125, "Scratch CNN: multiply the pooled features by this "
                                   "before the logits layer (tames the loss spike of early "
                                   "training).", gt=0)
    downsample: str = setting("maxpool", "Scratch CNN: how each stage halves the resolution "
                              "after its first conv. maxpool: a 2x2 max-pool (the network "
                              "before this option); avgpool: a 2x2 average pool; stride: that "
                              "conv has stride 2, no pooling layer; none: no downsampling, "
                              "every stage at full resolution (about 18x the multiply-adds of "
                              "maxpool at the default widths, 11x at 16,32,64). "
                              "--pool_before_bn applies to maxpool and avgpool only.",
                              choices=DOWNSAMPLES)
    pool_before_bn: bool = setting(True, "Scratch CNN: pool each stage's conv output before "
                                   "BN and ReLU (20% faster on CPU; else conv-BN-ReLU-pool). "
                                   "maxpool: the same function up to BN's statistics (a "
                                   "max commutes with ReLU and with BN's increasing map while "
                                   "gamma > 0); avgpool: it averages pre-activations, so conv "
                                   "and pool act as one linear 4x4 stride-2 filter, where "
                                   "conv-BN-ReLU-pool averages rectified features; stride and "
                                   "none: no pooling layer, always conv-BN-ReLU.")
    stage_dilation: tuple[int, ...] = setting((), "Scratch CNN: dilation rate of every 3x3 "
                                              "conv of each stage (one per stage, e.g. 1,2,4; "
                                              "empty: 1 everywhere, the network before this "
                                              "option). A rate d spreads a conv's taps d pixels "
                                              "apart: receptive field +2d per conv at the same "
                                              "cost. With --downsample=none it is what grows "
                                              "the receptive field at full resolution; a "
                                              "strided conv cannot also be dilated, so "
                                              "--downsample=stride takes 1 in every stage "
                                              "but the first.", ge=1)
    conv_dropout: float = setting(0.0, "Scratch CNN: dropout on the feature maps after each "
                                  "stage's first conv block (between convolutions; --dropout "
                                  "is the one before the logits). 0: none.", ge=0, lt=1)
    conv_dropout_type: str = setting("plain", "Scratch CNN: plain drops single activations "
                                     "(Bernoulli noise on the feature maps, keras Dropout); "
                                     "spatial drops whole channels (SpatialDropout2D), as "
                                     "neighbouring pixels of a map are correlated.",
                                     choices=CONV_DROPOUT_TYPES)

    def dilation_of(self, stage: int) -> int:
        return self.stage_dilation[stage] if self.stage_dilation else 1

    def validate(self) -> tuple[str, str] | None:
        """(flag, message) for the first bad option, else None."""
        if not self.widths:
            return "widths", "give at least one stage"
        if len(self.widths) != len(self.res_blocks):
            return "widths", (f"{len(self.widths)} stages but --res_blocks has "
                              f"{len(self.res_blocks)}")
        if self.stage_dilation and len(self.stage_dilation) != len(self.widths):
            return "stage_dilation", (f"{len(self.stage_dilation)} rates for "
                                      f"{len(self.widths)} stages: give one per stage")
        if self.downsample == "stride" and any(d > 1 for d in self.stage_dilation[1:]):
            return "stage_dilation", ("with --downsample=stride each stage after the first "
                                      "opens with a stride-2 conv, which cannot be dilated: "
                                      "give 1 there, or another --downsample")
        return first_error(self)


@dataclasses.dataclass
class FastOptions:
    """The fast network's options and their one set of defaults (the train app's flags)."""
    widths: tuple[int, ...] = setting((64, 256, 256), "Fast CNN: channels per conv group.",
                                      ge=1)
    group_convs: int = setting(2, "Fast CNN: convolutions per group. 2: conv, pool, BN, act, "
                               "conv, BN, act (airbench94/95); 3: then conv, BN, plus the "
                               "group's first activation (a residual over the last two "
                               "convs), act (airbench96's ConvGroup).", ge=2, le=3)
    whiten_kernel: int = setting(2, "Fast CNN: patch size of the whitening conv "
                                 "(2 k^2 C channels).", ge=1)
    activation: str = setting("gelu", "Fast CNN: activation.", choices=ACTIVATIONS)
    bn_momentum: float = setting(0.4, "Fast CNN: BN moving-average momentum (Keras "
                                 "convention; 0.4 keeps 60% of each batch: short runs).",
                                 ge=0, lt=1)
    bn_epsilon: float = setting(1e-5, "Fast CNN: BN epsilon added to the batch variance "
                                "(airbench uses 1e-12).", gt=0, lt=1)
    feature_scale: float = setting(1 / 9, "Fast CNN: multiply the pooled features by this "
                                   "before the logits layer.", gt=0)
    dropout: float = setting(0.0, "Dropout before the logits.", ge=0, lt=1)
    dirac_init: bool = setting(True, "Fast CNN: start each conv as the identity on its input "
                               "channels (the rest uniform, +-1/sqrt(fan_in)) instead of "
                               "He-normal.")
    logits_bias: bool = setting(True, "Fast CNN: the logits layer has a bias (airbench's has "
                                "none).")
    logits_init: str = setting("zeros", "Fast CNN: the logits kernel starts at zero, or "
                               "uniform in +-1/sqrt(fan_in) (PyTorch's nn.Linear, airbench), "
                               "or that divided by its own standard deviation "
                               "(uniform_unit_std: airbench94_muon's reset()).",
                               choices=LOGITS_INITS)

    def validate(self) -> tuple[str, str] | None:
        """(flag, message) for the first bad option, else None."""
        if not self.widths:
            return "widths", "give at least one conv group"
        return first_error(self)


@dataclasses.dataclass
class SmallConvnetOptions:
    """The small convnet's options (the train app's flags)."""
    dropout: float = setting(0.0, "Dropout before the logits.", ge=0, lt=1)

    def validate(self) -> tuple[str, str] | None:
        return first_error(self)


@dataclasses.dataclass
class DenseOptions:
    """The densely connected baseline's options (Chollet's part-1 network)."""
    dense_units: int = setting(512, "Dense baseline: units of its one hidden ReLU layer on the "
                               "flattened image.", ge=1)
    dropout: float = setting(0.0, "Dropout before the logits.", ge=0, lt=1)

    def validate(self) -> tuple[str, str] | None:
        return first_error(self)


@dataclasses.dataclass
class MnistConvnetOptions:
    """Chollet's MNIST convnet's options (the train app's flags)."""
    dropout: float = setting(0.0, "Dropout before the logits.", ge=0, lt=1)

    def validate(self) -> tuple[str, str] | None:
        return first_error(self)


@dataclasses.dataclass
class SavedModelOptions:
    """How a SavedModel / TF-Hub folder is used (--model=savedmodel of train and explain,
    predict --model=<a SavedModel folder>)."""
    savedmodel_dir: str | None = setting(None, "--model=savedmodel: a SavedModel folder (one "
                                         "with saved_model.pb, e.g. a TF-Hub model), loaded "
                                         "with keras.layers.TFSMLayer and never trained.")
    savedmodel_preprocess: str = setting("none", "--model=savedmodel: what its input pixels "
                                         "(0..255) become first: none (as they are), unit "
                                         "(x / 255: most TF-Hub image models), tf "
                                         "(x / 127.5 - 1), caffe (RGB -> BGR minus the "
                                         "ImageNet mean).", choices=SAVEDMODEL_PREPROCESS)
    savedmodel_endpoint: str = setting("serving_default", "--model=savedmodel: the endpoint "
                                       "called (a signature, or an attribute such as "
                                       "'serve' of a Keras export).")
    savedmodel_output: str | None = setting(None, "--model=savedmodel: the output key when "
                                            "the endpoint returns several.")


@dataclasses.dataclass
class TransferOptions(SavedModelOptions):
    """The transfer model's options and their one set of defaults (the train app's flags)."""
    weights: str = setting("imagenet", f"Backbone weights: {WEIGHTS_CHOICES_HELP}. imagenet "
                           "uses Keras' download and cache (~/.keras/models); a run name loads "
                           "the model of one of our runs as the backbone.")
    image_size: int | None = setting(None, "Size the backbone sees (the model resizes its "
                                     "input). Default per backbone, for a 2-core CPU (64 for "
                                     "VGG16); bigger sizes are for GPUs.", ge=1)
    cut_at: str | None = setting(None, "Model surgery: the backbone ends at this layer (a bad "
                                 "name lists them).")
    head: str = setting("gap", "How the head pools the backbone's feature map (max: as the "
                        "fast CNN does).", choices=HEADS)
    head_units: tuple[int, ...] = setting((256,), "Hidden Dense layers of the head (ReLU), "
                                          "e.g. 256 or 512,128; empty: none.", ge=1)
    dropout: float = setting(0.0, "Dropout before the logits.", ge=0, lt=1)
    head_from: tuple[str, ...] = setting((), "CLASS,OTHER of the --weights run (e.g. cat,dog): "
                                         "the new one-logit head starts at that run's "
                                         "zero-shot score log p(CLASS)/p(OTHER) (needs no "
                                         "--head_units and the run's own pooling as --head).")

    def validate(self) -> tuple[str, str] | None:
        if self.head_from and len(self.head_from) != 2:
            return "head_from", f"give two classes (CLASS,OTHER), got {','.join(self.head_from)}"
        if self.head_from and self.head_units:
            return "head_from", "the head starts from the run's logits: give no --head_units"
        return first_error(self)


MODEL_OPTIONS: dict[str, type] = {
    "scratch": ScratchOptions,
    "fast": FastOptions,
    "small_convnet": SmallConvnetOptions,
    "dense": DenseOptions,
    "mnist_convnet": MnistConvnetOptions,
    **{name: TransferOptions for name in BACKBONES if name not in OWN_NETWORKS},
}
MODEL_NAMES = tuple(sorted(MODEL_OPTIONS))  # a model without options maps to None


def options_class(name: str, transfer: bool = False) -> type | None:
    """The options dataclass of model `name`; TransferOptions for any backbone in a transfer
    recipe (the scratch network too)."""
    return TransferOptions if transfer and name in BACKBONES else MODEL_OPTIONS.get(name)


def image_size_of(backbone: str, opts: TransferOptions) -> int:
    return opts.image_size or BACKBONES[backbone].default_size


def check_transfer_options(backbone: str, opts: TransferOptions
                           ) -> tuple[str, str] | None:
    """(flag, message) for a setting the backbone cannot take, before any work."""
    if backbone not in BACKBONES:
        return "model", f"{backbone!r} is not a backbone; choose one of {', '.join(BACKBONES)}"
    problem = opts.validate()
    if problem:
        return problem
    if (backbone == SAVEDMODEL) != (opts.savedmodel_dir is not None):
        return ("savedmodel_dir", f"{opts.savedmodel_dir or 'a SavedModel folder'} goes with "
                "--model=savedmodel and only with it")
    if backbone == SAVEDMODEL:
        return check_savedmodel_options(opts)
    b = BACKBONES[backbone]
    size = image_size_of(backbone, opts)
    if size < b.min_size:
        return "image_size", f"{size} is below {backbone}'s minimum input size {b.min_size}"
    if backbone in OWN_NETWORKS and opts.weights == "imagenet":
        return "weights", (f"the {backbone} network has no ImageNet weights; use a run name" +
                           (" or none" if backbone == "scratch" else ""))
    if backbone == "fast" and opts.weights in ("none", ""):
        return "weights", ("the fast network's whitening is set from its source run's data: "
                           "give the run name (or its .weights.h5 file)")
    if opts.head_from and opts.weights in ("imagenet", "none", ""):
        return "head_from", "needs a run of ours as --weights (its logits start the head)"
    return None


def check_savedmodel_options(opts: TransferOptions) -> tuple[str, str] | None:
    """(flag, message) for a --model=savedmodel setting that cannot work, before any work."""
    if not os.path.isfile(os.path.join(opts.savedmodel_dir, "saved_model.pb")):
        return "savedmodel_dir", f"{opts.savedmodel_dir}: no saved_model.pb in that folder"
    if opts.weights not in ("imagenet", "none", ""):
        return "weights", "a SavedModel brings its own weights: leave --weights out"
    if opts.cut_at or opts.head_from:
        return ("cut_at" if opts.cut_at else "head_from"), ("a SavedModel runs whole: it has "
                                                            "no layers to cut at or logits "
                                                            "to start a head from")
    return None


def options_with_defaults(name: str, options: dict, transfer: bool = False) -> dict:
    """`options` with every option it lacks at its default: a run recorded before an option
    existed ran with what is now its default (a new option's default keeps the old network)."""
    cls = options_class(name, transfer)
    if cls is None:
        return dict(options)
    return {**{f.name: default_of(cls, f.name) for f in dataclasses.fields(cls)}, **options}


def model_options_error(name: str, options: dict, transfer: bool = False
                        ) -> tuple[str, str] | None:
    """(flag, message) if `options` do not fit model `name`, else None."""
    cls = options_class(name, transfer)
    if cls is None:
        return None
    try:
        opts = cls(**options)
    except TypeError as e:
        return "model", f"bad options for {name!r}: {e}"
    if cls is TransferOptions:
        return check_transfer_options(name, opts)
    return opts.validate()
