"""ONNX export of a detector (Conv+BN fused, decoding in the graph, dynamic batch) and running the exported
file with onnxruntime as a predict forward.

The graph: `images` float32 (B, 3, S, S) RGB in [0, 1], letterboxed with grey 114 ->
`boxes_xyxy` float32 (B, A, 4) in input pixels and `scores` float32 (B, A, C) class probabilities, for
A anchors of strides 8, 16 and 32. NMS is left to the caller (every runtime has its own). The file's
metadata (ONNX metadata_props, strings) holds names, category_ids (JSON lists), imgsz, stride and strides.

onnx and onnxruntime are an optional extra: pip install 'detector[export]'.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detector.atomic import atomic_write_bytes, check_file_path
from detector.errors import DetectorError
from detector.model.postprocess import decode

ONNX_OPSET = 20  # the newest opset torch's TorchScript exporter writes (the dynamo one needs onnxscript)
INPUT, OUTPUTS = "images", ("boxes_xyxy", "scores")


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise DetectorError(f"ONNX needs the '{module}' package: pip install 'detector[export]' "
                            "(or pip install onnx onnxruntime)") from err


class DecodedDetector(nn.Module):
    """The exported graph: float images (B, 3, S, S) in [0, 1] -> boxes_xyxy (B, A, 4), scores (B, A, C)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decode(self.model(images), self.model.strides, self.model.reg_max)


def export_onnx(model: nn.Module, path: str | Path, *, image_size: int, names: list[str], category_ids: list[int],
                opset: int = ONNX_OPSET) -> Path:
    """Write `model` (fused copy, on CPU) as an ONNX file with a dynamic batch axis and its metadata.

    Args:
        model: a Detector (not changed).
        path: the .onnx file to write (atomically).
        image_size: side S of the square input (the anchors are fixed at export, so S is too).
        names, category_ids: class names and COCO category ids of the class indices.
        opset: ONNX opset version.

    Raises:
        DetectorError: onnx is not installed, `path` is a folder (or lies inside a file), or the exported
            graph fails onnx's checker.
    """
    onnx = _require("onnx")
    path = Path(path)
    check_file_path(path)  # before the export's work, not after it
    fused = DecodedDetector(model.fused_copy().cpu())
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2: a traced batch of 1 could be folded in
    dynamic = {name: {0: "batch"} for name in (INPUT, *OUTPUTS)}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.export")
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo=True, which needs onnxscript;
            # this one has no extra dependency and handles this graph.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(fused, (example,), str(temp), dynamo=False, opset_version=opset, input_names=[INPUT],
                              output_names=list(OUTPUTS), dynamic_axes=dynamic)
        proto = onnx.load(str(temp))
    finally:
        temp.unlink(missing_ok=True)
    metadata = {"names": json.dumps(list(names)), "category_ids": json.dumps([int(c) for c in category_ids]),
                "imgsz": str(image_size), "stride": str(max(model.strides)),
                "strides": json.dumps(list(model.strides)), "producer": "detector",
                "input": f"{INPUT}: float32 (batch, 3, {image_size}, {image_size}) RGB in [0, 1], letterboxed, "
                         "pad 114",
                "outputs": "boxes_xyxy: float32 (batch, anchors, 4) input pixels; scores: float32 "
                           "(batch, anchors, classes) probabilities; NMS not applied"}
    onnx.helper.set_model_props(proto, metadata)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise DetectorError(f"the exported ONNX graph is invalid: {err}") from err
    atomic_write_bytes(path, lambda file: file.write(proto.SerializeToString()))
    return path


class OnnxForward:
    """An exported .onnx file as a predict forward (uint8 (B, 3, S, S) RGB -> boxes, scores), with its metadata.

    Attributes:
        names, category_ids, image_size, strides: read from the file's metadata.
    """

    def __init__(self, path: str | Path, device: torch.device | None = None):
        ort = _require("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise DetectorError(f"ONNX model {path} does not exist: check the path")
        providers = ["CPUExecutionProvider"]
        if device is not None and device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DetectorError("device=cuda for an ONNX model needs onnxruntime-gpu (pip install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        # onnxruntime's threads otherwise spin for a while after each run, taking the cores from what runs
        # between two forwards (NMS, the reading thread): measured here on 2 cores, a PyTorch forward of one
        # 320 px image right after an onnxruntime run took 49-59 ms with spinning, 25-27 ms without, and
        # onnxruntime's own run the same 19-22 ms either way.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        metadata = self.session.get_modelmeta().custom_metadata_map
        try:
            self.names = list(json.loads(metadata["names"]))
            self.category_ids = [int(c) for c in json.loads(metadata["category_ids"])]
            self.image_size = int(metadata["imgsz"])
            self.strides = tuple(json.loads(metadata["strides"]))
        except (KeyError, ValueError) as err:
            raise DetectorError(f"{path} was not exported by this package: its metadata lacks {err}") from err

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = images.numpy().astype(np.float32) / np.float32(255)  # as engine.prepare_images does
        boxes, scores = self.session.run(list(OUTPUTS), {INPUT: inputs})
        return torch.from_numpy(boxes), torch.from_numpy(scores)
