"""The embedded shapes dataset: deterministic, correct boxes, real shapes, atomic generation."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from detector.data import shapes, shapes_render
from detector.errors import DataError

SMALL = {"num_train": 24, "num_val": 6}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return shapes.generate_shapes(tmp_path_factory.mktemp("data") / "shapes", seed=0, **SMALL)


def _load(root: Path, split: str) -> tuple[dict, list[np.ndarray]]:
    coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    images = [cv2.imread(str(root / "images" / split / im["file_name"])) for im in coco["images"]]
    return coco, images


def test_same_seed_gives_identical_dataset_and_other_seed_differs(tmp_path, dataset):
    again = shapes.generate_shapes(tmp_path / "again", seed=0, **SMALL)
    other = shapes.generate_shapes(tmp_path / "other", seed=1, **SMALL)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}.json"
        assert (again / name).read_bytes() == (dataset / name).read_bytes()
        assert (other / name).read_bytes() != (dataset / name).read_bytes()
        _, first = _load(dataset, split)
        _, second = _load(again, split)
        _, third = _load(other, split)
        assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
        assert not any(np.array_equal(a, c) for a, c in zip(first, third, strict=True))


def test_splits_differ(dataset):
    _, train = _load(dataset, "train")
    _, val = _load(dataset, "val")
    assert not np.array_equal(train[0], val[0])


def test_coco_json_loads_with_pycocotools_and_boxes_lie_inside(dataset):
    coco = COCO(str(dataset / "annotations" / "instances_train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(shapes.CLASS_NAMES)
    assert len(coco.getImgIds()) == SMALL["num_train"]
    annotations = coco.loadAnns(coco.getAnnIds())
    assert len(annotations) >= 2 * SMALL["num_train"]  # 2-8 shapes on most images
    for ann in annotations:
        image = coco.loadImgs(ann["image_id"])[0]
        x, y, w, h = ann["bbox"]
        assert w >= 2 and h >= 2
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
        assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h * 1.05 + 4
        assert ann["category_id"] in (1, 2, 3, 4)
    assert {ann["category_id"] for ann in annotations} == {1, 2, 3, 4}


def test_small_large_and_occluded_objects_exist(dataset):
    coco, _ = _load(dataset, "train")
    longest_sides = np.array([max(a["bbox"][2:]) for a in coco["annotations"]])
    assert (longest_sides < 16).mean() > 0.05  # small objects are a real share, not a fluke
    assert longest_sides.max() > 60
    visible = np.array([obj.visible for index in range(SMALL["num_train"])
                        for obj in shapes_render.render_image(np.random.default_rng((0, 0, index)))[1]])
    assert visible.min() >= shapes_render.MIN_VISIBLE
    assert (visible < 0.95).sum() >= 3  # overlaps really happen


def _check_shape(obj: shapes_render.RenderedObject) -> None:
    """The visible mask of a whole, filled shape has its class's geometry."""
    contours, _ = cv2.findContours(obj.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    corners = len(cv2.approxPolyDP(contour, 0.04 * cv2.arcLength(contour, True), True))
    solidity = cv2.contourArea(contour) / cv2.contourArea(cv2.convexHull(contour))
    _, _, w, h = obj.box_xywh
    fill = obj.mask.sum() / (w * h)
    name = shapes_render.CLASS_NAMES[obj.class_index]
    if name == "circle":
        assert abs(w - h) <= 2 and 0.7 < fill < 0.86 and solidity > 0.93, (w, h, fill, solidity)
    elif name == "rectangle":
        assert corners == 4 and solidity > 0.88 and fill > 0.4, (corners, solidity, fill)
    elif name == "triangle":
        assert corners == 3 and solidity > 0.88 and 0.35 < fill < 0.56, (corners, solidity, fill)
    else:  # a star is the only concave class
        assert corners >= 7 and solidity < 0.75 and fill < 0.55, (corners, solidity, fill)


def test_each_box_holds_its_category_shape_in_its_colour(dataset):
    coco, images = _load(dataset, "train")
    checked = set()
    for image_info, image in zip(coco["images"], images, strict=True):
        rendered, objects = shapes_render.render_image(np.random.default_rng((0, 0, image_info["id"] - 1)))
        # The written file is that render (up to JPEG error), so the render's masks describe it.
        assert np.abs(image.astype(int) - rendered).mean() < 6  # another image differs by ~50
        anns = [a for a in coco["annotations"] if a["image_id"] == image_info["id"]]
        assert [(a["category_id"] - 1, tuple(a["bbox"])) for a in anns] == \
            [(o.class_index, tuple(map(float, o.box_xywh))) for o in objects]
        for obj in objects:
            x, y, w, h = obj.box_xywh
            assert obj.mask[y:y + h, x:x + w].sum() == obj.mask.sum()  # the box is tight around the mask
            # The shape's colour shows in the file: most of its pixels, and a real part of its box.
            distance = np.linalg.norm(image.astype(float) - obj.color, axis=2)
            assert (distance[obj.mask] < 45).mean() > 0.5
            assert (distance[y:y + h, x:x + w] < 45).mean() > (0.05 if not obj.filled else 0.2)
            if obj.filled and obj.visible == 1.0 and min(w, h) >= 20:
                _check_shape(obj)
                checked.add(obj.class_index)
    assert checked == {0, 1, 2, 3}


def test_interrupted_generation_leaves_nothing_and_rerun_completes(tmp_path, monkeypatch):
    real_render = shapes.render_image
    calls = []

    def failing_render(rng, image_size=256):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # what a user's Ctrl-C mid-generation looks like
        return real_render(rng, image_size)

    monkeypatch.setattr(shapes, "render_image", failing_render)
    root = tmp_path / "shapes"
    with pytest.raises(KeyboardInterrupt):
        shapes.generate_shapes(root, num_train=6, num_val=2)
    assert list(tmp_path.iterdir()) == []  # no root and no temp folder left behind
    assert shapes.generate_shapes(root, num_train=6, num_val=2) == root
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert len(coco["images"]) == 2 and len(list((root / "images" / "train").iterdir())) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]


def test_complete_dataset_is_reused_and_foreign_folder_refused(tmp_path, monkeypatch):
    root = shapes.generate_shapes(tmp_path / "shapes", num_train=2, num_val=1)
    before = (root / "annotations" / "instances_train.json").stat().st_mtime_ns

    def no_render(*args, **kwargs):
        raise AssertionError("a complete dataset must not be rendered again")

    monkeypatch.setattr(shapes, "render_image", no_render)
    assert shapes.generate_shapes(root, num_train=2, num_val=1) == root
    assert (root / "annotations" / "instances_train.json").stat().st_mtime_ns == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="no complete shapes dataset"):
        shapes.generate_shapes(foreign, num_train=2, num_val=1)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_stale_partial_from_a_killed_run_is_removed(tmp_path):
    stale = tmp_path / ".shapes.partial-999999999"  # no such process
    (stale / "images").mkdir(parents=True)
    shapes.generate_shapes(tmp_path / "shapes", num_train=1, num_val=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


def test_command_line_writes_dataset(tmp_path):
    assert shapes.main(["--out", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1",
                        "--image-size", "128"]) == 0
    coco = json.loads((tmp_path / "cli" / "annotations" / "instances_train.json").read_text())
    assert len(coco["images"]) == 2 and coco["images"][0]["width"] == 128
    assert cv2.imread(str(tmp_path / "cli" / "images" / "train" / "000000.jpg")).shape == (128, 128, 3)
