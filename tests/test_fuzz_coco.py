"""Fuzzing the COCO JSON reader: it loads the valid part or raises one DataError, never a wrong box."""

import json
import logging
import re

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from detector.data.coco import CocoDataset
from detector.errors import DataError

SIZES = {"a.jpg": (40, 60), "b.png": (50, 30), "ç日.jpg": (32, 32)}  # file -> (height, width); one unicode name


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    for name, (height, width) in SIZES.items():
        cv2.imwrite(str(folder / name), np.full((height, width, 3), 120, np.uint8))
    return folder


numbers = st.one_of(st.integers(-100, 200), st.floats(-1e3, 1e3), st.floats(allow_nan=True, allow_infinity=True))
corner, side = st.one_of(st.integers(-10, 60), st.floats(-10, 60)), st.one_of(st.integers(1, 50), st.floats(0, 50))
plausible_boxes = st.tuples(corner, corner, side, side).map(list)  # often inside, sometimes across the edge
hostile_boxes = st.lists(st.one_of(corner, side, numbers), min_size=4, max_size=4)
anything = st.one_of(st.none(), st.booleans(), st.text(max_size=3), numbers, st.lists(numbers, max_size=5))


def record(**fields):
    return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v != "<missing>"})


def maybe(value_strategy):
    """The value, a wrong-typed one, or nothing (the key left out)."""
    return st.one_of(value_strategy, anything, st.just("<missing>"))


def valid_documents(boxes):
    """Structurally valid documents: boxes outside the image or thin (and, with hostile box values, negative
    or NaN), unknown categories, annotations of unknown images, missing or unicode-named images, stale sizes."""
    return st.fixed_dictionaries({
        "images": st.lists(record(id=st.integers(1, 3), file_name=st.sampled_from([*SIZES, *SIZES, "missing.jpg"]),
                                  width=st.one_of(st.integers(1, 100), st.just("<missing>")),
                                  height=st.one_of(st.integers(1, 100), st.just("<missing>"))), min_size=1, max_size=4,
                           unique_by=lambda r: r["id"]),
        "annotations": st.lists(record(id=st.one_of(st.integers(1, 9), st.just("<missing>")),
                                       image_id=st.integers(1, 4), category_id=st.integers(0, 3),
                                       bbox=boxes,
                                       iscrowd=st.one_of(st.integers(0, 1), st.just("<missing>"))), min_size=1,
                                max_size=8),
        "categories": st.just([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]),
    })


# Structurally broken documents: wrong types, missing keys, not even an object.
broken_documents = st.one_of(
    st.fixed_dictionaries({
        "images": st.lists(record(id=maybe(st.integers(0, 4)), file_name=maybe(st.sampled_from([*SIZES]))), max_size=3),
        "annotations": st.lists(record(image_id=maybe(st.integers(0, 5)), category_id=maybe(st.integers(0, 4)),
                                       bbox=maybe(st.lists(numbers, min_size=3, max_size=5))), max_size=4),
        "categories": maybe(st.lists(record(id=maybe(st.integers(0, 3)), name=maybe(st.text(max_size=4))),
                                     max_size=3))}),
    st.dictionaries(st.sampled_from(["images", "annotations", "categories", "info"]), anything, max_size=4),
    anything)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.one_of(valid_documents(plausible_boxes), valid_documents(hostile_boxes)), skip_bad=st.booleans())
def test_valid_structure_with_hostile_values_loads_its_valid_part_or_raises_one_error(
        images_dir, tmp_path_factory, document, skip_bad):
    check_loads_or_raises(images_dir, tmp_path_factory, document, skip_bad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=broken_documents, skip_bad=st.booleans())
def test_broken_structure_raises_one_clear_error(images_dir, tmp_path_factory, document, skip_bad):
    check_loads_or_raises(images_dir, tmp_path_factory, document, skip_bad)


class Messages(logging.Handler):
    """Collects the messages the dataset logs while it loads."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_loads_or_raises(images_dir, tmp_path_factory, document, skip_bad):
    """CocoDataset either raises one DataError of one line, or loads exactly the valid boxes and counts the rest."""
    path = tmp_path_factory.mktemp("json") / "instances.json"
    path.write_text(json.dumps(document))
    messages = Messages()
    logging.getLogger("detector.data.coco").addHandler(messages)
    try:
        dataset = CocoDataset(images_dir, path, skip_bad_images=skip_bad)
    except DataError as err:
        message = str(err)
        assert message and "\n" not in message.strip()
        event("error: " + " ".join(message.split(": ", 1)[-1].split()[:4]))
        return
    finally:
        logging.getLogger("detector.data.coco").removeHandler(messages)
    event(f"loaded {sum(len(t) for t in dataset.targets)} boxes" if len(dataset) else "loaded no images")
    assert len(set(dataset.image_ids)) == len(dataset.image_ids)
    expected, dropped = expected_boxes(document, dataset.image_ids)
    for path_, (height, width), target, image_id in zip(dataset.paths, dataset.sizes, dataset.targets,
                                                        dataset.image_ids, strict=True):
        assert (height, width) == SIZES[path_.name]
        boxes = target.boxes_xyxy
        assert np.isfinite(boxes).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2:] - boxes[:, :2] >= 1).all()
        # Not only valid boxes: the very boxes of the file, clipped, with their own classes, in file order.
        want = expected[image_id]
        np.testing.assert_allclose(boxes, np.array([b for b, _ in want], np.float32).reshape(-1, 4), atol=1e-4)
        assert [dataset.category_ids[c] for c in target.classes] == [c for _, c in want]
    counted = [int(re.search(r"dropped (\d+) box", m).group(1)) for m in messages.messages if "dropped" in m]
    assert counted == ([dropped] if dropped else [])


def expected_boxes(document: dict, loaded_ids: list[int]) -> tuple[dict[int, list], int]:
    """What a correct loader keeps: per loaded image, [(clipped [x1, y1, x2, y2], category id)] of its
    non-crowd boxes of known categories at least 1 px wide and high; and how many boxes it drops."""
    sizes = {r["id"]: SIZES[r["file_name"]] for r in document["images"] if r["file_name"] in SIZES}
    categories = {c["id"] for c in document["categories"]}
    known_images = {r["id"] for r in document["images"]}
    kept, dropped = {i: [] for i in loaded_ids}, 0
    for annotation in document["annotations"]:
        image_id = annotation["image_id"]
        if image_id not in known_images:
            dropped += 1
            continue
        if image_id not in kept or annotation.get("iscrowd", 0):
            continue  # a skipped image's boxes go with it; crowd boxes are not trained on, not dropped
        x, y, w, h = (float(v) for v in annotation["bbox"])
        height, width = sizes[image_id]
        box = [min(max(x, 0), width), min(max(y, 0), height), min(max(x + w, 0), width), min(max(y + h, 0), height)]
        box = [float(np.float32(v)) for v in box]  # boxes are stored in float32: a 1 px box may round below 1 px
        if annotation["category_id"] not in categories or not (box[2] - box[0] >= 1 and box[3] - box[1] >= 1
                                                              and w > 0 and h > 0):
            dropped += 1
            continue
        kept[image_id].append((box, annotation["category_id"]))
    return kept, dropped


def test_duplicate_image_ids_are_an_error_not_a_silent_merge(images_dir, tmp_path):
    document = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.png"}],
                "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
                "categories": [{"id": 1, "name": "x"}]}
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match="image id 1"):
        CocoDataset(images_dir, path)


def test_duplicate_category_ids_are_an_error(images_dir, tmp_path):
    document = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [],
                "categories": [{"id": 1, "name": "x"}, {"id": 1, "name": "y"}]}
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match="category id 1"):
        CocoDataset(images_dir, path)
