"""The Python API: Model().train(...), .val(...), .predict(...), .info()."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from detector.checkpoint import load_checkpoint
from detector.config import make_config
from detector.data.augment import round_image_size
from detector.data.cards import load_data_card
from detector.data.coco import CocoDataset
from detector.data.loader import build_dataloader
from detector.engine import predict_loader
from detector.errors import DetectorError
from detector.metrics import coco_evaluate, load_ground_truth
from detector.model import Detector, build_model, model_info
from detector.predict import Result, predict
from detector.runs import select_device, set_threads, setup_logging
from detector.trainer import train

logger = logging.getLogger(__name__)


class Model:
    """A detector to train, validate and run.

    Model() is the default scale (n); Model("s") or Model("cfg/models/s.yaml") another scale;
    Model("runs/detect/train/weights/best.pt") a trained checkpoint.
    """

    def __init__(self, model: str | Path = "n"):
        self.spec = str(model)
        self.checkpoint: dict | None = None
        self.detector: Detector | None = None
        if self.spec.endswith(".pt"):
            self._load(self.spec)

    def _load(self, path: str) -> None:
        self.checkpoint = load_checkpoint(path)
        self.detector = Detector(**self.checkpoint["model_args"])
        self.detector.load_state_dict(self.checkpoint["model"])
        self.detector.eval()
        self.spec = str(path)

    @property
    def names(self) -> list[str]:
        return list(self.checkpoint["names"]) if self.checkpoint else []

    def train(self, **overrides: Any) -> dict[str, float]:
        """Train (settings as in cfg/default.yaml); returns best.pt's validation metrics.

        Afterwards this Model holds best.pt's weights.
        """
        overrides.setdefault("model", self.spec)
        metrics = train(overrides)
        self._load(str(Path(metrics["run_dir"]) / "weights" / "best.pt"))
        return metrics

    def val(self, **overrides: Any) -> dict[str, float]:
        """COCO mAP of a trained model on the validation split of `data` (default: the data it trained on)."""
        self._require_weights("val")
        setup_logging()
        config = make_config({**self.checkpoint["config"], "resume": False, **overrides})
        card = load_data_card(config.data)
        device = select_device(config.device)
        set_threads(config.threads)
        dataset = CocoDataset(card.val_images, card.val_json, skip_bad_images=config.skip_bad_images)
        batch = 16 if config.auto_batch_fraction is not None else int(config.batch)
        loader = build_dataloader(dataset, train=False, image_size=round_image_size(config.imgsz),
                                  batch_size=batch, workers=config.workers, seed=config.seed)
        model = self.detector.to(device)
        detections, image_ids = predict_loader(model, loader, device=device, category_ids=dataset.category_ids,
                                               conf=config.conf, iou=config.iou, max_det=config.max_det)
        names = dict(zip(dataset.category_ids, dataset.names, strict=True))
        metrics = coco_evaluate(load_ground_truth(dataset.annotation_json), detections, image_ids, names)
        logger.info("val: mAP50-95 %.4f mAP50 %.4f P %.3f R %.3f on %d images", metrics.map50_95, metrics.map50,
                    metrics.precision, metrics.recall, len(image_ids))
        return {**metrics.as_row(), "fitness": metrics.fitness}

    def predict(self, source, *, imgsz: int | None = None, batch: int = 8, conf: float = 0.25, iou: float = 0.7,
                max_det: int = 300, device: str = "", save_dir: str | Path | None = None) -> list[Result]:
        """Detect objects in an image, a folder, a glob or a list of them; optionally save drawn copies."""
        self._require_weights("predict")
        image_size = round_image_size(imgsz or self.checkpoint["config"]["imgsz"])
        model = self.detector.to(select_device(device))
        results = predict(model, self.names, source, image_size=image_size, batch=batch, conf=conf, iou=iou,
                          max_det=max_det)
        if save_dir is not None:
            for result in results:
                result.save(Path(save_dir) / Path(result.path).name)
        return results

    def info(self, imgsz: int = 640) -> dict[str, float]:
        """Parameters and GFLOPs at imgsz (80 classes for an untrained scale)."""
        model = self.detector if self.detector is not None else build_model(self.spec, 80)
        info = model_info(model, imgsz)
        print(f"{self.spec}: {info['parameters'] / 1e6:.2f}M parameters, {info['gflops']:.1f} GFLOPs at {imgsz}")
        return info

    def _require_weights(self, action: str) -> None:
        if self.detector is None:
            raise DetectorError(f"Model('{self.spec}') has no trained weights to {action}: "
                             "train() it first or load a .pt checkpoint")

    def to(self, device: str | torch.device) -> Model:
        if self.detector is not None:
            self.detector.to(device)
        return self
