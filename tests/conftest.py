"""Shared fixtures: where the real test datasets live, and a tiny CPU budget."""

import os
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _cpu_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """The read-only folder with coco8 and coco128 (../shared/datasets unless DETECTOR_DATASETS says)."""
    path = Path(os.environ.get("DETECTOR_DATASETS", REPO.parent / "shared" / "datasets"))
    if not (path / "coco8").is_dir():
        pytest.skip(f"real test datasets not found at {path}")
    return path


def tiny_shapes_setup(root: Path, *, num_train: int, image_size: int, seed: int) -> dict[str, str]:
    """A small shapes set whose val split is its train split, and a very small model scale.

    Returns the `data` (card path) and `model` (scale YAML path) settings.
    """
    from detector.data.shapes import generate_shapes

    generate_shapes(root / "shapes", seed=seed, num_train=num_train, num_val=2, image_size=image_size)
    card = root / "tiny.yaml"
    card.write_text(yaml.safe_dump({
        "path": str(root / "shapes"), "train": "images/train", "val": "images/train",
        "train_json": "annotations/instances_train.json", "val_json": "annotations/instances_train.json"}))
    scale = root / "tiny_model.yaml"
    scale.write_text(yaml.safe_dump({"scale": "tiny", "depth": 0.33, "width": 0.125, "max_channels": 256}))
    return {"data": str(card), "model": str(scale)}
