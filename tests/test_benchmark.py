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
    table = (folder / "table.md").read_text()
    header, first = table.splitlines()[0], table.splitlines()[2]
    assert header.startswith("| batch asked | seed |") and header.count("|") == first.count("|")
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


def _run_row(asked, seed, map50_95, *, batch=None, policy="nbs", run_s=10.0, img_s=50.0, peak=0.5, capacity=8.0,
             noise=40.0):
    batch = int(asked) if batch is None else batch
    return {"asked": asked, "seed": seed, "batch": batch, "device_batch": batch, "lr_policy": policy,
            "images_per_step": batch, "map50_95": map50_95, "run_s": run_s, "train_img_s": img_s, "peak_gib": peak,
            "capacity_gib": capacity, "noise_scale": noise}


def test_seeds_give_mean_and_spread_and_differences_within_noise_are_marked():
    from detector.benchmark_summary import summarize, versus_best

    rows = [_run_row("8", 0, 0.30), _run_row("8", 1, 0.34), _run_row("16", 0, 0.31), _run_row("16", 1, 0.33),
            _run_row("32", 0, 0.20), _run_row("32", 1, 0.21)]
    groups = summarize(rows)
    assert [(g.asked, g.seeds) for g in groups] == [("8", 2), ("16", 2), ("32", 2)]
    assert groups[0].map_mean == pytest.approx(0.32) and groups[0].spread == pytest.approx(0.04)
    assert (groups[0].map_min, groups[0].map_max) == (0.30, 0.34)
    assert groups[0].map_std == pytest.approx(0.0283, abs=1e-4)
    notes = versus_best(groups)
    assert notes[0] == "best"  # 0.32 ties 0.32: the first keeps it
    assert "within noise" in notes[1]  # 0.32 vs 0.32
    assert notes[2].startswith("-0.1150") and "beyond noise (seed spread 0.0400)" in notes[2]
    one_seed = versus_best(summarize([_run_row("8", 0, 0.3), _run_row("16", 0, 0.2)]))
    assert one_seed[1] == "-0.1000 (one seed: noise unknown)"


def test_goodput_is_throughput_times_pollux_efficiency():
    from detector.benchmark_summary import efficiency, goodput

    assert efficiency(8, 40.0, 8) == pytest.approx(1.0)  # the base batch itself
    assert efficiency(16, 16.0, 8) == pytest.approx((16 + 8) / (16 + 16))
    assert goodput(100.0, 16, 16.0, 8) == pytest.approx(75.0)
    assert goodput(100.0, 64, math.inf, 8) == pytest.approx(100.0)  # noise beyond measure: no efficiency loss
    assert efficiency(1000, 10.0, 8) < 0.02  # far above the noise scale an image per step is worth little


def test_the_recommendation_is_the_fastest_batch_within_noise_of_the_best():
    from detector.benchmark_summary import recommend, summarize

    groups = summarize([
        _run_row("8", 0, 0.30, run_s=100), _run_row("8", 1, 0.34, run_s=100),
        _run_row("16", 0, 0.30, run_s=60), _run_row("16", 1, 0.32, run_s=60),  # within noise of batch 8, faster
        _run_row("32", 0, 0.10, run_s=30), _run_row("32", 1, 0.11, run_s=30)])  # fastest but far worse
    answer = recommend(groups, 40.0)
    assert answer.group is groups[1]
    assert answer.text.startswith("Recommended: batch 16 (lr_policy nbs)")
    assert "16 images per step is below the critical batch (B_simple 40)" in answer.text
    assert "peak 0.5 of 8 GiB" in answer.text and "Goodput" in answer.text
    assert recommend(groups, 40.0, budget=True).group is groups[0]  # equal time: the best mean mAP


def test_the_recommendation_refuses_batches_below_the_batchnorm_floor_or_over_memory():
    from detector.benchmark_summary import recommend, summarize

    groups = summarize([_run_row("4", 0, 0.40, run_s=20), _run_row("8", 0, 0.30, run_s=50),
                        _run_row("64", 0, 0.45, run_s=10, peak=9.0)])
    answer = recommend(groups, 40.0)
    assert answer.group is groups[1]
    assert "batch 4 (lr_policy nbs): 4 images per device is below the BatchNorm floor of 8" in answer.text
    assert "batch 64 (lr_policy nbs): peak 9 GiB is over the 8 GiB capacity" in answer.text
    nothing = recommend(summarize([_run_row("4", 0, 0.4)]), 40.0)
    assert nothing.group is None and nothing.text.startswith("No batch recommended: batch 4")


@pytest.mark.parametrize(("key", "text"), [("seeds", "0,x"), ("seeds", "1,1"), ("policies", "nbs,cubic"),
                                           ("budget", "-5"), ("budget", "soon")])
def test_bad_study_settings_are_clear_errors(key, text):
    from detector.benchmark import parse_budget, parse_policies, parse_seeds

    parse = {"seeds": parse_seeds, "policies": parse_policies, "budget": parse_budget}[key]
    with pytest.raises(ConfigError, match=key):
        parse(text)


def test_seeds_train_each_batch_twice_and_the_table_summarizes_them(tiny, tmp_path):
    rows = benchmark("4,8", seeds="0,1", progress=False, epochs=1, project=str(tmp_path), name="s", **tiny)
    assert [(r["asked"], r["seed"]) for r in rows] == [("4", 0), ("4", 1), ("8", 0), ("8", 1)]
    assert (tmp_path / "s" / "batch8_seed1").is_dir()
    table = (tmp_path / "s" / "table.md").read_text()
    for column in ("| seeds |", "| mAP50-95 mean |", "| min-max |", "| vs best |", "| goodput img/s |"):
        assert column in table
    assert "Recommended: batch 8 (lr_policy nbs), mean mAP50-95" in table
    assert "batch 4 (lr_policy nbs): 4 images per device is below the BatchNorm floor of 8" in table


def test_policies_and_an_equal_time_budget(tiny, tmp_path):
    rows = benchmark("8", policies="nbs,none", budget=0.01, progress=False, epochs=3, project=str(tmp_path),
                     name="p", **tiny)
    assert [r["lr_policy"] for r in rows] == ["nbs", "none"]
    assert [r["accumulate"] for r in rows] == [2, 1]
    assert all(r["epochs"] == 1 for r in rows)  # 10 ms of budget are spent by the first epoch, however fast
    table = (tmp_path / "p" / "table.md").read_text()
    assert "| nbs | 8 |" in table and "| none | 8 |" in table
    assert "within the same wall-clock budget" in table


def test_the_command_line_splits_study_settings_from_training_ones(monkeypatch):
    import detector.benchmark as bench

    seen = {}
    monkeypatch.setattr(bench, "benchmark", lambda batches, **kwargs: seen.update(batches=batches, **kwargs))
    bench.run_cli(["batches=8,16", "seeds=0,1", "policies=nbs,sqrt", "budget=90", "epochs=6", "data=shapes.yaml"])
    assert seen == {"batches": "8,16", "seeds": "0,1", "policies": "nbs,sqrt", "budget": "90", "epochs": "6",
                    "data": "shapes.yaml"}
    with pytest.raises(ConfigError, match="seedz"):
        bench.run_cli(["seedz=0,1"])
