"""Multi-scale batches, mixup, TensorBoard and the close_mosaic rule in real (tiny) training runs: resumed, under
DDP, with the tensorboard package missing."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from detector.errors import ConfigError
from detector.train import engine
from detector.train.checkpoint import load_checkpoint
from detector.train.epochs import mosaic_epochs
from detector.train.trainer import Trainer, train
from tests.conftest import REPO, make_tiny_setup


@pytest.fixture
def tensorboard():
    """Skips a test that writes or reads event files where the optional package is missing (CI installs it)."""
    return pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: pip install tensorboard")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return make_tiny_setup(tmp_path_factory.mktemp("data"), seed=3, num_train=16, num_val=4, image_size=128,
                           val_is_train=True)


def settings(tiny_setup, tmp_path, **extra):
    base = dict(tiny_setup, imgsz=64, batch=4, nbs=8, epochs=3, workers=0, project=str(tmp_path), warmup_epochs=0.5,
                mosaic=1.0, mixup=0.5, multi_scale=0.5, close_mosaic=10, tensorboard=True, plots=True)
    return {**base, **extra}


def test_close_mosaic_closes_at_most_the_last_third_of_a_run():
    assert [mosaic_epochs(epochs, 10) for epochs in (1, 2, 3, 6, 15, 30, 100)] == [1, 2, 2, 4, 10, 20, 90]
    assert mosaic_epochs(6, 0) == 6 and mosaic_epochs(6, 1) == 5 and mosaic_epochs(30, 10) == 20


def read_events(log_dir):
    """{tag: [(step, value)]} of the scalars, the picture tags, and the HParams session's settings."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return scalars, set(events.Tags()["images"]), hparams


def check_events_match_results_csv(run_dir, train_size):
    rows = list(csv.DictReader(open(run_dir / "results.csv")))
    scalars, pictures, hparams = read_events(run_dir / "tensorboard")
    for column in rows[0]:
        if column != "epoch":  # every other column of every epoch, once (a killed process's extra points purged)
            assert scalars[column] == [(int(r["epoch"]), pytest.approx(float(r[column]), rel=1e-6, abs=1e-7))
                                       for r in rows], column
    speed = [(int(r["epoch"]), pytest.approx(train_size / float(r["train_time"]), rel=1e-5)) for r in rows]
    assert scalars["train/images_per_s"] == speed
    assert [v for _, v in scalars["train/batch"]] == [4.0] * len(rows)
    assert [v for _, v in scalars["train/accumulate"]] == [2.0] * len(rows)
    assert all(0 < v < 64 for _, v in scalars["train/peak_memory_gib"])
    assert {"pictures/train_batch0", "pictures/val_batch0_pred", "pictures/val_batch0_labels"} <= pictures
    assert hparams["multi_scale"].number_value == 0.5 and hparams["mixup"].number_value == 0.5
    assert hparams["epochs"].number_value == 3 and hparams["plan/batch"].number_value == 4


def test_multi_scale_and_mixup_runs_resume_exactly_and_tensorboard_holds_results_csv(tiny_setup, tmp_path, monkeypatch,
                                                                                     detector_log, tensorboard):
    sides = []
    step = engine.train_step
    monkeypatch.setattr(engine, "train_step", lambda ctx, images, targets: sides.append(images.shape[-1])
                        or step(ctx, images, targets))
    train(settings(tiny_setup, tmp_path, name="straight"), progress=False)
    straight_sides, sides[:] = list(sides), []
    # 3 epochs close the last third: epochs 1-2 with mosaic and mixup, 3 without; batches of 32 to 96 px.
    log = detector_log()
    assert "close_mosaic=10 is more than a third of 3 epochs: mosaic and mixup go off for the last 1 instead" in log
    assert "closing mosaic and mixup for the last 1 epochs" in log
    assert set(straight_sides) <= {32, 64, 96} and len(set(straight_sides)) >= 2, straight_sides

    original_save = Trainer._save

    def die_before_saving_epoch_2(self, epoch, improved):
        if epoch == 1:  # results.csv and TensorBoard have epoch 2, last.pt still epoch 1
            raise KeyboardInterrupt
        original_save(self, epoch, improved)

    monkeypatch.setattr(Trainer, "_save", die_before_saving_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(settings(tiny_setup, tmp_path, name="broken"), progress=False)
    monkeypatch.setattr(Trainer, "_save", original_save)
    sides[:] = []
    train({"resume": True, "project": str(tmp_path), "name": "broken"}, progress=False)
    assert sides == straight_sides[4:]  # 4 batches an epoch: the resumed epochs 2 and 3 at the same sides

    straight = load_checkpoint(tmp_path / "straight" / "weights" / "last.pt")["raw_model"]
    resumed = load_checkpoint(tmp_path / "broken" / "weights" / "last.pt")["raw_model"]
    for key, value in straight.items():
        assert torch.allclose(value.float(), resumed[key].float(), atol=1e-6), key
    for name in ("straight", "broken"):
        check_events_match_results_csv(tmp_path / name, train_size=16)


def test_tensorboard_without_the_package_is_one_error_naming_the_pip_command(tiny_setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what importing it does when it is missing
    with pytest.raises(ConfigError) as info:
        train(settings(tiny_setup, tmp_path, name="none"), progress=False)
    assert str(info.value).startswith("tensorboard=true needs the tensorboard package, which is not installed: "
                                      "pip install tensorboard")
    assert "\n" not in str(info.value) and not (tmp_path / "none").exists()


def test_torchrun_ranks_train_multi_scale_and_mixup_and_rank_0_alone_writes_tensorboard(tiny_setup, tmp_path,
                                                                                        tensorboard):
    args = [f"{key}={value}" for key, value in settings(tiny_setup, tmp_path, name="ddp", epochs=1).items()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "detector", "train", *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    assert len(list((tmp_path / "ddp" / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    scalars, _, _ = read_events(tmp_path / "ddp" / "tensorboard")
    assert scalars["train/batch"] == [(1, 4.0)]  # the global batch, 2 images on each rank
    assert load_checkpoint(tmp_path / "ddp" / "weights" / "last.pt")["plan"]["max_image_size"] == 96
