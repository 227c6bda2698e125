"""Inference on image files: sources -> letterboxed batches -> model -> NMS -> results in original pixels."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from detector.data.augment import letterbox
from detector.engine import prepare_images
from detector.errors import DataError
from detector.postprocess import decode, non_max_suppression

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class Result:
    """Detections of one image, in its original pixels."""

    path: str
    boxes_xyxy: np.ndarray  # float32 (K, 4)
    scores: np.ndarray      # float32 (K,)
    classes: np.ndarray     # int64 (K,) contiguous class indices
    names: list[str]

    @property
    def labels(self) -> list[str]:
        return [self.names[c] for c in self.classes]

    def draw(self) -> np.ndarray:
        """The image (BGR, as OpenCV writes it) with boxes and 'name score' labels."""
        image = cv2.imread(self.path, cv2.IMREAD_COLOR)
        for box, score, label in zip(self.boxes_xyxy.astype(int), self.scores, self.labels, strict=True):
            colour = _colour(label)
            cv2.rectangle(image, tuple(box[:2]), tuple(box[2:]), colour, 2)
            cv2.putText(image, f"{label} {score:.2f}", (box[0], max(box[1] - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.5, colour, 1, cv2.LINE_AA)
        return image

    def save(self, out_path: str | Path) -> Path:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out_path), self.draw())
        return out_path


def _colour(label: str) -> tuple[int, int, int]:
    seed = sum(ord(ch) * 31 ** i for i, ch in enumerate(label)) % (2**32)
    return tuple(int(v) for v in np.random.default_rng(seed).integers(40, 255, 3))


def list_images(source: str | Path | list) -> list[Path]:
    """Image paths from a file, a folder (sorted), a glob pattern, or a list of any of these."""
    if isinstance(source, list | tuple):
        return [path for item in source for path in list_images(item)]
    text = str(source)
    if any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
    elif Path(text).is_dir():
        paths = sorted(p for p in Path(text).iterdir())
    elif Path(text).is_file():
        paths = [Path(text)]
    else:
        raise DataError(f"predict source {text} does not exist: give an image, a folder or a glob pattern")
    images = [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DataError(f"predict source {text} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def _batches(paths: list[Path], batch: int, image_size: int) -> Iterator[tuple[list[Path], np.ndarray, list]]:
    for start in range(0, len(paths), batch):
        chunk, images, meta = paths[start:start + batch], [], []
        for path in chunk:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise DataError(f"cannot read image {path}: missing, empty or not an image")
            image, _, scale, pad = letterbox(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), np.zeros((0, 4), np.float32),
                                             image_size)
            images.append(image)
            meta.append((scale, pad, bgr.shape[:2]))
        yield chunk, np.stack(images).transpose(0, 3, 1, 2), meta


@torch.no_grad()
def predict(model: nn.Module, names: list[str], source, *, image_size: int = 640, batch: int = 8,
            conf: float = 0.25, iou: float = 0.7, max_det: int = 300, device: torch.device | None = None
            ) -> list[Result]:
    """Detect objects in every image of `source`, `batch` images per forward pass, in input order."""
    device = device or next(model.parameters()).device
    model.eval()
    results = []
    for chunk, images, meta in _batches(list_images(source), batch, image_size):
        inputs = prepare_images(torch.from_numpy(images), device, channels_last=False)
        boxes, scores = decode(model(inputs), model.strides, model.reg_max)
        for path, found, (scale, pad, (height, width)) in zip(
                chunk, non_max_suppression(boxes, scores, conf=conf, iou=iou, max_det=max_det), meta, strict=True):
            xyxy = (found.boxes_xyxy.float().cpu().numpy() - np.array([*pad, *pad], np.float32)) / scale
            xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
            xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
            results.append(Result(str(path), xyxy.astype(np.float32), found.scores.float().cpu().numpy(),
                                  found.classes.cpu().numpy().astype(np.int64), list(names)))
    return results
