"""ONNX export of a detector (Conv+BN fused, decoding in the graph, dynamic batch) and running an exported file
with onnxruntime as a predict forward.

Two output layouts, for input `images` float32 (B, 3, S, S) RGB in [0, 1], letterboxed with grey 114, and
A anchors of strides 8, 16 and 32:

- "detector" (the default): `boxes_xyxy` float32 (B, A, 4) in input pixels and `scores` float32 (B, A, C) class
  probabilities. Metadata (ONNX metadata_props, strings): names, category_ids, strides (JSON lists), imgsz, stride.
- "yolov8": the one output `output0` float32 (B, 4 + C, A) that deployment tools parse for YOLOv8 and YOLO11
  detectors: rows 0-3 box centre x, centre y, width, height in input pixels, then the C class probabilities.
  Metadata as those tools read it: names "{0: 'person', 1: 'car'}", imgsz "[S, S]", stride, task "detect",
  batch, besides ours (category_ids, strides).

NMS is left to the caller in both (every runtime has its own). OnnxForward reads either layout, including files
Ultralytics exported (format=onnx, nms=False).

onnx and onnxruntime are an optional extra: pip install 'detector[export]'.
"""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detector.atomic import atomic_write_bytes, check_file_path
from detector.data.convert import category_ids_for
from detector.errors import DetectorError
from detector.model.postprocess import decode

ONNX_OPSET = 20  # the newest opset torch's TorchScript exporter writes (the dynamo one needs onnxscript)
INPUT = "images"
OUTPUTS = {"detector": ("boxes_xyxy", "scores"), "yolov8": ("output0",)}
LAYOUTS = tuple(OUTPUTS)


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise DetectorError(f"ONNX needs the '{module}' package: pip install 'detector[export]' "
                            "(or pip install onnx onnxruntime)") from err


class DecodedDetector(nn.Module):
    """The exported graph: float images (B, 3, S, S) in [0, 1] -> boxes_xyxy (B, A, 4), scores (B, A, C), or
    with layout "yolov8" one tensor (B, 4 + C, A): cx, cy, w, h in input pixels, then the class probabilities."""

    def __init__(self, model: nn.Module, layout: str = "detector"):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        boxes_xyxy, scores = decode(self.model(images), self.model.strides, self.model.reg_max)
        if self.layout == "detector":
            return boxes_xyxy, scores
        centres, sides = (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:]) / 2, boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]
        return (torch.cat([centres, sides, scores], dim=2).transpose(1, 2),)


def _metadata(layout: str, model: nn.Module, image_size: int, names: list[str], category_ids: list[int]
              ) -> dict[str, str]:
    """The file's metadata_props: ours, and in the yolov8 layout also the keys (and their Python-literal
    formats) that YOLOv8 deployment tools read."""
    ours = {"category_ids": json.dumps([int(c) for c in category_ids]), "stride": str(max(model.strides)),
            "strides": json.dumps(list(model.strides)), "producer": "detector", "layout": layout}
    if layout == "detector":
        return {**ours, "names": json.dumps(list(names)), "imgsz": str(image_size),
                "input": f"{INPUT}: float32 (batch, 3, {image_size}, {image_size}) RGB in [0, 1], letterboxed, "
                         "pad 114",
                "outputs": "boxes_xyxy: float32 (batch, anchors, 4) input pixels; scores: float32 "
                           "(batch, anchors, classes) probabilities; NMS not applied"}
    # batch: what a default export of theirs writes; this graph's batch axis is dynamic all the same.
    return {**ours, "names": repr(dict(enumerate(map(str, names)))), "imgsz": repr([image_size, image_size]),
            "task": "detect", "batch": "1", "channels": "3", "author": "detector",
            "description": f"detector model, YOLOv8 output layout: output0 float32 (batch, {4 + len(names)}, "
                           "anchors): cx, cy, w, h in input pixels, then class probabilities; NMS not applied"}


def export_onnx(model: nn.Module, path: str | Path, *, image_size: int, names: list[str], category_ids: list[int],
                opset: int = ONNX_OPSET, layout: str = "detector") -> Path:
    """Write `model` (fused copy, on CPU) as an ONNX file with a dynamic batch axis and its metadata.

    Args:
        model: a Detector (not changed).
        path: the .onnx file to write (atomically).
        image_size: side S of the square input (the anchors are fixed at export, so S is too).
        names, category_ids: class names and COCO category ids of the class indices.
        opset: ONNX opset version.
        layout: "detector" (boxes_xyxy and scores) or "yolov8" (output0 (B, 4 + C, A)); see the module docstring.

    Raises:
        DetectorError: onnx is not installed, `layout` is unknown, `path` is a folder (or lies inside a file), or
            the exported graph fails onnx's checker.
    """
    if layout not in OUTPUTS:
        raise DetectorError(f"invalid value layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
    onnx = _require("onnx")
    path = Path(path)
    check_file_path(path)  # before the export's work, not after it
    fused = DecodedDetector(model.fused_copy().cpu(), layout)
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2: a traced batch of 1 could be folded in
    dynamic = {name: {0: "batch"} for name in (INPUT, *OUTPUTS[layout])}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.export")
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo=True, which needs onnxscript;
            # this one has no extra dependency and handles this graph.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(fused, (example,), str(temp), dynamo=False, opset_version=opset, input_names=[INPUT],
                              output_names=list(OUTPUTS[layout]), dynamic_axes=dynamic)
        proto = onnx.load(str(temp))
    finally:
        temp.unlink(missing_ok=True)
    _fix_output_sizes(proto, fused, example)
    onnx.helper.set_model_props(proto, _metadata(layout, model, image_size, names, category_ids))
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise DetectorError(f"the exported ONNX graph is invalid: {err}") from err
    atomic_write_bytes(path, lambda file: file.write(proto.SerializeToString()))
    return path


def _fix_output_sizes(proto: Any, graph: nn.Module, example: torch.Tensor) -> None:
    """Write the outputs' sizes past the batch axis into `proto`: the exporter leaves them symbolic, and tools read
    the number of classes and anchors off them."""
    with torch.no_grad():
        shapes = [tuple(output.shape) for output in graph(example)]
    for output, shape in zip(proto.graph.output, shapes, strict=True):
        for dim, size in zip(output.type.tensor_type.shape.dim[1:], shape[1:], strict=True):
            dim.dim_value = size


def _read_names(text: str) -> list[str]:
    """Class names from metadata: a JSON list (ours) or a Python dict literal {0: 'a', 1: 'b'} (the YOLOv8
    layout's, and Ultralytics'), read without evaluating code."""
    try:
        names = json.loads(text)
    except ValueError:
        names = ast.literal_eval(text)  # literals only; raises ValueError or SyntaxError on anything else
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"class indices {sorted(names)[:5]}... are not 0..{len(names) - 1}")
        names = [names[index] for index in range(len(names))]
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"names {text[:60]!r} are neither a list nor a dict of strings")
    return names


def _read_image_size(text: str) -> int:
    """Side S of the square input from metadata: "640" (ours) or "[640, 640]" (the YOLOv8 layout's)."""
    size = ast.literal_eval(text)
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"the input is {' x '.join(map(str, size))}, and predict letterboxes to squares")
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(f"imgsz {text!r} is not a size")
    return size


class OnnxForward:
    """An exported .onnx file as a predict forward (uint8 (B, 3, S, S) RGB -> boxes_xyxy (B, A, 4), scores
    (B, A, C)), in either layout, with its metadata. A file whose batch axis is fixed (Ultralytics' default export)
    runs that many images at a time.

    Attributes:
        layout: "detector" or "yolov8", from the file's outputs.
        names, category_ids, image_size: read from the file's metadata (category_ids: COCO's when the file has
            none and the names are COCO's 80, else 1..C).
    """

    def __init__(self, path: str | Path, device: torch.device | None = None):
        path = Path(path)
        if not path.is_file():
            raise DetectorError(f"ONNX model {path} does not exist: check the path")
        self.session = _session(path, device)
        (model_input,) = self.session.get_inputs()
        self.input, self.outputs = model_input.name, [output.name for output in self.session.get_outputs()]
        self.dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        self.batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
        self.layout = _layout(path, self.outputs)
        self.names, self.category_ids, self.image_size = _read_metadata(
            path, self.session.get_modelmeta().custom_metadata_map)
        if self.layout == "yolov8":
            rows = self.session.get_outputs()[0].shape[1]
            if isinstance(rows, int) and rows != 4 + len(self.names):
                raise DetectorError(f"{path}'s output {self.outputs[0]} has {rows} rows, not 4 + {len(self.names)} "
                                    "classes: predict reads detection models (box, then class scores)")

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = images.numpy().astype(np.float32) / np.float32(255)  # as engine.prepare_images does
        outputs = [torch.from_numpy(output).float() for output in self._run(inputs)]
        if self.layout == "detector":
            return outputs[0], outputs[1]
        rows = outputs[0].transpose(1, 2)  # (B, A, 4 + C): cx, cy, w, h, class probabilities
        centres, sides = rows[..., :2], rows[..., 2:4]
        return torch.cat([centres - sides / 2, centres + sides / 2], dim=2), rows[..., 4:]

    def _run(self, inputs: np.ndarray) -> list[np.ndarray]:
        if self.batch is None:
            return self.session.run(self.outputs, {self.input: inputs.astype(self.dtype)})
        parts = []
        for start in range(0, len(inputs), self.batch):
            chunk = inputs[start:start + self.batch]
            padded = np.zeros((self.batch, *inputs.shape[1:]), self.dtype)  # the last chunk may be short
            padded[:len(chunk)] = chunk
            parts.append([output[:len(chunk)] for output in self.session.run(self.outputs, {self.input: padded})])
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]


def _session(path: Path, device: torch.device | None) -> Any:
    ort = _require("onnxruntime")
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
    return ort.InferenceSession(str(path), options, providers=providers)


def _layout(path: Path, outputs: list[str]) -> str:
    if tuple(outputs) == OUTPUTS["detector"]:
        return "detector"
    if len(outputs) == 1:
        return "yolov8"
    raise DetectorError(f"{path} has the outputs {', '.join(outputs)}: predict reads boxes_xyxy and scores (this "
                        "package's layout) or one output (batch, 4 + classes, anchors) (the YOLOv8 layout)")


def _read_metadata(path: Path, metadata: dict[str, str]) -> tuple[list[str], list[int], int]:
    """(names, category_ids, image_size) of an exported file."""
    task = metadata.get("task", "detect")
    if task != "detect":
        raise DetectorError(f"{path} is a {task} model: predict reads detection models (task detect)")
    try:
        names = _read_names(metadata["names"])
        image_size = _read_image_size(metadata["imgsz"])
        category_ids = ([int(c) for c in json.loads(metadata["category_ids"])] if "category_ids" in metadata
                        else category_ids_for(names))
    except KeyError as err:
        raise DetectorError(f"{path} has no {err.args[0]} in its metadata: export it with this package "
                            "(or Ultralytics, format=onnx)") from err
    except (ValueError, SyntaxError) as err:
        raise DetectorError(f"{path}'s metadata cannot be read: {err}") from err
    if len(category_ids) != len(names):
        raise DetectorError(f"{path}'s metadata has {len(category_ids)} category_ids for {len(names)} names")
    return names, category_ids, image_size
