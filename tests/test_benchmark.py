"""The batch-size benchmark: one filled row per batch setting, its files, and the lr policies."""

import csv
import math

import pytest
import torch

from detector.benchmark import COLUMNS, benchmark, parse_batches
from detector.config import make_config
from detector.errors import ConfigError
from detector.train.plan import make_plan
from detector.train.trainer import Trainer
from tests.conftest import make_tiny_setup


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_tiny_setup(tmp_path_factory.mktemp("bench"), seed=5, num_train=16, num_val=4, image_size=128)
    return {**paths, "imgsz": 128, "workers": 0, "mosaic": 0.0, "close_mosaic": 0}


def test_one_filled_row_per_batch_and_the_files(tiny, tmp_path):
    rows = benchmark("2,4,-1", progress=False, epochs=2, project=str(tmp_path), name="b", **tiny)
    assert [r["asked"] for r in rows] == ["2", "4", "-1"]
    for row in rows:
        assert set(row) == set(COLUMNS)
        assert all(value != "" and not (isinstance(value, float) and math.isnan(value)) for value in row.values()), row
    assert rows[0]["batch"] == 2 and rows[1]["batch"] == 4 and rows[0]["decided_by"] == "fixed"
    assert rows[2]["decided_by"] in ("throughput", "memory", "dataset size")
    # nbs=16 accumulation: every run takes optimizer steps of 16 images, so all take the same number of steps.
    assert rows[0]["accumulate"] == 8 and rows[1]["accumulate"] == 4
    assert rows[0]["images_per_step"] == rows[1]["images_per_step"] == 16
    assert rows[0]["optimizer_steps"] == rows[1]["optimizer_steps"] == 2  # 16 images x 2 epochs / 16
    assert rows[0]["peak_gib"] < rows[1]["peak_gib"]  # a step at 4 images needs more memory than at 2
    folder = tmp_path / "b"
    saved = list(csv.DictReader(open(folder / "results.csv")))
    assert [r["batch"] for r in saved] == [str(r["batch"]) for r in rows]
    assert "| batch asked |" in (folder / "table.md").read_text()
    for plot in ("speed.png", "memory.png", "map.png", "map_vs_time.png"):
        assert (folder / plot).stat().st_size > 10_000
    assert (folder / "batchauto" / "autobatch.json").is_file()


@pytest.mark.parametrize(("policy", "accumulate", "lr_factor"), [
    ("nbs", 4, 1.0), ("linear", 1, 0.25), ("sqrt", 1, 0.5), ("none", 1, 1.0)])
def test_lr_policies_set_accumulation_lr_and_decay_as_documented(policy, accumulate, lr_factor):
    config = make_config({"lr_policy": policy, "nbs": 16, "lr0": 0.01, "optimizer": "SGD", "weight_decay": 0.0005})
    plan = make_plan(config, torch.device("cpu"), 2, image_size=320, train_size=64, batch=4)
    assert plan.accumulate == accumulate
    assert plan.lr0 == pytest.approx(0.01 * lr_factor)
    assert plan.weight_decay == pytest.approx(0.0005 * 4 * accumulate / 16)  # follows the images per step


def test_the_policy_reaches_the_optimizer(tiny, tmp_path):
    trainer = Trainer({**tiny, "lr_policy": "linear", "batch": 4, "nbs": 16, "optimizer": "SGD", "lr0": 0.02,
                       "warmup_epochs": 0, "project": str(tmp_path)}, progress=False)
    accumulate = trainer.ctx.schedule.apply(trainer.ctx.optimizer, iteration=0)
    assert accumulate == 1
    assert [g["lr"] for g in trainer.ctx.optimizer.param_groups] == pytest.approx([0.005] * 3)
    assert trainer.ctx.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.0005 * 4 / 16)


@pytest.mark.parametrize("text", ["", "2,x", "0", "-2", "3.5"])
def test_bad_batches_are_clear_errors(text):
    with pytest.raises(ConfigError, match="batch"):
        parse_batches(text)


def test_the_table_says_what_an_unresolved_noise_scale_means():
    from detector.benchmark import markdown_table

    base = {c: 1 for c in COLUMNS}
    table = markdown_table([{**base, "images_per_step": 16, "noise_scale": math.inf},
                            {**base, "images_per_step": 16, "noise_scale": 40.0},
                            {**base, "images_per_step": 16, "noise_scale": 60.0}])
    assert "| > 32 |" in table and "inf" not in table
    assert "median over 2 run(s): 50 images (1 run(s) only as above" in table


def test_accumulation_never_skips_a_whole_epoch():
    # 4 images at batch 4 with nbs=16 would accumulate 4 batches, i.e. one step every 4 epochs.
    config = make_config({"lr_policy": "nbs", "nbs": 16})
    plan = make_plan(config, torch.device("cpu"), 2, image_size=320, train_size=4, batch=4)
    assert plan.accumulate == 1
    assert plan.weight_decay == pytest.approx(config.weight_decay * 4 / 16)
    assert make_plan(config, torch.device("cpu"), 2, image_size=320, train_size=40, batch=4).accumulate == 4
