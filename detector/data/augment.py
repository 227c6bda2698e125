"""(image, Target) -> (image, Target) at the training or validation size.

Training: a 4-image mosaic (or one letterboxed image), then albumentations' bbox-aware affine,
colour jitter and flips; with mixup, blended with a second sample made the same way. Validation:
letterbox only, with the scale and padding returned so predictions map back to the original pixels.
Every image is first shrunk so its longest side is the training size: the later steps then touch at most
(2S)^2 pixels whatever the source size.
"""

from __future__ import annotations

import logging
import math
import random
from typing import TYPE_CHECKING

import cv2
import numpy as np

from detector.data.albu import A
from detector.data.coco import Target
from detector.data.colour import LinearColourJitter

if TYPE_CHECKING:
    from detector.data.coco import CocoDataset

logger = logging.getLogger(__name__)

PAD_VALUE = 114
MIN_VISIBILITY = 0.1  # keep a box while at least 10% of its area is still in the image
MIN_BOX_SIZE = 2.0  # pixels: smaller boxes after augmentation carry no learnable signal
MIXUP_BETA = 32.0  # mixup's weight lam ~ Beta(32, 32), as in YOLOv5/v8: mostly near half and half


def round_image_size(size: int) -> int:
    """Rounds an image size up to a multiple of 32 (the largest stride), warning when it changes."""
    rounded = max(int(math.ceil(int(size) / 32) * 32), 32)
    if rounded != size:
        logger.warning("imgsz=%s is not a multiple of 32; using %d", size, rounded)
    return rounded


def rect_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) of the smallest multiples of 32 that hold an image of this size scaled to longest side `size`."""
    scale = size / max(height, width)
    return math.ceil(height * scale / 32) * 32, math.ceil(width * scale / 32) * 32


def resize_longest(image: np.ndarray, boxes_xyxy: np.ndarray, size: int
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Resizes so the longest side is `size` (aspect kept); returns (image, boxes * scale, scale)."""
    return _rescale(image, boxes_xyxy, size / max(image.shape[:2]))


def _rescale(image: np.ndarray, boxes_xyxy: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, float]:
    if scale != 1:
        height, width = image.shape[:2]
        new_size = (max(round(width * scale), 1), max(round(height * scale), 1))
        image = cv2.resize(image, new_size, interpolation=cv2.INTER_LINEAR)
    return image, (boxes_xyxy * scale).astype(np.float32), scale


def letterbox(image: np.ndarray, boxes_xyxy: np.ndarray, size: int | tuple[int, int]
              ) -> tuple[np.ndarray, np.ndarray, float, tuple[float, float]]:
    """Fits an image into a size x size square (or a (height, width) rectangle), keeping its aspect, padded
    with grey 114 on both sides of the short direction.

    Args:
        image: uint8 (H, W, 3).
        boxes_xyxy: float (N, 4) pixels of `image`.
        size: Side of the output square, or its (height, width).

    Returns:
        (image uint8 (height, width, 3), boxes float32 (N, 4) with new = old * scale + pad,
        scale, (pad_x, pad_y)).
    """
    out_height, out_width = (size, size) if isinstance(size, int) else size
    resized, boxes, scale = _rescale(image, boxes_xyxy, min(out_height / image.shape[0], out_width / image.shape[1]))
    height, width = resized.shape[:2]
    pad_x, pad_y = (out_width - width) // 2, (out_height - height) // 2
    out = cv2.copyMakeBorder(resized, pad_y, out_height - height - pad_y, pad_x, out_width - width - pad_x,
                             cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    boxes = boxes + np.array([pad_x, pad_y, pad_x, pad_y], np.float32)
    return out, boxes.astype(np.float32), scale, (float(pad_x), float(pad_y))


def mosaic4(images: list[np.ndarray], targets: list[Target], size: int, center: tuple[int, int]
            ) -> tuple[np.ndarray, Target]:
    """Tiles 4 images (longest side <= size) around `center` of a 2S x 2S grey canvas.

    Image 0 goes top-left of the centre, 1 top-right, 2 bottom-left, 3 bottom-right; each is cut
    where it passes the canvas edge and its boxes are shifted and clipped with it.

    Returns:
        (canvas uint8 (2S, 2S, 3), Target in canvas pixels; boxes cut to nothing are removed).
    """
    canvas = np.full((2 * size, 2 * size, 3), PAD_VALUE, np.uint8)
    xc, yc = center
    all_boxes, all_classes = [], []
    for slot, (image, target) in enumerate(zip(images, targets, strict=True)):
        height, width = image.shape[:2]
        x1 = xc - width if slot in (0, 2) else xc
        y1 = yc - height if slot in (0, 1) else yc
        # Visible part of the image on the canvas.
        cx1, cy1 = max(x1, 0), max(y1, 0)
        cx2, cy2 = min(x1 + width, 2 * size), min(y1 + height, 2 * size)
        canvas[cy1:cy2, cx1:cx2] = image[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
        boxes = target.boxes_xyxy + np.array([x1, y1, x1, y1], np.float32)
        boxes = np.clip(boxes, [cx1, cy1, cx1, cy1], [cx2, cy2, cx2, cy2])
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        all_boxes.append(boxes[keep])
        all_classes.append(target.classes[keep])
    return canvas, Target(np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_classes))


def mixup(image_a: np.ndarray, target_a: Target, image_b: np.ndarray, target_b: Target, lam: float
          ) -> tuple[np.ndarray, Target]:
    """Blends two samples of one size: lam * a + (1 - lam) * b, rounded to uint8, with the boxes of both.

    Args:
        image_a, image_b: uint8 (S, S, 3).
        target_a, target_b: Targets in those pixels.
        lam: weight of a, in [0, 1].

    Returns:
        (image uint8 (S, S, 3), Target: a's boxes then b's).
    """
    image = cv2.addWeighted(image_a, lam, image_b, 1 - lam, 0)
    return image, Target(np.concatenate([target_a.boxes_xyxy, target_b.boxes_xyxy]).astype(np.float32),
                         np.concatenate([target_a.classes, target_b.classes]).astype(np.int64))


class CenterCroppedAffine(A.Affine):
    """A.Affine whose output is the centre `size` x `size` of the transformed image, made in one warp.

    The same random draws, pixels and boxes as Affine followed by CenterCrop(size, size), without
    warping the (2S)^2 mosaic canvas only to keep S^2 of it: the crop's offset is folded into the
    image's affine matrix and output shape (the warp was about a fifth of the loading time at imgsz 640).
    Boxes still go through the whole canvas first and are clipped to it, so the visibility filter
    sees what it saw after the separate crop.
    """

    def __init__(self, size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = size

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        result = super().get_params_dependent_on_data(params, data)
        height, width = params["shape"][:2]
        offset = ((width - self.size) // 2, (height - self.size) // 2)  # CenterCrop's top-left corner
        crop = np.array([[1.0, 0.0, -offset[0]], [0.0, 1.0, -offset[1]], [0.0, 0.0, 1.0]])
        return {**result, "matrix": crop @ result["matrix"], "output_shape": (self.size, self.size),
                "crop_offset": offset}

    def apply(self, img: np.ndarray, matrix: np.ndarray, output_shape: tuple[int, int], **params) -> np.ndarray:
        """Warps the RGB image (read_image makes every image 3-channel) as RGBA: OpenCV's bilinear warp of
        uint8 has a SIMD path for 4 channels and none for 3, so the same pixels come out 2.3x sooner (0.24
        against 0.55 ms at 320)."""
        warped = super().apply(cv2.cvtColor(img, cv2.COLOR_RGB2RGBA), matrix, output_shape, **params)
        return cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB)

    def apply_to_bboxes(self, bboxes: np.ndarray, bbox_matrix: np.ndarray, output_shape: tuple[int, int],
                        **params) -> np.ndarray:
        """Normalised boxes of the input -> normalised boxes of the cropped output (extra columns kept)."""
        height, width = params["shape"][:2]
        boxes = super().apply_to_bboxes(bboxes, bbox_matrix, (height, width), **params).copy()
        canvas = np.array([width, height, width, height], np.float64)
        corners = np.clip(boxes[:, :4] * canvas, 0, canvas)
        boxes[:, :4] = (corners - np.tile(params["crop_offset"], 2)) / self.size
        return boxes


class TrainTransform:
    """Training augmentation: mosaic, affine (scale/translate/rotate/shear), HSV jitter, flips; mixup."""

    def __init__(self, image_size: int, *, mosaic: float = 1.0, mixup: float = 0.0, degrees: float = 0.0,
                 translate: float = 0.1, scale: float = 0.5, shear: float = 0.0, fliplr: float = 0.5,
                 flipud: float = 0.0, hsv_h: float = 0.015, hsv_s: float = 0.7, hsv_v: float = 0.4) -> None:
        """Args are fractions / probabilities as in cfg/default.yaml; image_size is the output side S (a call may
        ask for another side: multi_scale)."""
        self.image_size = image_size
        self.mosaic, self.mixup = mosaic, mixup
        self._affine = dict(scale=(max(1 - scale, 0.05), 1 + scale), translate_percent=(-translate, translate),
                            rotate=(-degrees, degrees), shear=(-shear, shear), interpolation=cv2.INTER_LINEAR,
                            keep_ratio=True,  # one scale for x and y: objects keep their aspect
                            border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE, p=1.0)
        self._tail = {"fliplr": fliplr, "flipud": flipud, "hsv": (hsv_h, hsv_s, hsv_v)}
        self._pipelines = {image_size: self._make_pipeline(image_size)}  # one per output side, made when first asked

    def _make_pipeline(self, size: int) -> A.Compose:
        """The affine, colour jitter and flips of a sample of side `size`, boxes filtered at the end."""
        # Boxes are filtered once, after the last transform: the flip and the colour jitter cannot change a
        # box's visibility or size, so filtering after each transform kept the same boxes and cost 6% more
        # loading time at imgsz 320 (2.14 against 2.01 ms per mosaic sample, identical boxes on 500 samples).
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["classes"], clip=True,
                                   min_visibility=MIN_VISIBILITY, min_width=MIN_BOX_SIZE,
                                   min_height=MIN_BOX_SIZE, check_each_transform=False)
        tail = [A.HorizontalFlip(p=self._tail["fliplr"])]
        # Only when asked: a transform at p=0 would still take a draw and change every later one.
        if self._tail["flipud"]:
            tail.append(A.VerticalFlip(p=self._tail["flipud"]))
        if any(self._tail["hsv"]):
            tail.insert(0, LinearColourJitter(*self._tail["hsv"]))
        # Mosaic canvases are 2S: the affine acts on the whole canvas, and the centre S x S is kept. A single
        # image is letterboxed to S x S first, so there the centre S x S is all of it (a plain affine).
        return A.Compose([CenterCroppedAffine(size, **self._affine), *tail], bbox_params=bbox_params)

    def __call__(self, dataset: CocoDataset, index: int, rng: np.random.Generator, size: int | None = None
                 ) -> tuple[np.ndarray, Target]:
        """Augments sample `index` (and, for a mosaic, 3 random others) with randomness from `rng`; with mixup, blends
        it with a second sample of a random index, made the same way from the same `rng`.

        Args:
            size: The output side S (a multiple of 32); None for image_size.

        Returns:
            (image uint8 (S, S, 3) RGB, Target in its pixels).
        """
        size = size or self.image_size
        image, target = self._augment(dataset, index, rng, size)
        # Drawn only when asked: a draw at mixup=0 would change every later one, so every sample.
        if self.mixup and rng.random() < self.mixup:
            other = self._augment(dataset, int(rng.integers(len(dataset))), rng, size)
            image, target = mixup(image, target, *other, lam=float(rng.beta(MIXUP_BETA, MIXUP_BETA)))
        return image, target

    def _augment(self, dataset: CocoDataset, index: int, rng: np.random.Generator, size: int
                 ) -> tuple[np.ndarray, Target]:
        """One sample without mixup: a mosaic or one letterboxed image, then the affine, colour jitter and flips."""
        if rng.random() < self.mosaic:
            indices = [index, *rng.integers(0, len(dataset), 3).tolist()]
            images, targets = [], []
            for i in indices:
                image, target, _ = dataset.load(i, size)
                image, boxes, _ = resize_longest(image, target.boxes_xyxy, size)
                images.append(image)
                targets.append(Target(boxes, target.classes))
            center = tuple(int(v) for v in rng.integers(size // 2, 3 * size // 2, 2))
            image, target = mosaic4(images, targets, size, center)
        else:
            image, target, _ = dataset.load(index, size)
            image, boxes, _, _ = letterbox(image, target.boxes_xyxy, size)
            target = Target(boxes, target.classes)
        pipeline = self._pipelines.get(size) or self._pipelines.setdefault(size, self._make_pipeline(size))
        pipeline.set_random_state(rng, random.Random(int(rng.integers(2**31))))
        out = pipeline(image=image, bboxes=target.boxes_xyxy.reshape(-1, 4), classes=target.classes)
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        return out["image"], Target(boxes, np.asarray(out["classes"], np.int64).reshape(-1))
