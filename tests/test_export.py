"""ONNX export: dynamic batch, metadata, and onnxruntime predictions equal to PyTorch's on coco8's val images."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from detector import Model
from detector.data.augment import letterbox
from detector.errors import ConfigError, DetectorError
from detector.inference.export import OnnxForward
from detector.inference.predict import TorchForward, predict
from detector.inference.sources import open_source
from tests.conftest import REPO

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


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
