"""ONNX export: dynamic batch, metadata, and onnxruntime predictions equal to PyTorch's on coco8's val images, in
this package's output layout and in YOLOv8's."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detector import Model
from detector.data.augment import letterbox
from detector.data.convert import COCO80_TO_91
from detector.errors import ConfigError, DetectorError
from detector.inference.export import OnnxForward
from detector.inference.predict import TorchForward, predict
from detector.inference.sources import open_source
from detector.model.postprocess import non_max_suppression
from tests.conftest import REPO

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
INTEROP = Path(__file__).resolve().parents[2] / "shared" / "interop"  # the peer's checkpoints and outputs


@pytest.fixture(scope="module")
def exported(coco8_checkpoint, tmp_path_factory):
    return Model(coco8_checkpoint).export(imgsz=160, file=tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_export_writes_a_dynamic_batch_graph_with_its_metadata(exported, coco8_checkpoint):
    proto = onnx.load(str(exported))
    metadata = {p.key: p.value for p in proto.metadata_props}
    model = Model(coco8_checkpoint)
    assert metadata["imgsz"] == "160" and metadata["stride"] == "32"
    assert OnnxForward(exported).names == model.names and len(model.names) == 80
    assert OnnxForward(exported).category_ids[-1] == 90  # COCO's own ids, with gaps
    batch_axis = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param == "batch" and not batch_axis.HasField("dim_value")
    assert not any(node.op_type == "BatchNormalization" for node in proto.graph.node)  # fused into the convs


def test_onnxruntime_matches_pytorch_on_coco8_val(exported, coco8_checkpoint, datasets_dir):
    val = datasets_dir / "coco8" / "images" / "val"
    model = Model(coco8_checkpoint)
    # Every anchor's decoded box and score on the letterboxed images, against the unfused PyTorch model, at
    # two batch sizes (the batch axis is dynamic: the graph was traced at 2).
    letterboxed = [letterbox(f.image[..., ::-1], np.zeros((0, 4), np.float32), 160)[0] for f in open_source(val)]
    images = torch.from_numpy(np.stack(letterboxed).transpose(0, 3, 1, 2))
    torch_boxes, torch_scores = TorchForward(model.detector, torch.device("cpu"))(images)
    runtime = OnnxForward(exported)
    for batch in (images, images[:1]):
        boxes, scores = runtime(batch)
        assert boxes.shape == (len(batch), 525, 4) and scores.shape == (len(batch), 525, 80)
        assert (boxes - torch_boxes[:len(batch)]).abs().max() < 1e-3  # input pixels
        assert (scores - torch_scores[:len(batch)]).abs().max() < 1e-5
    # Whole predictions, through letterbox, NMS and back to original pixels. The ONNX input is fixed at S x S, so
    # the PyTorch side takes squares too (Model.predict letterboxes .pt models to each frame's rectangle).
    expected = list(predict(TorchForward(model.detector.fused_copy(), torch.device("cpu")), val, names=model.names,
                            category_ids=model.checkpoint["category_ids"], image_size=160, batch=4, conf=0.45,
                            rect=False))
    found = Model(exported).predict(val, batch=3, conf=0.45)
    assert sum(len(r.scores) for r in expected) > 20
    for a, b in zip(expected, found, strict=True):
        assert a.path == b.path and len(a.scores) == len(b.scores)
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_allclose(a.boxes_xyxy, b.boxes_xyxy, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_an_onnx_model_predicts_only_and_says_so(exported, coco8_checkpoint):
    onnx_model = Model(exported)
    with pytest.raises(DetectorError, match="it can predict, not val"):
        onnx_model.val()
    with pytest.raises(ConfigError, match="give batch=N"):
        onnx_model.predict(np.zeros((32, 32, 3), np.uint8), batch=-1)
    with pytest.raises(ConfigError, match="exported at imgsz=160"):
        onnx_model.predict(np.zeros((32, 32, 3), np.uint8), imgsz=320)
    with pytest.raises(ConfigError, match="format='tflite'"):
        Model(coco8_checkpoint).export(format="tflite")
    with pytest.raises(ConfigError, match="^invalid value layout='yolov5': expected detector or yolov8$"):
        Model(coco8_checkpoint).export(layout="yolov5")


def test_export_to_a_folder_or_inside_a_file_names_the_path_before_exporting(coco8_checkpoint, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: pytest.fail("exported before the check"))
    folder = tmp_path / "tiny.onnx"
    folder.mkdir()
    with pytest.raises(DetectorError, match=f"^cannot write {re.escape(str(folder))}: it is a folder; "):
        Model(coco8_checkpoint).export(file=folder)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    with pytest.raises(DetectorError, match=f"^cannot write .*: {re.escape(str(notes))} is a file, not a folder"):
        Model(coco8_checkpoint).export(file=notes / "tiny.onnx")


def run_cli(*args):
    """The `detector` console script of this checkout."""
    command = "import sys; from detector.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", command, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_cli_exports_then_predicts_with_the_onnx_file(coco8_checkpoint, datasets_dir, tmp_path):
    out = tmp_path / "cli.onnx"
    result = run_cli("export", f"model={coco8_checkpoint}", "imgsz=96", f"file={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.key: p.value for p in onnx.load(str(out)).metadata_props}["imgsz"] == "96"
    val = datasets_dir / "coco8" / "images" / "val"
    result = run_cli("predict", f"model={out}", f"source={val}", "batch=2", "max_wait_ms=20", "conf=0.45")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.split(":")[0].rsplit("/", 1)[-1] for line in result.stderr.splitlines() if ".jpg:" in line] == sorted(
        p.name for p in val.glob("*.jpg"))
    bad = run_cli("predict", f"model={out}", f"source={val}", "max_wait_ms=soon")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: invalid value max_wait_ms='soon': expected " \
                                                         "milliseconds, e.g. 50"


@pytest.fixture(scope="module")
def exported_yolov8(coco8_checkpoint, tmp_path_factory):
    return Model(coco8_checkpoint).export(imgsz=160, file=tmp_path_factory.mktemp("onnx") / "v8.onnx", layout="yolov8")


def test_the_yolov8_layout_has_one_output_and_the_metadata_deployment_tools_read(exported_yolov8, coco8_checkpoint):
    proto = onnx.load(str(exported_yolov8))
    metadata = {p.key: p.value for p in proto.metadata_props}
    names = Model(coco8_checkpoint).names
    assert metadata["names"].startswith("{0: 'person', 1: 'bicycle', ")  # a Python dict literal, as they parse it
    assert ast.literal_eval(metadata["names"]) == dict(enumerate(names))
    assert {key: metadata[key] for key in ("imgsz", "stride", "task", "batch")} == {
        "imgsz": "[160, 160]", "stride": "32", "task": "detect", "batch": "1"}
    [output] = proto.graph.output
    # 4 box rows + 80 classes, for 20x20 + 10x10 + 5x5 anchors; the batch axis stays dynamic.
    assert (output.name, [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]) == (
        "output0", ["batch", 84, 525])


def _letterboxed(folder: Path, size: int) -> np.ndarray:
    """float32 (B, 3, S, S) RGB in [0, 1], as both layouts take them."""
    images = [letterbox(f.image[..., ::-1], np.zeros((0, 4), np.float32), size)[0] for f in open_source(folder)]
    return np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255


def test_both_layouts_give_the_same_detections(exported, exported_yolov8, datasets_dir):
    val = datasets_dir / "coco8" / "images" / "val"
    images = _letterboxed(val, 160)
    boxes_xyxy, scores = ort.InferenceSession(str(exported)).run(None, {"images": images})
    (rows,) = ort.InferenceSession(str(exported_yolov8)).run(None, {"images": images})  # (B, 4 + C, A)
    centres, sides = rows[:, :2].transpose(0, 2, 1), rows[:, 2:4].transpose(0, 2, 1)  # (B, A, 2) each
    v8_boxes_xyxy = np.concatenate([centres - sides / 2, centres + sides / 2], axis=2)
    ours = non_max_suppression(torch.from_numpy(boxes_xyxy), torch.from_numpy(scores), conf=0.45)
    theirs = non_max_suppression(torch.from_numpy(v8_boxes_xyxy), torch.from_numpy(rows[:, 4:].transpose(0, 2, 1)),
                                 conf=0.45)
    assert sum(len(found.scores) for found in ours) > 20
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.classes, b.classes, rtol=0, atol=0)
        torch.testing.assert_close(a.boxes_xyxy, b.boxes_xyxy, rtol=0, atol=1e-3)  # input pixels
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    # predict reads either layout, from the file's outputs and metadata.
    expected, found = Model(exported).predict(val, conf=0.45), Model(exported_yolov8).predict(val, batch=3, conf=0.45)
    assert [r.labels for r in expected] == [r.labels for r in found]
    for a, b in zip(expected, found, strict=True):
        np.testing.assert_allclose(a.boxes_xyxy, b.boxes_xyxy, atol=1e-3)
        assert a.category_ids == b.category_ids == COCO80_TO_91


def _rewrite(source: Path, out: Path, metadata: dict[str, str], batch: int | None = None) -> Path:
    """A copy of an exported file with other metadata, and its batch axis fixed at `batch`."""
    proto = onnx.load(str(source))
    onnx.helper.set_model_props(proto, metadata)
    for value in (*proto.graph.input, *proto.graph.output) if batch else ():
        value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(proto, str(out))
    return out


def test_predict_reads_a_yolov8_file_as_ultralytics_writes_it(exported, exported_yolov8, datasets_dir, tmp_path):
    # Their metadata only (no category_ids), and a batch axis fixed at 1, their export's default.
    names = ast.literal_eval({p.key: p.value for p in onnx.load(str(exported_yolov8)).metadata_props}["names"])
    theirs = _rewrite(exported_yolov8, tmp_path / "yolov8n.onnx", {
        "description": "Ultralytics YOLOv8n model", "author": "Ultralytics", "stride": "32", "task": "detect",
        "batch": "1", "imgsz": "[160, 160]", "names": str(names), "args": "{'batch': 1, 'nms': False}"}, batch=1)
    runtime = OnnxForward(theirs)
    assert (runtime.layout, runtime.batch, runtime.image_size) == ("yolov8", 1, 160)
    assert runtime.category_ids == COCO80_TO_91  # COCO's 80 names: COCO's ids
    val = datasets_dir / "coco8" / "images" / "val"
    expected, found = Model(exported).predict(val, conf=0.45), Model(theirs).predict(val, batch=3, conf=0.45)
    assert sum(len(r.scores) for r in expected) > 20  # batches of 3 run one image at a time, the last one padded
    for a, b in zip(expected, found, strict=True):
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_allclose(a.boxes_xyxy, b.boxes_xyxy, atol=1e-3)


@pytest.mark.parametrize(("change", "message"), [
    ({"task": "segment"}, "is a segment model: predict reads detection models"),
    ({"imgsz": "[160, 192]"}, "metadata cannot be read: the input is 160 x 192, and predict letterboxes to squares"),
    ({"names": "__import__('os')"}, "metadata cannot be read"),
    ({"names": None}, "has no names in its metadata"),
])
def test_a_yolov8_file_predict_cannot_read_is_named(exported_yolov8, tmp_path, change, message):
    metadata = {p.key: p.value for p in onnx.load(str(exported_yolov8)).metadata_props}
    metadata = {key: value for key, value in {**metadata, **change}.items() if value is not None}
    path = _rewrite(exported_yolov8, tmp_path / "other.onnx", metadata)
    with pytest.raises(DetectorError, match=f"^{re.escape(str(path))}.*{re.escape(message)}"):
        OnnxForward(path)


@pytest.mark.skipif(not INTEROP.is_dir(), reason=f"the peer's reference checkpoints are not at {INTEROP}")
@pytest.mark.parametrize("name", ["yolov8n", "yolo11n"])
def test_the_yolov8_layout_is_what_the_peer_computes_for_its_own_checkpoint(tmp_path, name):
    path = Model(str(INTEROP / f"{name}-shapes.pt")).export(imgsz=256, file=tmp_path / "v8.onnx", layout="yolov8")
    (rows,) = ort.InferenceSession(str(path)).run(None, {"images": np.load(INTEROP / "input.npy")})
    expected = np.load(INTEROP / f"{name}-decoded.npy")  # the peer's eval output: cx, cy, w, h, probabilities
    assert rows.shape == expected.shape == (2, 8, 1344)
    np.testing.assert_allclose(rows[:, :4], expected[:, :4], rtol=0, atol=1e-3)  # input pixels
    np.testing.assert_allclose(rows[:, 4:], expected[:, 4:], rtol=0, atol=1e-5)
