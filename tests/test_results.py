"""Results: COCO JSON detections with the dataset's own category ids, and drawing boxes with labels."""

import json

import cv2
import numpy as np
import pytest

from detector.data.coco import CocoDataset
from detector.errors import DataError
from detector.evaluate.metrics import coco_evaluate, load_ground_truth
from detector.evaluate.plots import PALETTE
from detector.inference.results import Result, coco_detections


def ground_truth_results(dataset: CocoDataset) -> list[Result]:
    """Perfect predictions: each val image's own boxes, as predict would return them."""
    return [Result(str(path), index, target.boxes_xyxy, np.linspace(0.9, 0.5, len(target)).astype(np.float32),
                   target.classes, dataset.names, dataset.category_ids)
            for index, (path, target) in enumerate(zip(dataset.paths, dataset.targets, strict=True))]


def test_coco_json_maps_class_indices_back_to_category_ids(datasets_dir, tmp_path):
    root = datasets_dir / "coco8"
    dataset = CocoDataset(root / "images" / "val", root / "annotations" / "instances_val.json")
    assert dataset.category_ids != list(range(len(dataset.names)))  # COCO's ids have gaps (1..90)
    detections = coco_detections(ground_truth_results(dataset))  # ids from the all-digit file stems

    annotations = json.loads((root / "annotations" / "instances_val.json").read_text())["annotations"]
    expected = sorted((a["image_id"], a["category_id"]) for a in annotations)
    assert sorted((d["image_id"], d["category_id"]) for d in detections) == expected
    (tmp_path / "detections.json").write_text(json.dumps(detections))  # plain JSON types only
    # pycocotools reads them back as perfect detections.
    names = dict(zip(dataset.category_ids, dataset.names, strict=True))
    metrics = coco_evaluate(load_ground_truth(dataset.annotation_json), detections, dataset.image_ids, names)
    assert metrics.map50_95 == pytest.approx(1.0, abs=1e-6)


def test_coco_image_ids_from_a_mapping_a_function_or_an_error():
    result = Result("shots/cat.jpg", 0, np.array([[10, 20, 40, 60]], np.float32), np.array([0.5], np.float32),
                    np.array([1]), ["dog", "cat"], [18, 17])
    [entry] = coco_detections([result], {"cat.jpg": 7})
    assert entry == {"image_id": 7, "category_id": 17, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}
    assert coco_detections([result], lambda r: 3)[0]["image_id"] == 3
    with pytest.raises(DataError, match="image_ids"):
        coco_detections([result])  # 'cat' is not a COCO id
    with pytest.raises(DataError, match="no image id for cat.jpg"):
        coco_detections([result], {"dog.jpg": 1})


def test_draw_puts_class_coloured_boxes_and_labels_on_a_copy(tmp_path):
    image = np.zeros((80, 120, 3), np.uint8)
    result = Result("", 4, np.array([[20, 30, 100, 70]], np.float32), np.array([0.87], np.float32), np.array([2]),
                    ["a", "b", "c"], [1, 2, 3], image=image)
    drawn = result.draw()
    assert image.max() == 0  # the original is untouched
    colour_bgr = PALETTE[2][::-1]
    assert tuple(drawn[50, 20]) == colour_bgr and tuple(drawn[50, 100]) == colour_bgr  # left and right sides
    assert tuple(drawn[50, 60]) == (0, 0, 0)  # inside the box stays
    assert (drawn[:30, 20:60] != 0).any()  # the 'c 0.87' label above the box
    saved = cv2.imread(str(result.save(tmp_path / result.file_name)))
    assert result.file_name == "image4.jpg" and saved.shape == (80, 120, 3)


def test_draw_reads_an_image_file_again(tmp_path):
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), np.full((40, 40, 3), 255, np.uint8))
    result = Result(str(path), 0, np.array([[5, 5, 30, 30]], np.float32), np.array([0.5], np.float32),
                    np.array([0]), ["thing"], [1])
    assert tuple(result.draw()[25, 5]) == PALETTE[0][::-1]  # the left side, below the label
    path.unlink()
    with pytest.raises(DataError, match="moved or deleted"):
        result.draw()
