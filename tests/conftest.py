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


TINY_SCALE = {"scale": "tiny", "depth": 0.33, "width": 0.125, "max_channels": 256}


def make_tiny_setup(root: Path, *, seed: int, num_train: int, num_val: int, image_size: int,
                    val_is_train: bool = False) -> dict[str, str]:
    """A small generated shapes set with its data card, and a very small model scale: {data, model} paths."""
    from detector.data.shapes import generate_shapes

    generate_shapes(root / "shapes", seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
    val = "train" if val_is_train else "val"
    card = root / "tiny.yaml"
    card.write_text(yaml.safe_dump({"path": str(root / "shapes"), "train": "images/train", "val": f"images/{val}",
                                    "train_json": "annotations/instances_train.json",
                                    "val_json": f"annotations/instances_{val}.json"}))
    scale = root / "tiny_model.yaml"
    scale.write_text(yaml.safe_dump(TINY_SCALE))
    return {"data": str(card), "model": str(scale)}
