"""Which weights the lab's transfer detector starts from: ImageNet (cached, downloadable, or
a .h5 file), or the fallback, the source-task backbone trained here; and the transfer run's
settings for them."""

from __future__ import annotations

import os

from research.lab.lab import Lab
from research.models import backbones


def imagenet_file(backbone: str = "vgg16") -> str:
    return os.path.join(backbones.keras_models_dir(), backbones.BACKBONES[backbone].weights_file)


def fetch_imagenet(backbone: str) -> None:
    """Gets the backbone's ImageNet weights into Keras' cache (a download when they are not
    there); BackboneError names the file and the folder when that fails."""
    backbones.build_base(backbone, backbones.TransferOptions(weights="imagenet"),
                         (backbones.BACKBONES[backbone].min_size,) * 2 + (3,))


def resolve_weights(lab: Lab) -> None:
    """Sets lab.weights (imagenet, a .h5 file, or the source-task run) and the note the
    report shows; --weights=imagenet without the file and without network stops here."""
    mode = lab.s.weights
    backbone = lab.profile.transfer_imagenet["model"]
    path = imagenet_file(backbone)
    if mode.endswith(".h5"):
        lab.weights, lab.weights_note = mode, f"{backbone} weights from {mode} (--weights)"
        return
    if mode == "source_task":
        lab.weights = lab.run_name("src_nocat")
        lab.weights_note = (f"--weights=source_task: the transfer detector starts from the "
                            f"source-task backbone {lab.weights} (the "
                            f"{lab.profile.source_task['model']} CNN trained without cats, a "
                            "stage of its own)")
        return
    have = os.path.isfile(path)
    try:
        if not have:
            fetch_imagenet(backbone)  # --weights=imagenet stops here with the file's name
        lab.weights = "imagenet"
        lab.weights_note = (f"ImageNet weights of {backbone}: {path}" +
                            ("" if have else " (downloaded now into Keras' cache)"))
        return
    except backbones.BackboneError:
        if mode == "imagenet":
            raise
    lab.weights = lab.run_name("src_nocat")
    lab.weights_note = (f"Fallback: the ImageNet weights of {backbone} could not be had "
                        f"({os.path.basename(path)} is not in {os.path.dirname(path)}/ and "
                        f"could not be downloaded), so the transfer detector starts from the "
                        f"source-task backbone {lab.weights}: the "
                        f"{lab.profile.source_task['model']} CNN trained on the 9 other "
                        "classes, a stage of its own.")


def ensure_weights(lab: Lab) -> str:
    """lab.weights, resolved (and said) on first use: only a lab whose stages train or read
    the transfer detector looks for ImageNet weights."""
    if lab.weights is None:
        resolve_weights(lab)
        print(f"[lab] transfer weights: {lab.weights_note}", flush=True)
    return lab.weights


def starts_from_source_task(lab: Lab) -> bool:
    """The source-task stage runs with the stages that need it when the transfer detector
    starts from its backbone."""
    return ensure_weights(lab) == lab.run_name("src_nocat")


def transfer_settings(lab: Lab) -> tuple[str, dict]:
    settings = lab.profile.transfer(ensure_weights(lab))
    recipe = f"{settings['model']}_{settings.get('transfer', 'none')}"
    if lab.weights == "imagenet":
        key = f"transfer_{recipe}_imagenet"
    elif lab.weights.endswith(".h5"):
        key = f"transfer_{recipe}_file"
    else:
        key = f"transfer_{recipe}_src"
    return key, settings
