"""The settings of the random affine augmentation (no TensorFlow here: the training config
names them; research.data.pipeline applies them)."""

from __future__ import annotations

import dataclasses

FILL_MODES = ("nearest", "reflect", "wrap", "constant")


@dataclasses.dataclass(frozen=True)
class Affine:
    """Random affine augmentation as Keras' ImageDataGenerator names it (rotation and shear
    in degrees, shifts and zoom as fractions of the image); all zero: off."""
    rotation_range: float = 0.0
    width_shift_range: float = 0.0
    height_shift_range: float = 0.0
    shear_range: float = 0.0
    zoom_range: float = 0.0
    fill_mode: str = "nearest"

    @property
    def active(self) -> bool:
        return any((self.rotation_range, self.width_shift_range, self.height_shift_range,
                    self.shear_range, self.zoom_range))
