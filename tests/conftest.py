"""Shared fixtures: where the real test datasets live, a tiny CPU budget, and no network beyond this machine."""

import ipaddress
import logging.handlers
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _cpu_threads():
    torch.set_num_threads(2)


def _is_this_machine(host) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch):
    """Nothing a test does can resolve or connect to a host other than this machine (local servers still work)."""
    resolve, connect = socket.getaddrinfo, socket.socket.connect

    def local_resolve(host, *args, **kwargs):
        if not _is_this_machine(host.decode() if isinstance(host, bytes) else host):
            raise OSError(f"tests may not reach the network: {host}")
        return resolve(host, *args, **kwargs)

    def local_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_this_machine(address[0]):
            raise OSError(f"tests may not reach the network: {address[0]}")
        return connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", local_resolve)
    monkeypatch.setattr(socket.socket, "connect", local_connect)


@pytest.fixture
def detector_log():
    """A function giving the messages the package logged during the test, one per line (its logger does not
    propagate once set up, so pytest's caplog misses them)."""
    logger, handler = logging.getLogger("detector"), logging.handlers.BufferingHandler(100_000)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield lambda: "\n".join(record.getMessage() for record in handler.buffer)
    logger.removeHandler(handler)
    logger.setLevel(level)


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


def content_sensitive_detector(num_classes: int, seed: int = 0):
    """A tiny untrained detector whose scores follow the image: a fresh model's are nearly the same at every
    anchor (small weights, then BatchNorm), which makes NMS break ties by rounding noise. Kaiming weights,
    random BatchNorm statistics and a stronger class layer give every anchor its own score."""
    from detector.model.network import Detector

    torch.manual_seed(seed)
    model = Detector(num_classes=num_classes, **TINY_SCALE)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    for branch in model.head.cls:
        branch[-1].weight.data *= 10
        torch.nn.init.constant_(branch[-1].bias, -4.0)
    return model.eval()


@pytest.fixture(scope="session")
def coco8_checkpoint(tmp_path_factory, datasets_dir) -> Path:
    """A checkpoint of content_sensitive_detector for coco8's 80 classes (original COCO category ids), imgsz 128."""
    from detector.config import make_config
    from detector.data.coco import CocoDataset
    from detector.train.checkpoint import save_checkpoint

    root = datasets_dir / "coco8"
    dataset = CocoDataset(root / "images" / "val", root / "annotations" / "instances_val.json")
    model = content_sensitive_detector(len(dataset.names))
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model.model_args, "names": dataset.names,
                           "category_ids": dataset.category_ids,
                           "config": make_config({"imgsz": 128, "workers": 0}).to_dict()})
    return path
