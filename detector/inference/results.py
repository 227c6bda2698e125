"""What predict returns: the detections of one image in its original pixels, drawable and convertible to
COCO JSON detections for evaluation elsewhere."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from detector.errors import DataError
from detector.evaluate.metrics import coco_results
from detector.evaluate.plots import draw_detections


@dataclass
class Result:
    """Detections of one image (or video frame), best first, in its original pixels.

    Attributes:
        path: the file it came from ("" for an array).
        index: position in the source, from 0 (results come in this order).
        boxes_xyxy: float32 (K, 4) original image pixels.
        scores: float32 (K,).
        classes: int64 (K,) contiguous class indices into names.
        names: class names.
        category_ids: the COCO category id of each class index (as in the training annotations).
        frame: the picture's number within its video, None for still images.
        image: the original uint8 (H, W, 3) BGR image, kept when it cannot be read again from `path`
            (arrays and video frames); None for image files.
        size: (height, width) of the original image.
        incomplete: the image file is cut short (truncated): the detections are of the part that decoded, the rest
            being grey; predict warned, naming the file.
    """

    path: str
    index: int
    boxes_xyxy: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    names: list[str]
    category_ids: list[int]
    frame: int | None = None
    image: np.ndarray | None = None
    size: tuple[int, int] | None = None
    incomplete: bool = False

    @property
    def labels(self) -> list[str]:
        return [self.names[c] for c in self.classes]

    @property
    def file_name(self) -> str:
        """A name for a drawn copy: the image's own, <video stem>_<frame>.jpg, or image<index>.jpg."""
        if self.frame is not None:
            return f"{Path(self.path).stem}_{self.frame:06d}.jpg"
        return Path(self.path).name if self.path else f"image{self.index}.jpg"

    def original(self) -> np.ndarray:
        """The original image, uint8 (H, W, 3) BGR."""
        if self.image is not None:
            return self.image
        image = cv2.imread(self.path, cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"cannot read image {self.path} again to draw on it: was it moved or deleted?")
        return image

    def draw(self) -> np.ndarray:
        """The image (uint8 (H, W, 3) BGR, as OpenCV writes it) with boxes and 'name score' labels."""
        rgb = cv2.cvtColor(self.original(), cv2.COLOR_BGR2RGB)
        drawn = draw_detections(rgb, self.boxes_xyxy, self.classes, self.names, self.scores)
        return cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)

    def save(self, out_path: str | Path) -> Path:
        """Write the drawn image to out_path (its suffix picks the format)."""
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out_path), self.draw()):
            raise DataError(f"cannot write {out_path}: is the suffix an image format OpenCV knows?")
        return out_path

    def to_yolo(self, scores: bool = False) -> str:
        """The detections as a YOLO label file: one "class cx cy w h" line each, normalised to the image's size
        (with `scores`, the score as a sixth column); what `detector convert` and YOLO trainers read back."""
        height, width = self.size if self.size is not None else self.original().shape[:2]
        boxes = self.boxes_xyxy.astype(np.float64) / [width, height, width, height]
        centres, sides = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
        return "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" + (f" {s:.5f}" if scores else "") + "\n"
                       for c, (x, y), (w, h), s in zip(self.classes, centres, sides, self.scores, strict=True))

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results entries (as COCO.loadRes reads them): image_id, category_id (the dataset's own id,
        not the class index), bbox [x, y, width, height] in original pixels, score; as validation writes them
        (detector.evaluate.metrics.coco_results)."""
        boxes, scores, classes = (torch.as_tensor(np.ascontiguousarray(values))
                                  for values in (self.boxes_xyxy, self.scores, self.classes))
        return coco_results(boxes, scores, classes, image_id=image_id, category_ids=self.category_ids)


def coco_detections(results: Iterable[Result],
                    image_ids: Mapping[str, int] | Callable[[Result], int] | None = None) -> list[dict]:
    """COCO results JSON (a list to json.dump) for many images.

    Args:
        results: from predict.
        image_ids: the id of each image in the ground truth: a mapping from file name (e.g. built from the
            annotation JSON's images: {i["file_name"]: i["id"]}), a function of the Result, or None to
            read the id from an all-digit file stem, as COCO names its files (000000000009.jpg -> 9).

    Raises:
        DataError: an image whose id cannot be found.
    """
    detections = []
    for result in results:
        detections.extend(result.to_coco(_image_id(result, image_ids)))
    return detections


def _image_id(result: Result, image_ids: Mapping[str, int] | Callable[[Result], int] | None) -> int:
    name = Path(result.path).name
    if callable(image_ids):
        return int(image_ids(result))
    if image_ids is not None:
        if name not in image_ids:
            raise DataError(f"no image id for {name or f'image {result.index}'} in image_ids "
                            f"({len(image_ids)} file names); give every predicted file's name")
        return int(image_ids[name])
    stem = Path(name).stem
    if not stem.isdigit() or result.frame is not None:
        raise DataError(f"cannot read a COCO image id from {name or f'image {result.index}'}: "
                        "pass image_ids={file_name: id} (from the annotation JSON) or a function")
    return int(stem)
