"""COCO mAP through pycocotools: perfect, shifted and missing detections."""

import json

import pytest

from detector.metrics import coco_evaluate, load_ground_truth


@pytest.fixture()
def ground_truth(tmp_path):
    data = {
        "images": [{"id": 10, "file_name": "a.jpg", "width": 100, "height": 100},
                   {"id": 11, "file_name": "b.jpg", "width": 100, "height": 100}],
        "annotations": [  # no area / iscrowd keys on purpose: user files often lack them
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [10, 10, 30, 40]},
            {"id": 2, "image_id": 11, "category_id": 7, "bbox": [50, 20, 20, 20]},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return load_ground_truth(path)


NAMES = {3: "cat", 7: "dog"}


def test_perfect_detections_score_one(ground_truth):
    detections = [{"image_id": 10, "category_id": 3, "bbox": [10, 10, 30, 40], "score": 0.9},
                  {"image_id": 11, "category_id": 7, "bbox": [50, 20, 20, 20], "score": 0.8}]
    metrics = coco_evaluate(ground_truth, detections, [10, 11], NAMES)
    assert metrics.map50_95 == pytest.approx(1.0) and metrics.map50 == pytest.approx(1.0)
    assert metrics.precision == pytest.approx(1.0) and metrics.recall == pytest.approx(1.0)
    assert metrics.per_class_ap == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    assert metrics.fitness == pytest.approx(1.0)


def test_wrong_class_and_missing_image_lower_the_score(ground_truth):
    detections = [{"image_id": 10, "category_id": 7, "bbox": [10, 10, 30, 40], "score": 0.9}]
    metrics = coco_evaluate(ground_truth, detections, [10, 11], NAMES)
    assert metrics.map50_95 == 0.0 and metrics.per_class_ap["cat"] == 0.0


def test_a_loose_box_counts_at_iou_50_but_not_at_stricter_thresholds(ground_truth):
    detections = [{"image_id": 10, "category_id": 3, "bbox": [10, 10, 30, 30], "score": 0.9},  # IoU 0.75
                  {"image_id": 11, "category_id": 7, "bbox": [50, 20, 20, 20], "score": 0.8}]
    metrics = coco_evaluate(ground_truth, detections, [10, 11], NAMES)
    assert metrics.map50 == pytest.approx(1.0)
    assert 0.5 < metrics.map50_95 < 1.0
    assert metrics.per_class_ap["cat"] == pytest.approx(0.6, abs=0.01)  # passes 0.50..0.75: 6 of 10


def test_no_detections_give_zero(ground_truth):
    assert coco_evaluate(ground_truth, [], [10, 11], NAMES).map50_95 == 0.0
