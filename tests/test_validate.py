"""Validation and predict map detections back to the original image the same way, and write the same COCO entries."""

import json

import cv2
import numpy as np
import pytest
import torch

from detector.data.augment import letterbox, rect_shape
from detector.data.coco import CocoDataset
from detector.data.loader import build_dataloader
from detector.evaluate import validate
from detector.evaluate.metrics import coco_results
from detector.inference.predict import predict
from detector.inference.results import coco_detections
from detector.model.postprocess import Detections, letterbox_to_original

# (height, width) and white box (x1, y1, x2, y2) of each picture: wide, padded above and below at 128 (64 x 128);
# tall, decoded at 1/2 and padded left and right (128 x 64); a 375 x 500 JPEG, decoded at 1/2 to 188 x 250 (JPEG
# rounds the odd side up), whose rectangle is 96 x 128 from its own size but 128 x 128 from its decode's.
PICTURES = {"wide.png": ((100, 250), (30, 20, 90, 70)), "tall.png": ((300, 130), (10, 140, 120, 290)),
            "photo.jpg": ((375, 500), (200, 100, 420, 330))}


def white_boxes(images: torch.Tensor) -> list[torch.Tensor]:
    """The box around each uint8 (B, 3, H, W) image's white pixels, xyxy input pixels, (4,) float32 each."""
    boxes = []
    for image in images:
        rows, cols = (image.min(dim=0).values == 255).nonzero(as_tuple=True)
        boxes.append(torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32))
    return boxes


@pytest.mark.parametrize("size", [(100, 250), (300, 130), (375, 500)])  # padded wide, padded tall, exact rectangle
@pytest.mark.parametrize("square", [True, False])
def test_letterboxed_boxes_map_back_to_the_original_pixels(size, square):
    height, width = size
    boxes = np.array([[10, 20, 60, 80], [0, 0, width, height], [width - 30, height - 40, width, height]], np.float32)
    shape = 128 if square else rect_shape(height, width, 128)
    image, boxed, scale, pad = letterbox(np.zeros((height, width, 3), np.uint8), boxes, shape)
    assert max(pad) > 0 or (size, square) == ((375, 500), False)
    back = letterbox_to_original(torch.from_numpy(boxed), scale, pad, size)
    np.testing.assert_allclose(back.numpy(), boxes, atol=1e-3)
    # A box reaching into the padding ends at the image's edge; a decode at 1/2 folds into the scale.
    whole = torch.tensor([[0.0, 0.0, image.shape[1], image.shape[0]]])
    np.testing.assert_allclose(letterbox_to_original(whole, scale, pad, size).numpy(), [[0, 0, width, height]])
    doubled = letterbox_to_original(torch.from_numpy(boxed), scale / 2, pad, (2 * height, 2 * width))
    np.testing.assert_allclose(doubled.numpy(), 2 * boxes, atol=2e-3)


def test_validation_and_predict_report_the_same_boxes_in_original_pixels(tmp_path, monkeypatch):
    """The same detector (the white box of each input) through the validation pass and through predict: the same
    COCO entries, byte for byte, and each the picture's white box in its own pixels (within the input's pixel)."""
    (tmp_path / "images").mkdir()
    records, annotations = [], []
    for image_id, (name, ((height, width), box)) in enumerate(PICTURES.items(), start=1):
        image = np.full((height, width, 3), 40, np.uint8)
        image[box[1]:box[3], box[0]:box[2]] = 255
        cv2.imwrite(str(tmp_path / "images" / name), image)
        records.append({"id": image_id, "file_name": name, "height": height, "width": width})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 5, "iscrowd": 0,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    (tmp_path / "truth.json").write_text(json.dumps({"images": records, "annotations": annotations,
                                                     "categories": [{"id": 5, "name": "white"}]}))
    dataset = CocoDataset(tmp_path / "images", tmp_path / "truth.json")
    loader = build_dataloader(dataset, train=False, image_size=128, batch_size=1, workers=0)
    monkeypatch.setattr(validate, "detect", lambda model, images, **settings: [
        Detections(box[None], torch.ones(1), torch.zeros(1, dtype=torch.int64)) for box in white_boxes(images)])
    validated, _ = validate.predict_loader(torch.nn.Identity(), loader, device=torch.device("cpu"),
                                           category_ids=dataset.category_ids, conf=0.25, iou=0.7, max_det=300)

    def forward(images):
        return torch.stack(white_boxes(images))[:, None], torch.ones(len(images), 1, 1)

    results = predict(forward, sorted((tmp_path / "images").iterdir()), names=["white"], category_ids=[5],
                      image_size=128, batch=1)
    predicted = coco_detections(results, {record["file_name"]: record["id"] for record in records})
    assert sorted(validated, key=lambda d: d["image_id"]) == sorted(predicted, key=lambda d: d["image_id"])
    assert len(validated) == len(PICTURES)
    for entry in validated:
        record, truth = records[entry["image_id"] - 1], annotations[entry["image_id"] - 1]
        input_pixel = max(record["height"], record["width"]) / 128
        assert entry["bbox"] == pytest.approx(truth["bbox"], abs=2 * input_pixel)


def test_coco_results_are_xywh_with_the_datasets_category_ids_and_skip_nan_scores():
    entries = coco_results(torch.tensor([[10.0, 20.0, 40.5, 60.25], [0, 0, 1, 1]]), torch.tensor([0.123456, np.nan]),
                           torch.tensor([1, 0]), image_id=9, category_ids=[3, 7])
    assert entries == [{"image_id": 9, "category_id": 7, "bbox": [10.0, 20.0, 30.5, 40.25], "score": 0.12346}]
