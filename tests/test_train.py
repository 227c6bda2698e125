"""End-to-end training on tiny generated shapes: learning, resume, API/CLI parity, checkpoint round trip."""

import collections
import csv
import json
import logging.handlers
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torchvision.ops import box_iou

from detector import Model
from detector.data.coco import CocoDataset
from detector.errors import ConfigError
from detector.train.checkpoint import load_checkpoint
from detector.train.trainer import Trainer, train
from tests.conftest import REPO, make_tiny_setup


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A 16-image shapes set whose val split is its train split, and a very small model scale."""
    return make_tiny_setup(tmp_path_factory.mktemp("data"), seed=3, num_train=16, num_val=4, image_size=128,
                           val_is_train=True)


def settings(tiny_setup, tmp_path, **extra):
    base = dict(tiny_setup, imgsz=128, batch=8, workers=0, project=str(tmp_path), name="run", plots=False,
                mosaic=0.0, close_mosaic=0, warmup_epochs=0.5, nbs=8)
    return {**base, **extra}


def test_tiny_model_overfits_a_handful_of_images(tiny_setup, tmp_path):
    # 16 images in batches of 4 for 100 epochs: 400 optimizer steps; far fewer and BatchNorm's running
    # statistics (momentum 0.03) have not settled, so eval-mode scores lag the training-mode ones.
    metrics = train(settings(tiny_setup, tmp_path, epochs=100, batch=4, nbs=4, lr0=0.006, optimizer="AdamW", val=False,
                             fliplr=0.0, scale=0.0, translate=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "results.csv")))
    losses = [float(r["train/loss_cls"]) + float(r["train/loss_box"]) for r in rows]
    assert losses[-1] < 0.5 * losses[0]
    assert metrics["metrics/mAP50"] >= 0.8
    # Without per-epoch validation, the only validated epoch (the last) is the best one.
    assert load_checkpoint(tmp_path / "run" / "weights" / "best.pt")["epoch"] == 100


def final_weights(run_dir):
    return load_checkpoint(run_dir / "weights" / "last.pt")["raw_model"]


def test_resume_after_an_interruption_gives_the_same_weights(tiny_setup, tmp_path, monkeypatch):
    args = settings(tiny_setup, tmp_path, epochs=3, val=False, save_period=2)
    train({**args, "name": "straight"}, progress=False)
    kept = sorted(p.name for p in (tmp_path / "straight" / "weights").glob("epoch*.pt"))
    assert kept == ["epoch2.pt"] and load_checkpoint(tmp_path / "straight" / "weights" / "epoch2.pt")["epoch"] == 2

    original_save = Trainer._save

    def save_then_die(self, epoch, improved):
        original_save(self, epoch, improved)
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train({**args, "name": "broken"}, progress=False)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "broken" / "weights" / "last.pt")["epoch"] == 1
    train({"resume": True, "project": str(tmp_path), "name": "broken"}, progress=False)

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")
    for key, value in straight.items():
        assert torch.allclose(value.float(), resumed[key].float(), atol=1e-6), key
    rows = list(csv.DictReader(open(tmp_path / "broken" / "results.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]

    # The finished run: resuming it is refused, from best.pt too; epochs=4 trains it one epoch longer.
    last = tmp_path / "straight" / "weights" / "last.pt"
    with pytest.raises(ConfigError, match="already finished its 3 epochs: give epochs=N with N > 3"):
        train({"resume": True, "project": str(tmp_path), "name": "straight"}, progress=False)
    with pytest.raises(ConfigError, match="best.pt holds no training state"):
        train({"resume": str(last.with_name("best.pt"))}, progress=False)
    warnings = logging.handlers.BufferingHandler(10)
    logging.getLogger("detector.train.resume").addHandler(warnings)
    try:
        Model(str(last)).train(resume=True, epochs=4, imgsz=160, batch=8.0)
    finally:
        logging.getLogger("detector.train.resume").removeHandler(warnings)
    assert [r.getMessage() for r in warnings.buffer] == [
        "resume continues the run as it was configured; ignored imgsz=160 (only device, workers, threads, epochs, "
        "save_period, tensorboard can change)"]  # not batch=8.0: the value it had, spelled differently
    assert load_checkpoint(last)["epoch"] == 4 and load_checkpoint(last)["config"]["imgsz"] == 128


def test_api_and_cli_give_the_same_result_and_best_pt_reproduces_the_metrics(tiny_setup, tmp_path):
    args = settings(tiny_setup, tmp_path, epochs=2)
    model = Model(args.pop("model"))
    api_metrics = model.train(**{**args, "name": "api", "plots": True})
    cli_args = [f"{k}={v}" for k, v in {**args, "model": tiny_setup["model"], "name": "cli"}.items()]
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *cli_args], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    api_rows = list(csv.DictReader(open(tmp_path / "api" / "results.csv")))
    cli_rows = list(csv.DictReader(open(tmp_path / "cli" / "results.csv")))
    for key in ("train/loss_box", "train/loss_cls", "metrics/mAP50-95"):
        assert [r[key] for r in api_rows] == [r[key] for r in cli_rows]

    best = tmp_path / "api" / "weights" / "best.pt"
    state = torch.load(best, weights_only=True)
    assert "optimizer" not in state and state["names"] == ["circle", "rectangle", "triangle", "star"]
    again = Model(str(best)).val(data=args["data"], workers=0)
    assert again["metrics/mAP50-95"] == pytest.approx(api_metrics["metrics/mAP50-95"], abs=1e-6)
    for name in ("args.yaml", "results.csv", "weights/last.pt", "weights/best.pt", "train.log", "results.png",
                 "labels.png", "train_batch0.jpg", "PR_curve.png", "confusion_matrix.png", "val_batch0_labels.jpg",
                 "val_batch0_pred.jpg"):
        assert (tmp_path / "api" / name).is_file(), name
    assert not (tmp_path / "cli" / "PR_curve.png").exists()  # plots=false
    # The final validation's per-class table: in metrics.json and the log, one row per class with ground truth.
    saved = json.loads((tmp_path / "api" / "metrics.json").read_text())
    per_class = saved["per_class"]
    annotations = json.loads((Path(args["data"]).parent / "shapes/annotations/instances_train.json").read_text())
    assert sum(row["instances"] for row in per_class.values()) == len(annotations["annotations"])
    assert set(per_class) == {"circle", "rectangle", "triangle", "star"}
    assert np.mean([row["map50_95"] for row in per_class.values()]) == pytest.approx(saved["metrics/mAP50-95"])
    # Its confusion matrix, by true class: each class's objects, whatever they were detected as or missed.
    assert {name: sum(row.values()) for name, row in saved["confusion_matrix"].items() if name in per_class} == {
        name: row["instances"] for name, row in per_class.items()}
    log = (tmp_path / "api" / "train.log").read_text()
    assert all(f"INFO detector.evaluate.validate: {name} " in log for name in per_class)


def test_single_cls_trains_one_class_and_val_scores_it_the_same_way(tiny_setup, tmp_path):
    # 15 epochs without augmentation: enough to score above zero (mAP50-95 0.015), so the comparison below can fail.
    args = settings(tiny_setup, tmp_path, epochs=15, batch=4, nbs=4, lr0=0.006, optimizer="AdamW", val=False,
                    fliplr=0.0, scale=0.0, translate=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, single_cls=True)
    metrics = train(args, progress=False)
    assert metrics["metrics/mAP50-95"] > 0.005
    best = tmp_path / "run" / "weights" / "best.pt"
    state = load_checkpoint(best)
    assert state["names"] == ["object"] and state["category_ids"] == [1]
    assert state["model"]["head.cls.0.2.weight"].shape[0] == 1  # one class logit per anchor
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    annotations = json.loads((Path(args["data"]).parent / "shapes/annotations/instances_train.json").read_text())
    assert list(saved["per_class"]) == ["object"]
    assert saved["per_class"]["object"]["instances"] == len(annotations["annotations"])
    # single_cls comes with the checkpoint. Training validates in bf16 on this CPU, val in float32: close, not equal.
    again = Model(str(best)).val(data=args["data"], workers=0)
    assert again["metrics/mAP50-95"] == pytest.approx(metrics["metrics/mAP50-95"], rel=0.05)


def test_classes_trains_and_scores_only_those_classes(tiny_setup, tmp_path):
    with pytest.raises(ConfigError, match=r"^invalid value classes='hexagon': 'hexagon' is not one of the 4 classes "
                                          r"\(0 circle, 1 rectangle, 2 triangle, 3 star\); give indices 0-3 or names$"):
        train(settings(tiny_setup, tmp_path, epochs=1, classes="hexagon"), progress=False)
    assert not (tmp_path / "run").exists()
    train(settings(tiny_setup, tmp_path, epochs=1, classes="circle,2"), progress=False)
    run = tmp_path / "run"
    assert yaml.safe_load((run / "args.yaml").read_text())["classes"] == "circle,2"
    assert load_checkpoint(run / "weights" / "best.pt")["names"] == ["circle", "rectangle", "triangle", "star"]
    card = yaml.safe_load(Path(tiny_setup["data"]).read_text())
    annotations = json.loads((Path(card["path"]) / card["val_json"]).read_text())
    per_category = collections.Counter(a["category_id"] for a in annotations["annotations"])
    assert per_category[2] and per_category[4]  # the val set has rectangles and stars, which are not scored
    scored = json.loads((run / "metrics.json").read_text())["per_class"]
    assert {name: row["instances"] for name, row in scored.items() if row["instances"]} == {
        "circle": per_category[1], "triangle": per_category[3]}


def test_freeze_keeps_the_backbone_as_it_started_and_trains_the_rest(tiny_setup, tmp_path):
    train(settings(tiny_setup, tmp_path, epochs=1, val=False, name="start"), progress=False)
    start = tmp_path / "start" / "weights" / "last.pt"
    train(settings(tiny_setup, tmp_path, epochs=2, val=False, name="tuned", model=str(start), freeze=10),
          progress=False)
    before, after = load_checkpoint(start)["model"], load_checkpoint(tmp_path / "tuned" / "weights" / "last.pt")
    weights = [k for k in after["raw_model"] if k.endswith((".weight", ".bias"))]  # not BatchNorm's statistics
    backbone = [k for k in weights if k.startswith("backbone.")]
    assert backbone and all(torch.equal(before[k], after["raw_model"][k]) for k in backbone)
    assert not all(torch.equal(before[k], after["raw_model"][k]) for k in weights if k.startswith("neck."))
    # The run resumes from its own last.pt even when the file it started from is gone.
    start.unlink()
    train({"resume": str(tmp_path / "tuned" / "weights" / "last.pt"), "epochs": 3}, progress=False)
    assert load_checkpoint(tmp_path / "tuned" / "weights" / "last.pt")["epoch"] == 3
    with pytest.raises(ConfigError, match=r"freeze=17: this model has 16 blocks to freeze \(10: the backbone"):
        train(settings(tiny_setup, tmp_path, epochs=1, name="too_many", freeze=17), progress=False)


def test_progress_in_a_log_file_is_one_line_per_epoch_and_no_validation_bar(tiny_setup, tmp_path, capsys):
    """stderr is not a terminal here, as in CI or under nohup: what the bars write there stays in the log."""
    train(settings(tiny_setup, tmp_path, epochs=2), progress=True)
    err = capsys.readouterr().err
    assert "validating" not in err
    for epoch in (1, 2):
        bar = [line for line in err.split("\n") if f"epoch {epoch}/2" in line]  # one line, its redraws after \r
        assert len(bar) == 1 and bar[0].count("\r") <= 2 and "100%" in bar[0].split("\r")[-1], bar


def test_predict_folders_and_globs_in_input_order_in_original_pixels(tiny_setup, tmp_path):
    args = settings(tiny_setup, tmp_path, epochs=1)
    model = Model(args.pop("model"))
    model.train(**args)
    images = sorted((Path(tiny_setup["data"]).parent / "shapes" / "images" / "train").glob("*.jpg"))[:5]
    folder = tmp_path / "inputs"
    folder.mkdir()
    for index, path in enumerate(images):  # one image enlarged, so original pixels differ from input pixels
        image = cv2.imread(str(path))
        cv2.imwrite(str(folder / path.name), cv2.resize(image, (256, 192)) if index == 0 else image)

    results = model.predict(str(folder), conf=0.0, max_det=50, save_dir=tmp_path / "drawn")
    assert [Path(r.path).name for r in results] == [p.name for p in images]
    assert all(len(r.scores) == 50 for r in results)  # conf 0 keeps max_det boxes from a barely trained model
    assert results[0].boxes_xyxy[:, 0::2].max() > 128 and results[0].boxes_xyxy[:, 0::2].max() <= 256
    assert results[0].boxes_xyxy[:, 1::2].max() <= 192 and results[1].boxes_xyxy.max() <= 128
    assert all(r.names == ["circle", "rectangle", "triangle", "star"] and r.classes.max() < 4 for r in results)
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == [p.name for p in images]
    # The batch size of inference does not change what is found.
    one_by_one = model.predict(str(folder / "*.jpg"), conf=0.0, max_det=50, batch=1)
    for a, b in zip(results, one_by_one, strict=True):
        assert_same_detections(a, b)


def assert_same_detections(a, b, tie: float = 0.01, iou: float = 0.7) -> None:
    """Every detection scored clearly above the max_det cut is in both results: same class, same score, and the
    same box or one NMS could have kept in its place.

    A batched convolution sums in another order than a single image's (oneDNN picks kernels by shape and CPU), so
    scores move in the last digits. Two candidates of one class that overlap by more than NMS's `iou` and tie within
    that can trade places (the one kept suppresses the other); candidates within `tie` (relative) of the lowest kept
    score can trade places at the max_det cut. Nothing else may differ.
    """
    cut = min(a.scores.min(), b.scores.min()) * (1 + tie)
    for x, y in ((a, b), (b, a)):
        clear = x.scores > cut
        assert clear.sum() >= len(x.scores) // 2  # most detections are tested, not excused as ties
        same_box = box_iou(torch.as_tensor(x.boxes_xyxy[clear]), torch.as_tensor(y.boxes_xyxy)).numpy() > iou
        same_class = x.classes[clear, None] == y.classes[None]
        same_score = np.isclose(x.scores[clear, None], y.scores[None], rtol=1e-3, atol=1e-6)
        assert (same_box & same_class & same_score).any(axis=1).all()


def test_batch_minus_one_runs_autobatch_then_trains_at_its_choice(tiny_setup, tmp_path):
    train(settings(tiny_setup, tmp_path, epochs=1, batch=-1), progress=False)
    run = tmp_path / "run"
    saved = json.loads((run / "autobatch.json").read_text())
    plan = load_checkpoint(run / "weights" / "last.pt")["plan"]
    assert plan["batch"] == saved["train"]["batch"] and plan["val_batch"] == saved["val"]["batch"]
    assert saved["train"]["decided_by"] in ("throughput", "memory", "dataset size")  # CPU: images/s takes part
    # On CPU the choice stays at or below nbs (8 here: more would halve the optimizer steps) and at or above the
    # BatchNorm floor, which is lowered to half the cap so two samples fit under it.
    assert saved["train"]["verified_peak_bytes"] > 0 and 4 <= plan["batch"] <= 8
    assert saved["key"]["max_boxes"] == max(len(t) for t in CocoDataset(
        Path(tiny_setup["data"]).parent / "shapes" / "images" / "train",
        Path(tiny_setup["data"]).parent / "shapes" / "annotations" / "instances_train.json").targets)
    log = (run / "train.log").read_text()
    assert "AutoBatch (training): samples b=4,8 " in log and f"-> batch {plan['batch']} (" in log
    assert "AutoBatch (validation): samples b=1," in log


def test_an_image_size_off_the_stride_is_rounded_once_for_every_stage(tmp_path, detector_log):
    paths = make_tiny_setup(tmp_path, seed=3, num_train=4, num_val=2, image_size=64)
    trainer = Trainer({**paths, "imgsz": 70, "batch": 4, "epochs": 1, "workers": 0, "project": str(tmp_path)},
                      progress=False)
    assert trainer.image_size == trainer.plan.image_size == 96 and trainer.config.imgsz == 70  # config as given
    assert detector_log().count("imgsz=70 is not a multiple of 32; using 96") == 1
    image, _, _ = trainer.train_data.load(0)
    assert max(image.shape[:2]) == 96  # cached at the size the samples are made at: no second resize
