"""The Python API: Model().train(...), .val(...), .predict(...), .export(...), .info()."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from detector.atomic import atomic_write_text, check_file_path, file_in_the_way
from detector.config import class_indices, make_config
from detector.data.augment import round_image_size
from detector.data.cards import load_data_card, split_files
from detector.data.coco import CocoDataset
from detector.data.loader import build_dataloader
from detector.device import select_device, set_threads
from detector.errors import ConfigError, DataError, DetectorError
from detector.evaluate.metrics import load_ground_truth
from detector.evaluate.results_file import evaluate_predictions
from detector.evaluate.validate import evaluate
from detector.inference.export import LAYOUTS, ONNX_OPSET, OnnxForward, export_onnx
from detector.inference.predict import STREAM_MAX_BATCH, Forward, TorchForward, inference_batch, predict
from detector.inference.results import Result
from detector.inference.sources import count_frames
from detector.model.network import Detector, build_model, model_info
from detector.runs import setup_logging
from detector.train.checkpoint import load_checkpoint
from detector.train.trainer import train

logger = logging.getLogger(__name__)


class Model:
    """A detector to train, validate, run and export.

    Model() is the default scale (n); Model("s") or Model("cfg/models/s.yaml") another scale;
    Model("runs/detect/train/weights/best.pt") a trained checkpoint; Model("best.onnx") an exported
    model, which can predict (on onnxruntime).
    """

    def __init__(self, model: str | Path = "n"):
        self.spec = str(model)
        self.checkpoint: dict | None = None
        self.detector: Detector | None = None
        self._fused: Detector | None = None  # Conv+BN folded copy of detector, for inference
        self._auto_batches: dict[tuple, int] = {}  # AutoBatch's inference choices, by what they depend on
        self._onnx: dict[str, OnnxForward] = {}  # onnxruntime sessions by device
        if self.spec.endswith(".pt"):
            self._load(self.spec)
        elif self.spec.endswith(".onnx"):
            self._onnx_forward(torch.device("cpu"))  # reads the metadata now: a wrong file fails here

    def _load(self, path: str) -> None:
        self.checkpoint = load_checkpoint(path)
        self.detector = Detector(**self.checkpoint["model_args"])
        self.detector.load_state_dict(self.checkpoint["model"])
        self.detector.eval()
        self.spec = str(path)
        self._fused, self._auto_batches = None, {}

    @property
    def names(self) -> list[str]:
        if self.spec.endswith(".onnx"):
            return list(self._onnx_forward(torch.device("cpu")).names)
        return list(self.checkpoint["names"]) if self.checkpoint else []

    def train(self, **overrides: Any) -> dict[str, float]:
        """Train (settings as in cfg/default.yaml); returns best.pt's validation metrics.

        Afterwards this Model holds best.pt's weights.
        """
        setup_logging()
        overrides.setdefault("model", self.spec)
        metrics = train(overrides)
        self._load(str(Path(metrics["run_dir"]) / "weights" / "best.pt"))
        return metrics

    def val(self, split: str = "val", *, save_json: str | Path | None = None, predictions: str | Path | None = None,
            **overrides: Any) -> dict[str, float]:
        """COCO mAP of a trained model on a split of `data` (default: the data it trained on): val, test (a card's
        `test:` folder) or train.

        batch=N validates N images per step; batch=-1 (or a fraction) lets AutoBatch size the step from
        forward-only samples. The model runs with Conv+BN fused. save_json: write the detections scored, in COCO's
        results format (the dataset's image and category ids, boxes x, y, w, h in original pixels), to this file.
        predictions: score this COCO results file (any tool's) instead; no model runs, so Model().val works too.
        """
        setup_logging()
        if predictions is not None:
            return self._val_predictions(split, predictions, save_json, overrides)
        self._require_weights("val")
        if save_json is not None:
            check_file_path(Path(save_json))  # before the pass, not after it
        config = make_config({**self.checkpoint["config"], "resume": False, **overrides})
        card = load_data_card(config.data)
        images, annotation_json = split_files(card, split)
        device = select_device(config.device)
        set_threads(config.threads)
        classes = class_indices(config.classes, card.names)  # the data's classes, before single_cls
        dataset = CocoDataset(images, annotation_json, skip_bad_images=config.skip_bad_images,
                              single_cls=config.single_cls, classes=classes)
        if len(self.names) != len(dataset.names):
            raise DataError(f"the model knows {len(self.names)} classes ({', '.join(self.names[:3])}, ...) but "
                            f"{annotation_json.name} has {len(dataset.names)} ({', '.join(dataset.names[:3])}, ...): "
                            "validate on data with the model's classes")
        image_size = round_image_size(config.imgsz)
        model = self._fused_model(device)
        batch = self._batch(config.batch, config.auto_batch_fraction, image_size, device, len(dataset), config.conf)
        loader = build_dataloader(dataset, train=False, image_size=image_size, batch_size=batch,
                                  workers=config.workers, seed=config.seed, device=device)
        truth = load_ground_truth(dataset.annotation_json, config.single_cls, classes)
        result = evaluate(model, loader, truth, dataset=dataset, device=device, conf=config.conf, iou=config.iou,
                          max_det=config.max_det)
        if save_json is not None:
            atomic_write_text(Path(save_json), json.dumps(result.detections))
            logger.info("wrote %d detections of %d images to %s", len(result.detections), len(result.image_ids),
                        save_json)
        metrics = result.metrics
        logger.info("%s: mAP50-95 %.4f mAP50 %.4f P %.3f R %.3f on %d images (batch %d)", split, metrics.map50_95,
                    metrics.map50, metrics.precision, metrics.recall, len(result.image_ids), batch)
        return {**metrics.as_row(), "fitness": metrics.fitness}

    def _val_predictions(self, split: str, predictions: str | Path, save_json: str | Path | None,
                         overrides: dict[str, Any]) -> dict[str, float]:
        """val(predictions=...): the file's detections scored on `data` (default: this model's) as they are."""
        config = make_config({**(self.checkpoint or {}).get("config", {}), "resume": False, **overrides})
        unused = sorted({*overrides, *(["save_json"] * (save_json is not None))} - {"data", "classes", "single_cls"})
        if unused:
            raise ConfigError(f"val predictions= scores the file's detections as they are: {', '.join(unused)} "
                              "cannot apply; give only data, classes or single_cls")
        if "data" not in overrides and self.checkpoint is None:
            raise ConfigError("val predictions= needs data=<data card or COCO JSON> to score the detections against")
        metrics = evaluate_predictions(config.data, predictions, split=split, classes=config.classes,
                                       single_cls=config.single_cls).metrics
        return {**metrics.as_row(), "fitness": metrics.fitness}

    def predict(self, source, *, imgsz: int | None = None, batch: float = 8, max_wait_ms: float | None = None,
                conf: float = 0.25, iou: float = 0.7, max_det: int = 300, classes=None, device: str = "",
                save_dir: str | Path | None = None, save_txt: str | Path | None = None,
                stream: bool = False) -> list[Result] | Iterator[Result]:
        """Detect objects in images, videos, folders, globs, arrays, or a list or iterable of them.

        Frames are read ahead in a thread and grouped into batches as they arrive; results come in source
        order. The PyTorch model runs with Conv+BN fused.

        Args:
            source: see inference/sources.py (e.g. "img.jpg", "dir/", "*.jpg", "clip.mp4", an (H, W, 3)
                BGR array, a generator of arrays). An unreadable file is skipped with a warning when found in a
                folder or glob, an error when named; a file cut short warns and gives a Result with incomplete=True.
            imgsz: letterbox size (default: the training size; an ONNX model's export size): the longest side of
                each frame's input, which is the smallest multiples of 32 around the frame (an ONNX model's is
                imgsz x imgsz, fixed at export).
            batch: frames per forward pass; -1 (or a fraction 0 < f < 1) lets AutoBatch choose from
                forward-only steps, capped at the source's length when it is known.
            max_wait_ms: longest wait of a batch's first frame for the rest (None: until full), for streams.
            conf, iou, max_det: NMS settings.
            classes: detect only these classes: indices or names, as a list, or one, or comma-separated text
                ("0,2", "person,car"); None detects all.
            device: '', cpu, cuda, 0, cuda:0.
            save_dir: write each image drawn with its boxes there.
            save_txt: write each image's detections there as a YOLO label file, <image stem>.txt ("class cx cy w h",
                normalised; an empty file for an image without any), labels to train on or to check by eye.
            stream: return a generator (results as they are ready) instead of a list.
        """
        _check_predict_options(max_wait_ms, save_dir, save_txt)
        settings = make_config({"imgsz": imgsz or self._trained_size(), "batch": batch, "conf": conf, "iou": iou,
                                "max_det": max_det, "device": device})
        device = select_device(settings.device)
        image_size = round_image_size(settings.imgsz)
        forward, names, category_ids = self._forward(device, image_size)
        frames = count_frames(source) if settings.auto_batch_fraction is not None else None
        batch = self._batch(settings.batch, settings.auto_batch_fraction, image_size, device,
                            STREAM_MAX_BATCH if frames is None else max(frames, 1), settings.conf)
        results = predict(forward, source, names=names, category_ids=category_ids, image_size=image_size,
                          batch=batch, max_wait_ms=max_wait_ms, conf=settings.conf, iou=settings.iou,
                          max_det=settings.max_det, rect=not self.spec.endswith(".onnx"),
                          classes=class_indices(classes, names))
        if save_dir is not None or save_txt is not None:
            results = _saving(results, save_dir, save_txt)
        return results if stream else list(results)

    def _forward(self, device: torch.device, image_size: int) -> tuple[Forward, list[str], list[int]]:
        """What predict runs (the ONNX file on onnxruntime, else the fused PyTorch model), with the class names
        and COCO category ids."""
        if self.spec.endswith(".onnx"):
            forward = self._onnx_forward(device)
            if image_size != forward.image_size:
                raise ConfigError(f"{self.spec} was exported at imgsz={forward.image_size}; export again for "
                                  f"imgsz={image_size}")
            return forward, forward.names, forward.category_ids
        self._require_weights("predict")
        return TorchForward(self._fused_model(device), device), self.names, list(self.checkpoint["category_ids"])

    def export(self, format: str = "onnx", *, imgsz: int | None = None, file: str | Path | None = None,
               opset: int = ONNX_OPSET, layout: str = "detector") -> Path:
        """Write the model as ONNX: Conv+BN fused, decoding in the graph, a dynamic batch axis, and the
        metadata (names, category_ids, imgsz, stride) in the file; see inference/export.py for the graph.

        Args:
            format: "onnx" (the only one).
            imgsz: input size (default: the training size); fixed in the file, as the anchors are.
            file: where to write (default: beside the checkpoint, same name, .onnx).
            opset: ONNX opset version.
            layout: "detector": boxes_xyxy (B, A, 4), scores (B, A, C); "yolov8": one output (B, 4 + C, A), box cx,
                cy, w, h then class scores, with the metadata YOLOv8 deployment tools read. predict reads both.

        Returns:
            The path written.
        """
        self._require_weights("export")
        if str(format).lower() != "onnx":
            raise ConfigError(f"invalid value format={format!r}: export writes onnx only")
        if layout not in LAYOUTS:
            raise ConfigError(f"invalid value layout={layout!r}: expected {' or '.join(LAYOUTS)}")
        image_size = round_image_size(make_config({"imgsz": imgsz or self._trained_size()}).imgsz)
        path = Path(file) if file is not None else Path(self.spec).with_suffix(".onnx")
        path = export_onnx(self.detector, path, image_size=image_size, names=self.names,
                           category_ids=list(self.checkpoint["category_ids"]), opset=opset, layout=layout)
        logger.info("export: wrote %s (ONNX opset %d, %s layout, imgsz %d)", path, opset, layout, image_size)
        return path

    def info(self, imgsz: int = 640) -> dict[str, float]:
        """Parameters and GFLOPs at imgsz (80 classes for an untrained scale)."""
        if self.spec.endswith(".onnx"):
            raise DetectorError(f"info needs a scale or a .pt checkpoint, not the ONNX file {self.spec}")
        model = self.detector if self.detector is not None else build_model(self.spec, 80)
        info = model_info(model, imgsz)
        print(f"{self.spec}: {info['parameters'] / 1e6:.2f}M parameters, {info['gflops']:.1f} GFLOPs at {imgsz}")
        return info

    def _trained_size(self) -> int:
        if self.spec.endswith(".onnx"):
            return self._onnx_forward(torch.device("cpu")).image_size
        return int(self.checkpoint["config"]["imgsz"]) if self.checkpoint else 640

    def _fused_model(self, device: torch.device) -> Detector:
        """The trained weights with each BatchNorm folded into its convolution (made once, then moved)."""
        if self._fused is None:
            self._fused = self.detector.fused_copy()
        return self._fused.to(device)

    def _onnx_forward(self, device: torch.device) -> OnnxForward:
        if device.type not in self._onnx:
            self._onnx[device.type] = OnnxForward(self.spec, device)
        return self._onnx[device.type]

    def _batch(self, batch: float, fraction: float | None, image_size: int, device: torch.device,
               max_batch: int, conf: float) -> int:
        """`batch` when fixed; else AutoBatch's inference batch (measured once per size, device, cap and conf)."""
        if fraction is None:
            return int(batch)
        if self.detector is None:
            raise ConfigError("batch=-1 (AutoBatch) measures a PyTorch model's memory; give batch=N for an "
                              "ONNX model")
        key = (str(device), image_size, fraction, max_batch, conf)
        if key not in self._auto_batches:
            decision = inference_batch(self._fused_model(device), image_size=image_size, device=device,
                                       fraction=fraction, max_batch=max_batch, conf=conf)
            self._auto_batches[key] = decision.batch
        return self._auto_batches[key]

    def _require_weights(self, action: str) -> None:
        if self.spec.endswith(".onnx"):
            raise DetectorError(f"Model('{self.spec}') is an exported ONNX model: it can predict, not {action}; "
                                "load the .pt checkpoint for that")
        if self.detector is None:
            raise DetectorError(f"Model('{self.spec}') has no trained weights to {action}: "
                                "train() it first or load a .pt checkpoint")

    def to(self, device: str | torch.device) -> Model:
        if self.detector is not None:
            self.detector.to(device)
        return self


def _check_predict_options(max_wait_ms: float | None, save_dir: str | Path | None, save_txt: str | Path | None
                           ) -> None:
    """Fail before any frame is read: a negative wait, or a file where an output folder should be."""
    if max_wait_ms is not None and not max_wait_ms >= 0:
        raise ConfigError(f"invalid value max_wait_ms={max_wait_ms!r}: expected milliseconds >= 0 or None")
    for key, folder in (("save_dir", save_dir), ("save_txt", save_txt)):
        blocker = None if folder is None else file_in_the_way(Path(folder))
        if blocker is not None:
            raise ConfigError(f"{key}={folder} cannot be a folder: {blocker} is a file; give {key}= a folder")


def _saving(results: Iterator[Result], save_dir: str | Path | None, save_txt: str | Path | None
            ) -> Iterator[Result]:
    """Pass results on, writing each one's drawn image into save_dir and its YOLO labels into save_txt first."""
    for result in results:
        if save_dir is not None:
            result.save(Path(save_dir) / result.file_name)
        if save_txt is not None:
            atomic_write_text(Path(save_txt) / Path(result.file_name).with_suffix(".txt"), result.to_yolo())
        yield result
