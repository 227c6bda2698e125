"""COCO mAP (faster-coco-eval, checked against pycocotools): perfect, shifted and missing detections; annotation ids
that start at 0, have gaps or repeat; confusion."""

import contextlib
import io
import json
import warnings

import numpy as np
import pytest

from detector.evaluate.metrics import coco_evaluate, confusion_matrix, load_ground_truth


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


def _three_images(tmp_path, annotations: list[dict]):
    """A COCO JSON of images 1-3 (100 x 100) with `annotations` of cats (3), dogs (7) and birds (9)."""
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2, 3)],
            "annotations": annotations,
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "bird"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


def test_perfect_detections_score_one(ground_truth):
    detections = [{"image_id": 10, "category_id": 3, "bbox": [10, 10, 30, 40], "score": 0.9},
                  {"image_id": 11, "category_id": 7, "bbox": [50, 20, 20, 20], "score": 0.8}]
    metrics = coco_evaluate(ground_truth, detections, [10, 11], NAMES)
    assert metrics.map50_95 == pytest.approx(1.0) and metrics.map50 == pytest.approx(1.0)
    assert metrics.precision == pytest.approx(1.0) and metrics.recall == pytest.approx(1.0)
    assert {name: m.map50_95 for name, m in metrics.per_class.items()} == {"cat": pytest.approx(1.0),
                                                                          "dog": pytest.approx(1.0)}
    assert metrics.fitness == pytest.approx(1.0)


def _four_boxes(annotation_ids: list[int]) -> list[dict]:
    """Two cats in image 1 and two dogs in image 2 with these annotation ids (area and iscrowd given: what the
    library needs)."""
    return [{"id": annotation_id, "image_id": 1 + k // 2, "category_id": (3, 7)[k // 2],
             "bbox": [10 + 40 * (k % 2), 10, 30, 30], "area": 900, "iscrowd": 0}
            for k, annotation_id in enumerate(annotation_ids)]


def _as_detections(annotations: list[dict]) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in annotations]


@pytest.mark.parametrize("annotation_ids", [[0, 1, 2, 3], [5, 17, 1000, 1001], [5, 5, 1000, 7]],
                         ids=["from 0", "with gaps", "repeated"])
def test_perfect_detections_score_one_whatever_the_annotation_ids(tmp_path, annotation_ids):
    annotations = _four_boxes(annotation_ids)
    truth = load_ground_truth(_three_images(tmp_path, annotations))
    metrics = coco_evaluate(truth, _as_detections(annotations), [1, 2, 3], {3: "cat", 7: "dog"})
    assert metrics.map50_95 == 1.0 and metrics.map50 == 1.0 and metrics.recall == 1.0
    assert sorted(truth.anns) == [1, 2, 3, 4] and [truth.anns[i]["bbox"] for i in (1, 2, 3, 4)] == [
        a["bbox"] for a in annotations]  # numbered in file order, boxes unchanged


def _library_map50_95(path, detections: list[dict]) -> float:
    """faster-coco-eval on the file as it is, as a user of the library would run it."""
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer versions warn of an id 0, and score it all the same
        truth = COCO(str(path))
        evaluator = COCOeval_faster(truth, truth.loadRes([dict(d) for d in detections]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def test_why_annotation_ids_are_renumbered_the_library_scores_a_found_id_0_box_as_missed(tmp_path):
    """COCOeval (pycocotools' and faster-coco-eval's) records a box's match as the matched annotation's id, with 0
    for none: the cat with id 0 is found, yet counted missed and its detection false; a repeated id merges two
    boxes. load_ground_truth numbers the annotations 1..N, so they score 1 (the test above)."""
    # The cats' AP: precision 1/2 up to recall 1/2 (51 of COCO's 101 recall points), 0 beyond; the dogs' 1.
    cat_lost = pytest.approx((0.5 * 51 / 101 + 1.0) / 2)
    for annotation_ids, expected in (([1, 2, 3, 4], 1.0), ([0, 1, 2, 3], cat_lost), ([5, 5, 1000, 7], cat_lost)):
        annotations = _four_boxes(annotation_ids)
        assert _library_map50_95(_three_images(tmp_path, annotations), _as_detections(annotations)) == expected


def test_wrong_class_and_missing_image_lower_the_score(ground_truth):
    detections = [{"image_id": 10, "category_id": 7, "bbox": [10, 10, 30, 40], "score": 0.9}]
    metrics = coco_evaluate(ground_truth, detections, [10, 11], NAMES)
    assert metrics.map50_95 == 0.0 and metrics.per_class["cat"].map50_95 == 0.0


def test_a_loose_box_counts_at_iou_50_but_not_at_stricter_thresholds(ground_truth):
    detections = [{"image_id": 10, "category_id": 3, "bbox": [10, 10, 30, 30], "score": 0.9},  # IoU 0.75
                  {"image_id": 11, "category_id": 7, "bbox": [50, 20, 20, 20], "score": 0.8}]
    metrics = coco_evaluate(ground_truth, detections, [10, 11], NAMES)
    assert metrics.map50 == pytest.approx(1.0)
    assert 0.5 < metrics.map50_95 < 1.0
    assert metrics.per_class["cat"].map50_95 == pytest.approx(0.6, abs=0.01)  # passes 0.50..0.75: 6 of 10
    assert metrics.per_class["cat"].map50 == pytest.approx(1.0)


def test_no_detections_give_zero_but_still_count_the_ground_truth(ground_truth):
    metrics = coco_evaluate(ground_truth, [], [10, 11], NAMES)
    assert metrics.map50_95 == 0.0 and (metrics.images, metrics.instances) == (2, 2)
    assert [row.split() for row in metrics.table(per_class=True)[1:]] == [
        ["all", "2", "2", *["0.000"] * 4], ["cat", "1", "1", *["0.000"] * 4], ["dog", "1", "1", *["0.000"] * 4]]


def test_the_per_class_table_counts_each_class_in_the_evaluated_images_only(tmp_path):
    path = _three_images(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 40]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [60, 60, 20, 20]},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [10, 10, 30, 40]},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [0, 0, 90, 90], "iscrowd": 1, "area": 8100},
        {"id": 5, "image_id": 2, "category_id": 7, "bbox": [50, 20, 20, 20]},
        {"id": 6, "image_id": 3, "category_id": 9, "bbox": [50, 20, 20, 20]},  # image 3 is not evaluated
    ])
    # Both cats of image 1 found, the cat of image 2 missed, the dog found.
    detections = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 40], "score": 0.9},
                  {"image_id": 1, "category_id": 3, "bbox": [60, 60, 20, 20], "score": 0.8},
                  {"image_id": 2, "category_id": 7, "bbox": [50, 20, 20, 20], "score": 0.7}]
    metrics = coco_evaluate(load_ground_truth(path), detections, [1, 2], {3: "cat", 7: "dog", 9: "bird"})
    cat, dog = metrics.per_class["cat"], metrics.per_class["dog"]
    assert list(metrics.per_class) == ["cat", "dog"]  # no bird in the evaluated images: no row
    assert (cat.images, cat.instances, dog.images, dog.instances) == (2, 3, 1, 1)  # the crowd box is not counted
    assert cat.precision == pytest.approx(1.0) and cat.recall == pytest.approx(0.66, abs=0.01)
    assert dog.map50_95 == pytest.approx(1.0) and cat.map50 == pytest.approx(0.67, abs=0.01)
    assert (metrics.images, metrics.instances) == (2, 4)
    assert metrics.map50_95 == pytest.approx((cat.map50_95 + dog.map50_95) / 2)
    assert metrics.recall == pytest.approx((cat.recall + 1.0) / 2)
    header, overall, *rows = metrics.table(per_class=True)
    assert header.split() == ["class", "images", "instances", "P", "R", "mAP50", "mAP50-95"]
    assert overall.split()[:3] == ["all", "2", "4"] and [row.split()[:3] for row in rows] == [
        ["cat", "2", "3"], ["dog", "1", "1"]]
    assert len(metrics.table()) == 2  # per-epoch validation: the header and the row of all classes


def test_the_confusion_matrix_pairs_each_object_with_one_detection_whatever_its_class(tmp_path):
    path = _three_images(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 40]},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [60, 60, 20, 20]},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 100, 100], "iscrowd": 1},
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [50, 20, 20, 20]},
        {"id": 5, "image_id": 2, "category_id": 9, "bbox": [10, 10, 20, 20]},  # bird: not a class here
        {"id": 6, "image_id": 3, "category_id": 3, "bbox": [10, 10, 20, 20]},  # image 3 is not evaluated
    ])
    detections = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 40], "score": 0.6},   # the cat, as a cat
        {"image_id": 1, "category_id": 3, "bbox": [12, 10, 30, 40], "score": 0.9},   # the same cat again (IoU 0.88)
        {"image_id": 1, "category_id": 3, "bbox": [61, 60, 20, 20], "score": 0.7},   # the dog, as a cat
        {"image_id": 1, "category_id": 7, "bbox": [80, 0, 10, 10], "score": 0.5},    # a dog where nothing is
        {"image_id": 1, "category_id": 7, "bbox": [0, 80, 10, 10], "score": 0.1},    # below conf 0.25: left out
        {"image_id": 2, "category_id": 9, "bbox": [10, 10, 20, 20], "score": 0.9},   # a bird: left out
        {"image_id": 2, "category_id": 3, "bbox": [50, 20, 20, 30], "score": 0.8},   # IoU 0.67 with the dog
        {"image_id": 3, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.9},   # image not evaluated
    ]
    names = {3: "cat", 7: "dog"}
    cat, dog, background = 0, 1, 2
    expected = np.zeros((3, 3), np.int64)  # [predicted, true]
    expected[cat, cat] = 1          # the cat, paired with one of its two detections
    expected[cat, background] = 1   # the duplicate
    expected[cat, dog] = 2          # both dogs detected as cats
    expected[dog, background] = 1
    assert (confusion_matrix(load_ground_truth(path), detections, [1, 2], [3, 7]) == expected).all()
    strict = confusion_matrix(load_ground_truth(path), detections, [1, 2], [3, 7], iou=0.7)
    assert (strict[:, dog] == [1, 0, 1]).all() and strict[cat, background] == 2  # image 2's dog missed now
    metrics = coco_evaluate(load_ground_truth(path), detections, [1, 2], names)
    assert (metrics.confusion == expected).all() and metrics.confusion_labels == ["cat", "dog", "background"]
    # Each true class's column counts its instances.
    instances = [metrics.per_class[name].instances for name in ("cat", "dog")]
    assert list(metrics.confusion[:, :background].sum(axis=0)) == instances
    assert metrics.details()["confusion_matrix"] == {"cat": {"cat": 1}, "dog": {"cat": 2},
                                                    "background": {"cat": 1, "dog": 1}}
    nothing = coco_evaluate(load_ground_truth(path), [], [1, 2], names)
    assert nothing.details()["confusion_matrix"] == {"cat": {"background": 1}, "dog": {"background": 2}}


def test_the_scores_are_pycocotools_own_on_a_busy_set(datasets_dir):
    """faster-coco-eval computes COCOeval in C++: on coco128 with jittered, mislabelled, missing and false
    detections, over a part of its images, every figure equals pycocotools' COCOeval's."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path = datasets_dir / "coco128" / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    rng = np.random.default_rng(0)
    category_ids = sorted(c["id"] for c in data["categories"])
    detections = []
    for annotation in data["annotations"]:
        if rng.random() < 0.2:
            continue  # missed
        x, y, w, h = annotation["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        category = annotation["category_id"] if rng.random() < 0.85 else int(rng.choice(category_ids))
        detections.append({"image_id": annotation["image_id"], "category_id": category, "score": float(rng.random()),
                           "bbox": [float(x + jitter[0]), float(y + jitter[1]), float(max(w + jitter[2], 1)),
                                    float(max(h + jitter[3], 1))]})
    for image in data["images"]:
        for _ in range(5):  # false detections
            w, h = rng.uniform(5, image["width"] / 2), rng.uniform(5, image["height"] / 2)
            detections.append({"image_id": image["id"], "category_id": int(rng.choice(category_ids)),
                               "score": float(rng.random() / 2), "bbox": [float(rng.uniform(0, image["width"] - w)),
                                                                          float(rng.uniform(0, image["height"] - h)),
                                                                          float(w), float(h)]})
    image_ids = sorted(image["id"] for image in data["images"])[::2]
    names = {c["id"]: c["name"] for c in data["categories"]}
    ours = coco_evaluate(load_ground_truth(path), detections, image_ids, names, confusion=False)

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(path))
        theirs = COCOeval(truth, truth.loadRes(copy.deepcopy(detections)), "bbox")
        theirs.params.imgIds = image_ids
        theirs.evaluate()
        theirs.accumulate()
        theirs.summarize()
    assert 0.2 < ours.map50_95 < 0.9
    assert ours.map50_95 == pytest.approx(theirs.stats[0], abs=1e-12)
    assert ours.map50 == pytest.approx(theirs.stats[1], abs=1e-12)
    for k, category_id in enumerate(theirs.params.catIds):
        curve = theirs.eval["precision"][:, :, k, 0, -1]
        if names[category_id] in ours.per_class and (curve > -1).any():
            assert ours.per_class[names[category_id]].map50_95 == pytest.approx(curve[curve > -1].mean(), abs=1e-12)
            np.testing.assert_allclose(ours.pr50[names[category_id]], np.clip(curve[0], 0, None), atol=1e-12)
