"""A dataset as Roboflow exports it in its YOLOv8 format trains unchanged: train/ valid/ test/ folders of images and
YOLO labels beside a data.yaml that names them ../train/images and carries a `roboflow:` block of its own."""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from detector.data.cards import load_data_card, split_files
from detector.errors import ConfigError, DataError
from detector.train.build import resolve_config
from detector.train.checkpoint import load_checkpoint
from detector.train.trainer import train
from tests.conftest import TINY_SCALE

# data.yaml as Roboflow writes it for a YOLOv8 export (its own keys and layout, the names made up).
ROBOFLOW_YAML = """train: ../train/images
val: ../valid/images
test: ../test/images

nc: 2
names: ['head', 'helmet']

roboflow:
  workspace: hard-hat-workers
  project: hard-hat-sample
  version: 2
  license: CC BY 4.0
  url: roboflow-universe/hard-hat-workers/hard-hat-sample/dataset/2  # what the export names; never fetched
"""
SPLIT_SIZES = {"train": 6, "valid": 3, "test": 2}


def make_export(root: Path, yaml_text: str = ROBOFLOW_YAML) -> Path:
    """A Roboflow YOLOv8 export in `root`: per split, images/<stem>.jpg with one box of each class in labels/; the
    last training image is a negative without a label file, as exports have. Returns its data.yaml."""
    rng = np.random.default_rng(0)
    for split, count in SPLIT_SIZES.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for index in range(count):
            stem = f"frame_{index:04d}_jpg.rf.{rng.integers(16**8):08x}"  # Roboflow's file names
            image = np.full((48, 64, 3), 60, np.uint8)
            cv2.rectangle(image, (4, 6), (24, 30), (250, 40, 40), -1)  # head
            cv2.circle(image, (46, 30), 10, (40, 250, 40), -1)  # helmet
            cv2.imwrite(str(root / split / "images" / f"{stem}.jpg"), image)
            if split == "train" and index == count - 1:
                continue
            (root / split / "labels" / f"{stem}.txt").write_text(
                "0 0.21875 0.375 0.3125 0.5\n1 0.71875 0.625 0.3125 0.416667\n")
    (root / "README.roboflow.txt").write_text("exported via roboflow.com\n")
    card = root / "data.yaml"
    card.write_text(yaml_text)
    return card


def test_a_roboflow_export_trains_from_its_own_data_yaml(tmp_path, detector_log):
    card = make_export(tmp_path / "hard-hat-sample-2")
    scale = tmp_path / "tiny_model.yaml"
    scale.write_text(yaml.safe_dump(TINY_SCALE))
    metrics = train({"data": str(card), "model": str(scale), "imgsz": 64, "epochs": 1, "batch": 4, "nbs": 4,
                     "workers": 0, "project": str(tmp_path / "runs"), "name": "run", "plots": False, "mosaic": 0.0,
                     "close_mosaic": 0}, progress=False)
    log = detector_log()
    ignored = [line for line in log.splitlines() if "ignoring" in line]
    assert ignored == [f"data card {card}: ignoring roboflow: written by another tool for itself, not card keys or "
                       "training settings"]
    assert "instances_train.json: 6 images, 10 boxes, 2 classes" in log  # 5 labelled images, one negative
    assert "instances_valid.json: 3 images, 6 boxes, 2 classes" in log
    assert (card.parent / "annotations" / "instances_train.json").is_file()  # written beside the export's folders
    run = tmp_path / "runs" / "run"
    assert load_checkpoint(run / "weights" / "last.pt")["names"] == ["head", "helmet"]
    assert len(list(csv.DictReader(open(run / "results.csv")))) == 1 and "metrics/mAP50" in metrics


def test_the_splits_are_read_below_the_yaml_and_the_test_split_too(tmp_path):
    card = load_data_card(make_export(tmp_path / "export"), tmp_path / "unused")
    root = tmp_path / "export"
    assert (card.train_images, card.val_images, card.test_images) == (
        root / "train" / "images", root / "valid" / "images", root / "test" / "images")
    assert card.names == ["head", "helmet"] and card.settings == {}
    images, json_path = split_files(card, "test")
    assert json_path == root / "annotations" / "instances_test.json"
    assert len(json.loads(json_path.read_text())["images"]) == SPLIT_SIZES["test"]


def test_a_missing_export_says_where_beside_the_yaml_to_put_it(tmp_path):
    (tmp_path / "data.yaml").write_text(ROBOFLOW_YAML)
    with pytest.raises(DataError, match=rf"put the images in {tmp_path}/train/images \(val: {tmp_path}/valid/images\)"):
        load_data_card(tmp_path / "data.yaml", tmp_path / "unused")


@pytest.mark.parametrize(("extra", "error"), [
    ("epocsh: 3\n", r"unknown key in data card .*data\.yaml: 'epocsh': did you mean epochs"),
    ("lr0: abc\n", r"invalid value lr0='abc': expected a number"),
    ("lr0: {initial: 0.01}\n", r"lr0="),  # a setting is never another tool's block, whatever its value
    ("colour: red\n", r"unknown key in data card .*data\.yaml: 'colour'"),
])
def test_a_misspelt_setting_beside_the_roboflow_block_is_still_an_error(tmp_path, extra, error):
    card = make_export(tmp_path / "export", ROBOFLOW_YAML + extra)
    with pytest.raises(ConfigError, match=error):
        resolve_config({"data": str(card)})


def test_metadata_keys_and_blocks_are_ignored_in_one_line_and_settings_kept(tmp_path, detector_log):
    card = make_export(tmp_path / "export", ROBOFLOW_YAML + "license: CC BY 4.0\nurl: example-site/d\n"
                                                            "epochs: 3\nextra:\n  exported_by: labeltool\n")
    config, data, _, _ = resolve_config({"data": str(card)})
    assert config.epochs == 3 and data.settings == {"epochs": 3}
    assert [line for line in detector_log().splitlines() if "ignoring" in line] == [
        f"data card {card}: ignoring roboflow, license, url, extra: written by another tool for itself, not card keys "
        "or training settings"]
