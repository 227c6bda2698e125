"""CocoDataset: real coco8/coco128 quirks and synthetic broken annotation files and images."""

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest

from detector.data.coco import CocoDataset
from detector.errors import DataError


def _json_counts(path: Path) -> dict[int, int]:
    data = json.loads(path.read_text())
    counts = {image["id"]: 0 for image in data["images"]}
    for annotation in data["annotations"]:
        counts[annotation["image_id"]] += 1
    return counts


def _write_dataset(root: Path, annotations: list[dict], sizes=((60, 80), (50, 40))) -> tuple[Path, Path]:
    """Images 1..len(sizes) of (height, width) and a COCO JSON with two categories (ids 3 and 7)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images = []
    for image_id, (height, width) in enumerate(sizes, 1):
        cv2.imwrite(str(images_dir / f"{image_id}.jpg"), np.full((height, width, 3), 90, np.uint8))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]}
    json_path = root / "instances.json"
    json_path.write_text(json.dumps(data))
    return images_dir, json_path


def _ann(image_id: int, bbox: list[float], category_id: int = 3, **extra) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco8_loads_with_the_json_box_counts(datasets_dir, split):
    root = datasets_dir / "coco8"
    dataset = CocoDataset(root / "images" / split, root / "annotations" / f"instances_{split}.json")
    expected = _json_counts(root / "annotations" / f"instances_{split}.json")
    assert len(dataset) == 4
    for index in range(len(dataset)):
        image, target, image_id = dataset.load(index)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert len(target.boxes_xyxy) == expected[image_id]
        assert target.boxes_xyxy.dtype == np.float32 and target.classes.dtype == np.int64
        height, width = image.shape[:2]
        assert (target.boxes_xyxy[:, 2] <= width).all() and (target.boxes_xyxy[:, 3] <= height).all()
    assert dataset.max_boxes == max(expected.values())


def test_class_indices_round_trip_to_coco_category_ids(datasets_dir):
    root = datasets_dir / "coco8"
    json_path = root / "annotations" / "instances_val.json"
    dataset = CocoDataset(root / "images" / "val", json_path)
    data = json.loads(json_path.read_text())
    assert dataset.category_ids == sorted(c["id"] for c in data["categories"])
    assert dataset.names[0] == "person" and dataset.names[79] == "toothbrush"
    assert dataset.category_ids[79] == 90
    for index in range(len(dataset)):
        _, target, image_id = dataset.load(index)
        expected = sorted(a["category_id"] for a in data["annotations"] if a["image_id"] == image_id)
        assert sorted(dataset.category_ids[c] for c in target.classes) == expected


def test_single_cls_puts_every_box_in_one_class_for_training_and_scoring(datasets_dir):
    from detector.evaluate.metrics import load_ground_truth

    root = datasets_dir / "coco8"
    json_path = root / "annotations" / "instances_val.json"
    several = CocoDataset(root / "images" / "val", json_path)
    one = CocoDataset(root / "images" / "val", json_path, single_cls=True)
    assert one.names == ["object"] and one.category_ids == [1]
    assert len({int(c) for t in several.targets for c in t.classes}) > 1
    for a, b in zip(several.targets, one.targets, strict=True):
        np.testing.assert_array_equal(a.boxes_xyxy, b.boxes_xyxy)
        assert (b.classes == 0).all()
    truth = load_ground_truth(json_path, single_cls=True)
    assert list(truth.cats) == [1] and len(truth.anns) == len(json.loads(json_path.read_text())["annotations"])
    assert {a["category_id"] for a in truth.anns.values()} == {1}


def test_classes_keeps_only_their_boxes_for_training_and_scoring(datasets_dir):
    from detector.evaluate.metrics import load_ground_truth

    root = datasets_dir / "coco8"
    json_path = root / "annotations" / "instances_val.json"
    every = CocoDataset(root / "images" / "val", json_path)
    counts = np.bincount(np.concatenate([t.classes for t in every.targets]))
    kept = [int(c) for c in np.argsort(counts)[-2:]]  # the two classes with most boxes
    some = CocoDataset(root / "images" / "val", json_path, classes=kept)
    assert some.names == every.names and some.image_ids == every.image_ids  # classes and images stay
    for a, b in zip(every.targets, some.targets, strict=True):
        mine = np.isin(a.classes, kept)
        np.testing.assert_array_equal(a.boxes_xyxy[mine], b.boxes_xyxy)
        np.testing.assert_array_equal(a.classes[mine], b.classes)
    assert 0 < sum(len(t) for t in some.targets) < sum(len(t) for t in every.targets)
    truth = load_ground_truth(json_path, classes=kept)
    assert {a["category_id"] for a in truth.anns.values()} == {every.category_ids[c] for c in kept}
    assert len(truth.anns) == sum(len(t) for t in some.targets) and len(truth.cats) == len(every.names)
    one = load_ground_truth(json_path, single_cls=True, classes=kept)  # filtered first, then one class
    assert list(one.cats) == [1] and len(one.anns) == len(truth.anns)


def test_coco128_quirks(datasets_dir):
    root = datasets_dir / "coco128"
    dataset = CocoDataset(root / "images" / "train2017", root / "annotations" / "instances_train2017.json")
    assert len(dataset) == 128
    assert sum(len(dataset.load(i)[1]) for i in range(len(dataset))) == 929
    negatives = [dataset.image_ids[i] for i in range(len(dataset)) if len(dataset.targets[i]) == 0]
    assert sorted(negatives) == [250, 508]
    image, _, _ = dataset.load(dataset.image_ids.index(86))  # the grayscale JPEG
    assert image.shape == (640, 512, 3)


def test_boxes_are_clipped_and_degenerate_ones_dropped_with_one_warning(tmp_path, caplog):
    annotations = [
        _ann(1, [70, 10, 30, 20]),  # runs past the right edge (width 80): clipped to x2 = 80
        _ann(1, [10, 10, 0, 20]),  # zero width
        _ann(1, [79.5, 10, 10, 10]),  # 0.5 px wide after clipping
        _ann(2, [5, 5, 10, 10], category_id=99),  # unknown category
        _ann(2, [1, 1, 10, 10], iscrowd=1),  # crowd: not trained on, not a warning
        _ann(2, [2, 3, 10, 20], category_id=7),
    ]
    images_dir, json_path = _write_dataset(tmp_path, annotations)
    with caplog.at_level(logging.WARNING, logger="detector.data.coco"):
        dataset = CocoDataset(images_dir, json_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "dropped 3 boxes" in warnings[0]
    assert "2 degenerate" in warnings[0] and "1 unknown category" in warnings[0]
    np.testing.assert_allclose(dataset.targets[0].boxes_xyxy, [[70, 10, 80, 30]])
    np.testing.assert_allclose(dataset.targets[1].boxes_xyxy, [[2, 3, 12, 23]])
    assert dataset.targets[1].classes.tolist() == [1]  # id 7 is the second of the sorted ids (3, 7)
    assert dataset.names == ["dog", "cat"] and dataset.category_ids == [3, 7]


def test_one_dropped_box_is_a_box(tmp_path, caplog):
    images_dir, json_path = _write_dataset(tmp_path, [_ann(1, [10, 10, 0, 20]), _ann(2, [2, 3, 10, 20])])
    with caplog.at_level(logging.WARNING, logger="detector.data.coco"):
        CocoDataset(images_dir, json_path)
    assert [r.getMessage() for r in caplog.records] == [f"{json_path.name}: dropped 1 box (1 degenerate)"]


def test_boxes_of_images_the_json_lacks_are_dropped_naming_their_annotation_ids(tmp_path, caplog):
    orphans = [_ann(9, [1, 1, 5, 5], id=annotation_id) for annotation_id in range(20, 27)]
    images_dir, json_path = _write_dataset(tmp_path / "many", [_ann(1, [1, 1, 5, 5], id=10), *orphans])
    with caplog.at_level(logging.WARNING, logger="detector.data.coco"):
        assert sum(len(t) for t in CocoDataset(images_dir, json_path).targets) == 1
    images_dir, json_path = _write_dataset(tmp_path / "one", [_ann(1, [1, 1, 0, 5], id=4), _ann(2, [1, 1, 5, 5], id=8),
                                                              _ann(5, [1, 1, 5, 5])])
    with caplog.at_level(logging.WARNING, logger="detector.data.coco"):
        CocoDataset(images_dir, json_path)  # the last annotation has no id: its place in the file numbers it
    assert [r.getMessage() for r in caplog.records] == [
        "instances.json: dropped 7 boxes (7 unknown image id: annotation ids 20, 21, 22, 23, 24, ...)",
        "instances.json: dropped 2 boxes (1 degenerate, 1 unknown image id: annotation id 3)"]


def test_skipped_images_say_how_many_boxes_went_with_them(tmp_path, caplog):
    annotations = [_ann(1, [1, 1, 5, 5]), _ann(2, [1, 1, 5, 5]), _ann(2, [2, 2, 5, 5]),
                   _ann(2, [0, 0, 9, 9], iscrowd=1)]
    images_dir, json_path = _write_dataset(tmp_path, annotations)
    (images_dir / "2.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="detector.data.coco"):
        dataset = CocoDataset(images_dir, json_path, skip_bad_images=True)
    assert dataset.image_ids == [1]
    assert [r.getMessage() for r in caplog.records] == [  # the crowd box would not have been trained on
        f"skipping 1 missing or unreadable image of instances.json and the 2 boxes on them (first: {images_dir}/2.jpg)"]


def test_no_images_is_an_error_and_no_boxes_a_warning(tmp_path, caplog):
    images_dir, json_path = _write_dataset(tmp_path / "none", [_ann(1, [2, 3, 10, 20])], sizes=())
    with pytest.raises(DataError, match=r"instances\.json has no usable images: its 'images' list is empty"):
        CocoDataset(images_dir, json_path)
    images_dir, json_path = _write_dataset(tmp_path / "empty", [])
    with caplog.at_level(logging.WARNING, logger="detector.data.coco"):
        assert len(CocoDataset(images_dir, json_path)) == 2  # negatives only: allowed, but said
    assert [r.getMessage() for r in caplog.records] == [
        "instances.json has no boxes: training on it learns background only, and validating on it scores 0"]


def test_json_missing_images_raises_naming_the_file(tmp_path):
    json_path = tmp_path / "broken.json"
    json_path.write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(DataError, match=r"broken\.json.*'images' is missing"):
        CocoDataset(tmp_path, json_path)


@pytest.mark.parametrize("bbox", [[10, 10, -5, 20], [10, 10, 5, -1], [float("nan"), 1, 5, 5], [1, 1, float("inf"), 5]])
def test_negative_or_non_finite_box_is_an_error_naming_the_annotation(tmp_path, bbox):
    images_dir, json_path = _write_dataset(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(2, bbox)])
    with pytest.raises(DataError, match=r"annotations\[1\]\.bbox .* negative or non-finite"):
        CocoDataset(images_dir, json_path)


def test_annotation_with_wrong_bbox_type_raises(tmp_path):
    images_dir, json_path = _write_dataset(tmp_path, [_ann(1, "10 10 5 5")])
    with pytest.raises(DataError, match=r"annotations\[0\]\.bbox"):
        CocoDataset(images_dir, json_path)


def test_missing_image_is_listed(tmp_path):
    images_dir, json_path = _write_dataset(tmp_path, [_ann(1, [1, 1, 5, 5])])
    (images_dir / "2.jpg").unlink()
    with pytest.raises(DataError, match=r"1 missing or unreadable.*2\.jpg"):
        CocoDataset(images_dir, json_path)


def test_truncated_jpeg_is_caught_at_scan_or_skipped(tmp_path, caplog):
    images_dir, json_path = _write_dataset(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(2, [1, 1, 5, 5])],
                                           sizes=((120, 160), (120, 160)))
    noisy = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    cv2.imwrite(str(images_dir / "2.jpg"), noisy)
    data = (images_dir / "2.jpg").read_bytes()
    (images_dir / "2.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"2\.jpg"):
        CocoDataset(images_dir, json_path)
    with caplog.at_level(logging.WARNING):
        dataset = CocoDataset(images_dir, json_path, skip_bad_images=True)
    assert dataset.image_ids == [1]
    assert any("skipping 1 missing or unreadable" in r.getMessage() for r in caplog.records)


def test_cache_shrinks_images_and_scales_boxes(tmp_path):
    images_dir, json_path = _write_dataset(tmp_path, [_ann(1, [40, 20, 40, 40])])
    dataset = CocoDataset(images_dir, json_path, cache=True, image_size=40)
    image, target, _ = dataset.load(0)
    assert image.shape == (30, 40, 3)
    np.testing.assert_allclose(target.boxes_xyxy, [[20, 10, 40, 30]])
    assert dataset.orig_size(0) == (60, 80)


def test_cache_enlarges_small_images_to_the_training_size_as_training_would(tmp_path, monkeypatch):
    from detector.data import coco
    from detector.data.augment import TrainTransform

    images_dir, json_path = _write_dataset(tmp_path, [_ann(1, [40, 20, 40, 40]), _ann(2, [5, 5, 20, 30])])
    for index, (height, width) in enumerate([(60, 80), (50, 40)], 1):  # texture, so the resize shows
        cv2.imwrite(str(images_dir / f"{index}.png"),
                    np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8))
    data = json.loads(json_path.read_text())
    for record in data["images"]:
        record["file_name"] = record["file_name"].replace(".jpg", ".png")
    json_path.write_text(json.dumps(data))
    cached = CocoDataset(images_dir, json_path, cache=True, image_size=160)
    image, target, _ = cached.load(0)
    assert image.shape == (120, 160, 3)
    np.testing.assert_allclose(target.boxes_xyxy, [[80, 40, 160, 120]])
    # The cached sample is the one the disk path makes, resized once instead of every epoch.
    transform = TrainTransform(160, degrees=5.0, shear=2.0)
    for index in range(2):
        a_image, a_target = transform(cached, index, np.random.default_rng(index))
        b_image, b_target = transform(CocoDataset(images_dir, json_path), index, np.random.default_rng(index))
        np.testing.assert_array_equal(a_image, b_image)
        np.testing.assert_allclose(a_target.boxes_xyxy, b_target.boxes_xyxy, atol=1e-3)
        np.testing.assert_array_equal(a_target.classes, b_target.classes)
    # The RAM budget counts the enlarged images: 120x160 + 160x128, 3 bytes a pixel.
    monkeypatch.setattr(coco, "CACHE_AUTO_SHARE", 0.9 * (120 * 160 + 160 * 128) * 3 / psutil.virtual_memory().available)
    assert CocoDataset(images_dir, json_path, cache="auto", image_size=160)._cache is None


def test_rgba_png_becomes_rgb(tmp_path):
    images_dir, json_path = _write_dataset(tmp_path, [])
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[..., 2] = 255  # red in BGR(A)
    rgba[..., 3] = 128
    cv2.imwrite(str(images_dir / "1.png"), rgba)
    data = json.loads(json_path.read_text())
    data["images"][0]["file_name"] = "1.png"
    json_path.write_text(json.dumps(data))
    image, target, _ = CocoDataset(images_dir, json_path).load(0)
    assert image.shape == (60, 80, 3) and tuple(image[0, 0]) == (255, 0, 0)
    assert len(target) == 0


def test_stored_size_that_disagrees_with_the_file_is_replaced(tmp_path, caplog):
    images_dir, json_path = _write_dataset(tmp_path, [_ann(1, [60, 40, 100, 100])])
    data = json.loads(json_path.read_text())
    data["images"][0].update(width=800, height=600)  # the file is 80 x 60
    json_path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        dataset = CocoDataset(images_dir, json_path)
    assert "differs from the file" in caplog.text
    assert dataset.orig_size(0) == (60, 80)
    np.testing.assert_allclose(dataset.load(0)[1].boxes_xyxy, [[60, 40, 80, 60]])


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    images_dir, json_path = _write_dataset(tmp_path, [], sizes=((60, 80),))
    pixels = np.zeros((60, 80, 3), np.uint8)
    pixels[:, :40] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.fromarray(pixels).save(images_dir / "1.jpg", exif=exif.tobytes())
    dataset = CocoDataset(images_dir, json_path)
    image, _, _ = dataset.load(0)
    assert image.shape == (80, 60, 3) and dataset.orig_size(0) == (80, 60)
    assert image[:30].mean() > 200 and image[50:].mean() < 50  # the white half is now on top


def test_corrupt_files_in_the_middle_are_all_listed_or_skipped_with_a_count(tmp_path, caplog):
    sizes = [(40, 50)] * 7
    images_dir, json_path = _write_dataset(tmp_path, [_ann(i, [1, 1, 9, 9]) for i in range(1, 8)], sizes=sizes)
    noisy = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    cv2.imwrite(str(images_dir / "2.jpg"), noisy)
    (images_dir / "2.jpg").write_bytes((images_dir / "2.jpg").read_bytes()[:300])  # truncated JPEG
    (images_dir / "3.jpg").write_bytes(b"")                                          # zero bytes
    (images_dir / "4.jpg").write_text("<html>404 Not Found</html>")                  # text named .jpg
    _, png = cv2.imencode(".png", noisy)
    (images_dir / "5.jpg").write_bytes(png.tobytes()[: len(png) // 2])                # truncated PNG named .jpg
    bad = [str(images_dir / f"{i}.jpg") for i in (2, 3, 4, 5)]
    with pytest.raises(DataError) as caught:
        CocoDataset(images_dir, json_path)
    message = str(caught.value)
    assert message.startswith("4 missing or unreadable images") and all(path in message for path in bad)
    assert "skip_bad_images=true" in message and "\n" not in message
    with caplog.at_level(logging.WARNING):
        dataset = CocoDataset(images_dir, json_path, skip_bad_images=True)
    assert dataset.image_ids == [1, 6, 7] and [len(t) for t in dataset.targets] == [1, 1, 1]
    assert any(f"skipping 4 missing or unreadable images of instances.json and the 4 boxes on them (first: {bad[0]})"
               == r.getMessage() for r in caplog.records)


def test_load_for_a_smaller_size_decodes_at_reduced_scale_with_boxes_to_match(tmp_path):
    """A 640 x 480 JPEG loaded for imgsz 320 is decoded at half scale; boxes halve exactly, and stay on the object."""
    images_dir, json_path = _write_dataset(tmp_path, [_ann(1, [200, 100, 160, 120]), _ann(2, [10, 10, 20, 20])],
                                           sizes=((480, 640), (480, 641)))
    image = np.full((480, 640, 3), 30, np.uint8)
    image[100:220, 200:360] = 220  # the annotated object, drawn
    cv2.imwrite(str(images_dir / "1.jpg"), image)
    dataset = CocoDataset(images_dir, json_path)
    full, full_target, _ = dataset.load(0)
    half, half_target, _ = dataset.load(0, 320)
    assert full.shape == (480, 640, 3) and half.shape == (240, 320, 3)
    np.testing.assert_array_equal(half_target.boxes_xyxy, full_target.boxes_xyxy / 2)
    x1, y1, x2, y2 = half_target.boxes_xyxy[0].astype(int)
    assert half[y1 + 2:y2 - 2, x1 + 2:x2 - 2].mean() > 200 and half[:y1 - 2].mean() < 50
    assert dataset.load(0, 321)[0].shape == (480, 640, 3)  # half would be smaller than asked
    assert dataset.load(0, 160)[0].shape == (120, 160, 3)  # quarter scale
    assert dataset.load(1, 160)[0].shape == (480, 641, 3)  # 641 does not halve exactly: full decode


def test_cache_auto_keeps_images_that_fit_the_ram_budget_at_the_training_size(tmp_path, monkeypatch, caplog):
    from detector.data import coco

    images_dir, json_path = _write_dataset(tmp_path, [_ann(1, [40, 20, 40, 40])])
    with caplog.at_level(logging.INFO, logger="detector"):
        fitting = CocoDataset(images_dir, json_path, cache="auto", image_size=40)
    assert fitting.load(0)[0].shape == (30, 40, 3)  # decoded once, shrunk to the training size
    assert fitting._cache is not None and "kept in RAM" in caplog.text
    # 60x80 + 50x40 shrunk to 40 px: 30*40*3 + 40*32*3 bytes; a budget below that reads from disk.
    monkeypatch.setattr(coco, "CACHE_AUTO_SHARE", 0.9 * (30 * 40 * 3 + 40 * 32 * 3) / psutil.virtual_memory().available)
    with caplog.at_level(logging.INFO, logger="detector"):
        too_big = CocoDataset(images_dir, json_path, cache="auto", image_size=40)
    assert too_big._cache is None and "read from disk" in caplog.text
    assert too_big.load(0)[0].shape == (60, 80, 3)
