"""Ultralytics ("the peer") detection checkpoints: loaded without its code, mapped by structure, same outputs.

The reference files (checkpoints written by Ultralytics 8.4.190 and its own outputs on a fixed input) are read from
../shared/interop (see its README.md); they are never copied into the project.
"""

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.errors import DetectorError
from detector.model.network import Detector, load_scale
from detector.model.peer import RestrictedUnpickler, map_state_dict, module_tensors, read_peer_checkpoint
from detector.model.postprocess import decode
from detector.train.checkpoint import load_checkpoint
from tests.conftest import make_tiny_setup

INTEROP = Path(__file__).resolve().parents[2] / "shared" / "interop"
needs_interop = pytest.mark.skipif(not INTEROP.is_dir(),
                                   reason=f"the peer's reference checkpoints are not at {INTEROP}")


def peer_outputs(model: Detector, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our outputs in the layout of the peer's .npy files: anchors last, levels in stride order, row-major."""
    with torch.no_grad():
        outputs = model.eval()(images)
    flat = torch.cat([o.flatten(2) for o in outputs], dim=2)  # (B, 4 * reg_max + C, A)
    boxes_xyxy, scores = decode(outputs, model.strides, model.reg_max)
    centres, sizes = (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:]) / 2, boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]
    return {"raw-boxes": flat[:, :4 * model.reg_max], "raw-scores": flat[:, 4 * model.reg_max:],
            "decoded-boxes": torch.cat([centres, sizes], dim=-1).transpose(1, 2),
            "decoded-scores": scores.transpose(1, 2)}


@needs_interop
@pytest.mark.parametrize("name", ["yolov8n", "yolo11n"])
def test_peer_checkpoint_gives_the_peers_outputs(name):
    checkpoint = load_checkpoint(INTEROP / f"{name}-shapes.pt")  # through the refusal of weights_only=True
    assert "ultralytics" not in sys.modules
    assert checkpoint["names"] == ["circle", "rectangle", "triangle", "star"] and checkpoint["config"]["imgsz"] == 256
    assert checkpoint["model_args"].get("family", "yolov8") == {"yolov8n": "yolov8", "yolo11n": "yolo11"}[name]
    assert all(v.dtype in (torch.float32, torch.int64) for v in checkpoint["model"].values())  # float16 in the file
    model = Detector(**checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])  # strict: every tensor of ours is mapped
    parameters = json.loads((INTEROP / "peer_reference.json").read_text())["models"][name]["parameters"]
    assert sum(p.numel() for p in model.parameters()) == parameters - 16  # less the DFL's fixed 0..15 projection
    ours = peer_outputs(model, torch.from_numpy(np.load(INTEROP / "input.npy")))
    decoded = torch.from_numpy(np.load(INTEROP / f"{name}-decoded.npy"))
    for key, peer in (("raw-boxes", np.load(INTEROP / f"{name}-raw-boxes.npy")),
                      ("raw-scores", np.load(INTEROP / f"{name}-raw-scores.npy")), ("decoded-scores", decoded[:, 4:])):
        torch.testing.assert_close(ours[key], torch.as_tensor(peer), rtol=0, atol=1e-4, msg=key)
    # Box centres and sizes reach 510 px, where float32 steps by 3e-5: the peer's float32 decode and ours (xyxy,
    # then centre and size) each round a few such steps away from the exact decode of the same logits.
    torch.testing.assert_close(ours["decoded-boxes"], decoded[:, :4], rtol=1e-6, atol=1e-4)


@needs_interop
def test_yolo11_exports_to_onnx_with_a_dynamic_batch(tmp_path):
    """The attention block reshapes by the input's batch and size: the exported graph must keep them dynamic."""
    pytest.importorskip("onnxruntime")
    from detector.api import Model
    from detector.inference.export import OnnxForward

    model = Model(str(INTEROP / "yolo11n-shapes.pt"))
    path = model.export(file=tmp_path / "yolo11n.onnx", imgsz=256)
    images = (torch.from_numpy(np.load(INTEROP / "input.npy")) * 255).round().to(torch.uint8)
    images = torch.cat([images, images[:1]])  # batch 3, traced at 2
    boxes_xyxy, scores = OnnxForward(path)(images)
    with torch.no_grad():
        expected_boxes, expected_scores = decode(model.detector(images.float() / 255), (8, 16, 32), 16)
    torch.testing.assert_close(boxes_xyxy, expected_boxes, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("scale", "parameters"), [
    ("n", 3_157_200), ("s", 11_166_560), ("m", 25_902_640), ("l", 43_691_520), ("x", 68_229_648),
    ("yolo11n", 2_624_080), ("yolo11s", 9_458_752), ("yolo11m", 20_114_688), ("yolo11l", 25_372_160),
    ("yolo11x", 56_966_176)])
def test_every_scale_has_the_published_parameter_count(scale, parameters):
    """The published counts of yolov8n..x and yolo11n..x at 80 classes, which include the DFL's 16 fixed weights."""
    with torch.device("meta"):
        model = Detector(num_classes=80, **load_scale(scale))
    assert sum(p.numel() for p in model.parameters()) + 16 == parameters


def test_yolo11_freeze_10_leaves_c2psa_training():
    """YOLO11's layers 0-9 end at SPPF, its 10th is C2PSA: freeze=10 stops the first ten, as Ultralytics does."""
    model = Detector(num_classes=3, **load_scale("yolo11n"))
    model.freeze(10)
    backbone = model.blocks()[:11]
    assert type(backbone[9]).__name__ == "SPPF" and type(backbone[10]).__name__ == "C2PSA"
    assert not any(p.requires_grad for block in backbone[:10] for p in block.parameters())
    assert all(p.requires_grad for p in backbone[10].parameters())


@pytest.fixture
def fake_ultralytics(monkeypatch):
    """A function making torch.nn.Module classes that pickle as ultralytics.nn.tasks.<name> (the package itself is
    not installed, and these stand-ins are gone once the file is written)."""
    tasks = types.ModuleType("ultralytics.nn.tasks")
    for name in ("ultralytics", "ultralytics.nn"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "ultralytics.nn.tasks", tasks)

    def make(name: str) -> type:
        cls = type(name, (torch.nn.Module,), {"__module__": "ultralytics.nn.tasks"})
        setattr(tasks, name, cls)
        return cls

    return make


@needs_interop
@pytest.mark.parametrize(("head", "message"), [
    ("Segment", r"is a segmentation model \(head Segment\): only detection models \(head Detect\) map"),
    ("Pose", r"is a pose model \(head Pose\)"),
    ("C3", r"its architecture \(yolov8n.yaml: Conv, Conv, C3, .*\) is neither YOLOv8's nor YOLO11's")])
def test_other_tasks_and_architectures_fail_in_one_line(tmp_path, fake_ultralytics, head, message):
    real = read_peer_checkpoint(INTEROP / "yolov8n-shapes.pt")["model"].state
    spec = json.loads(json.dumps(real["yaml"]))
    if head == "C3":  # a YOLOv5u-like backbone
        spec["backbone"][2][2] = "C3"
    else:
        spec["head"][-1][2] = head
    model = fake_ultralytics("SegmentationModel")()
    model.yaml, model.names = spec, real["names"]
    torch.save({"model": model, "ema": None}, tmp_path / "other.pt")
    with pytest.raises(DetectorError, match=r"other.pt is an Ultralytics checkpoint this package cannot map: .*"
                                            + message) as info:
        load_checkpoint(tmp_path / "other.pt")
    assert "\n" not in str(info.value)


@needs_interop
def test_every_tensor_is_checked_by_count_and_shape():
    model = read_peer_checkpoint(INTEROP / "yolov8n-shapes.pt")["model"]
    tensors = list(module_tensors(model))
    args = {"num_classes": 4, **load_scale("n")}
    assert len(map_state_dict(tensors, args)) == len(tensors) - 1  # all but the DFL projection
    extra = [(f"model.22.cv4.{i}.weight", torch.zeros(32, 64, 3, 3)) for i in range(3)]  # e.g. a mask branch
    with pytest.raises(DetectorError, match=r"it holds 357 tensors where a yolov8 n detector of 4 classes has 354"):
        map_state_dict(tensors[:-1] + extra, args)
    with pytest.raises(DetectorError, match=r"its model.0.conv.weight \(16, 3, 3, 3\) does not fit "
                                            r"backbone.stem.0.conv.weight \(32, 3, 3, 3\) of a yolov8 s detector"):
        map_state_dict(tensors, {**args, **load_scale("s")})


def test_a_global_outside_the_checkpoint_vocabulary_is_refused_and_never_run(tmp_path, fake_ultralytics):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": fake_ultralytics("DetectionModel")(), "payload": Payload()}, tmp_path / "hostile.pt")
    with pytest.raises(DetectorError, match=r"^checkpoint \S+hostile.pt was refused: it names posix.system, which no "
                                            r"detection checkpoint holds; nothing from it was run$"):
        load_checkpoint(tmp_path / "hostile.pt")
    assert not marker.exists()
    import io
    import pickle

    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(eval))).load()


@needs_interop
def test_fine_tuning_a_peer_checkpoint_on_other_classes(tmp_path):
    """4 classes in the checkpoint, 3 in the data: every tensor but the class outputs starts as the peer's, the
    names come from the data, and freeze=10 holds YOLOv8's backbone (layers 0-9) still."""
    from detector.train.trainer import Trainer

    paths = make_tiny_setup(tmp_path / "data", seed=3, num_train=8, num_val=4, image_size=64)
    for split in ("train", "val"):  # drop the star class: a 3-class dataset
        path = tmp_path / "data" / "shapes" / "annotations" / f"instances_{split}.json"
        coco = json.loads(path.read_text())
        star = next(c["id"] for c in coco["categories"] if c["name"] == "star")
        coco["categories"] = [c for c in coco["categories"] if c["id"] != star]
        coco["annotations"] = [a for a in coco["annotations"] if a["category_id"] != star]
        path.write_text(json.dumps(coco))
    weights = INTEROP / "yolov8n-shapes.pt"
    trainer = Trainer({**paths, "model": str(weights), "imgsz": 64, "batch": 4, "epochs": 1, "workers": 0,
                       "freeze": 10, "project": str(tmp_path), "name": "run", "plots": False, "mosaic": 0.0},
                      progress=False)
    peer = load_checkpoint(weights)["model"]
    start = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    fresh = {k for k in start if start[k].shape != peer[k].shape}
    assert fresh == {f"head.cls.{level}.2.{name}" for level in range(3) for name in ("weight", "bias")}
    assert all(torch.equal(start[k], peer[k]) for k in start if k not in fresh)
    assert trainer.names == ["circle", "rectangle", "triangle"]
    trainer.fit()
    last = load_checkpoint(tmp_path / "run" / "weights" / "last.pt")
    assert last["names"] == ["circle", "rectangle", "triangle"] and last["model_args"]["num_classes"] == 3
    trained = last["raw_model"]
    frozen = [k for k in trained if k.startswith("backbone.") and not k.endswith(("running_mean", "running_var",
                                                                                   "num_batches_tracked"))]
    assert frozen and all(torch.equal(trained[k].cpu(), peer[k]) for k in frozen)
    assert not torch.equal(trained["neck.bottom_up5.fuse.conv.weight"].cpu(), peer["neck.bottom_up5.fuse.conv.weight"])
