"""Shared fixtures: where the real test datasets live, and a tiny CPU budget."""

import os
from pathlib import Path

import pytest
import torch

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
