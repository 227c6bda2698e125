"""Scoring a COCO results file written by any tool (val predictions=): the same figures and table as the val that
wrote it, perfect detections score 1, classes and single_cls apply, and each kind of wrong file is one clear error."""

import json
import math
from pathlib import Path

import pytest
import yaml

from detector import Model
from detector.errors import ConfigError, DataError
from detector.evaluate.results_file import evaluate_predictions
from tests.test_cli import run_detector


@pytest.fixture()
def coco8_val(datasets_dir):
    return datasets_dir / "coco8" / "annotations" / "instances_val.json"


def _perfect(truth_json) -> list[dict]:
    """The ground truth's own boxes as detections, each with score 1."""
    annotations = json.loads(truth_json.read_text())["annotations"]
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in annotations]


def _table(log: str) -> list[str]:
    """The table validation logged last: its header line and its rows (up to save_json's or val's closing line)."""
    lines = log.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split()[:2] == ["class", "images"])
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(("val: ", "wrote ")))
    return lines[start:end]


@pytest.fixture()
def model_made_card(coco8_checkpoint, coco8_val, tmp_path) -> Path:
    """A card of coco8's val images whose ground truth is some of the untrained coco8_checkpoint's own detections
    (every 7th of each image's, one in two moved by a tenth of its width): the model then scores between 0 and 1,
    as a trained one would, without training one. The annotation ids start at 0, as some converters write them."""
    found = tmp_path / "found.json"
    Model(coco8_checkpoint).val(data=str(coco8_val), conf=0.01, save_json=found)
    detections = sorted(json.loads(found.read_text()), key=lambda d: -d["score"])
    annotations = []
    for image_id in sorted({d["image_id"] for d in detections}):
        for k, d in enumerate([d for d in detections if d["image_id"] == image_id][::7][:6]):
            x, y, w, h = d["bbox"]
            annotations.append({"id": len(annotations), "image_id": image_id, "category_id": d["category_id"],
                                "bbox": [x + 0.1 * w * (k % 2), y, w, h]})
    truth = {**json.loads(coco8_val.read_text()), "annotations": annotations}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    card = tmp_path / "made.yaml"
    card.write_text(yaml.safe_dump({"path": str(coco8_val.parents[1].resolve()), "train": "images/val",
                                    "val": "images/val",
                                    "train_json": str(tmp_path / "truth.json"),
                                    "val_json": str(tmp_path / "truth.json")}))
    return card


def test_our_val_save_json_fed_back_gives_the_same_figures_and_table(coco8_checkpoint, model_made_card, tmp_path,
                                                                   detector_log):
    saved = tmp_path / "predictions.json"
    ours = Model(coco8_checkpoint).val(data=str(model_made_card), conf=0.01, save_json=saved)
    ours_table = _table(detector_log())
    assert 0.2 < ours["metrics/mAP50-95"] < ours["metrics/mAP50"] < 1  # so that the comparisons below can fail
    again = Model().val(data=str(model_made_card), predictions=saved)  # no model needed
    assert again == pytest.approx(ours, abs=1e-12)
    assert _table(detector_log()) == ours_table and len(ours_table) > 3
    assert f"detections from {saved}" in detector_log().splitlines()[-1]
    # A checkpoint's val with predictions= scores the file, not the model.
    assert Model(coco8_checkpoint).val(data=str(model_made_card), predictions=str(saved)) == again
    direct = evaluate_predictions(model_made_card, saved)
    assert direct.metrics.map50_95 == pytest.approx(ours["metrics/mAP50-95"], abs=1e-12)
    assert direct.image_ids == [36, 42, 49, 61] and len(direct.detections) == len(json.loads(saved.read_text()))


def test_perfect_detections_score_one_and_classes_and_single_cls_apply(datasets_dir, coco8_val, tmp_path):
    perfect = _perfect(coco8_val)
    path = tmp_path / "perfect.json"
    path.write_text(json.dumps(perfect))
    card = datasets_dir / "coco8" / "coco8.yaml"
    every = evaluate_predictions(card, path)  # a data card as data
    assert every.metrics.map50_95 == pytest.approx(1.0) and every.metrics.recall == pytest.approx(1.0)
    assert list(every.metrics.per_class) == ["person", "dog", "horse", "elephant", "umbrella", "potted plant"]
    # Every box called a person: wrong classes cost the score, except when classes are not scored.
    persons = tmp_path / "persons.json"
    persons.write_text(json.dumps([{**d, "category_id": 1} for d in perfect]))
    assert evaluate_predictions(coco8_val, persons).metrics.map50_95 < 0.5
    one = evaluate_predictions(coco8_val, persons, single_cls=True).metrics
    assert list(one.per_class) == ["object"] and one.map50_95 == pytest.approx(1.0)
    # classes= scores those classes only and leaves out the file's detections of the others.
    some = evaluate_predictions(coco8_val, path, classes="person,horse")
    assert list(some.metrics.per_class) == ["person", "horse"] and some.metrics.map50_95 == pytest.approx(1.0)
    assert {d["category_id"] for d in some.detections} == {1, 19} and len(some.detections) == 12
    assert Model().val(data=str(coco8_val), predictions=path, classes="0,2")["metrics/mAP50-95"] == pytest.approx(1)


def test_unknown_image_and_category_ids_are_one_error_naming_the_first_few(coco8_val, tmp_path):
    entries = _perfect(coco8_val)
    entries += [{**entries[0], "image_id": image_id} for image_id in (9001, 9000, 9002, 9003, 9004, 9005)]
    entries += [{**entries[0], "category_id": 0}]  # a class index where a category id belongs
    path = tmp_path / "theirs.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError) as error:
        evaluate_predictions(coco8_val, path)
    assert str(error.value) == (
        f"predictions file {path} does not match {coco8_val}: 6 unknown image ids (9000, 9001, 9002, 9003, 9004, "
        "...) and 1 unknown category id (0); detections must use its image ids and its category ids (1 person, "
        "2 bicycle, 3 car, 4 motorcycle, ...)")


@pytest.mark.parametrize(("content", "problem"), [
    ("[{", "is not valid JSON: "),
    ({"images": [], "annotations": [], "categories": []}, "holds a JSON dict, not a list of detections (COCO "
     "results are {image_id, category_id, bbox: [x, y, width, height], score}); it looks like an annotation file"),
    ([[42, 1, [0, 0, 5, 5], 0.9]], ": entry [0] is a list, not an object"),
    ([{"image_id": 42, "bbox": [0, 0, 5, 5]}], ": entry [0] lacks category_id, score"),
    ([{"image_id": "42", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}],
     ": entry [0] has image_id '42', not an integer id"),
    ([{"image_id": 42, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9},
      {"image_id": 42, "category_id": 1, "bbox": [0, 0, 5], "score": 0.9}],
     ": entry [1] has bbox [0, 0, 5], not 4 finite numbers"),
    ([{"image_id": 42, "category_id": 1, "bbox": ["0", 0, 5, 5], "score": 0.9}], "has bbox ['0', 0, 5, 5], not 4"),
    ([{"image_id": 42, "category_id": 1, "bbox": [0, 0, -5, 5], "score": 0.9}], "width or height is negative"),
    ([{"image_id": 42, "category_id": 1, "bbox": [0, 0, 5, 5], "score": math.nan}],
     ": entry [0] has score nan, not a finite number"),
])
def test_a_malformed_results_file_is_one_error_naming_it_and_the_problem(coco8_val, tmp_path, content, problem):
    path = tmp_path / "theirs.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as error:
        Model().val(data=str(coco8_val), predictions=path)
    assert str(error.value).startswith(f"predictions file {path}") and problem in str(error.value)


def test_settings_that_only_a_model_uses_and_a_missing_file_or_data_are_errors(coco8_val, tmp_path):
    path = tmp_path / "perfect.json"
    path.write_text(json.dumps(_perfect(coco8_val)))
    with pytest.raises(ConfigError, match=r"^val predictions= scores the file's detections as they are: conf, "
                                          r"save_json cannot apply; give only data, classes or single_cls$"):
        Model().val(data=str(coco8_val), predictions=path, conf=0.3, save_json=tmp_path / "out.json")
    with pytest.raises(ConfigError, match="did you mean classes"):
        Model().val(data=str(coco8_val), predictions=path, clases="0")
    with pytest.raises(ConfigError, match=r"^val predictions= needs data=<data card or COCO JSON>"):
        Model().val(predictions=path)
    with pytest.raises(DataError, match=f"^predictions file {tmp_path / 'none.json'} not found$"):
        Model().val(data=str(coco8_val), predictions=tmp_path / "none.json")
    with pytest.raises(DataError, match="data=.* is a COCO JSON, its own train and val split; give a data card"):
        Model().val("test", data=str(coco8_val), predictions=path)


def test_the_command_line_scores_a_file_without_a_model(coco8_val, tmp_path):
    path = tmp_path / "perfect.json"
    path.write_text(json.dumps(_perfect(coco8_val)))
    result = run_detector("val", f"data={coco8_val}", f"predictions={path}")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("val: mAP50-95 1.0000 mAP50 1.0000 P 1.000 R 1.000 on 4 images (17 detections")
    assert [line.split()[0] for line in _table(result.stderr)][:3] == ["class", "all", "person"]
    path.write_text(json.dumps([{"image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    failed = run_detector("val", f"data={coco8_val}", f"predictions={path}", "split=train")
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert errors == [f"error: predictions file {path} does not match {coco8_val}: 1 unknown image id (7); detections "
                      "must use its image ids and its category ids (1 person, 2 bicycle, 3 car, 4 motorcycle, ...)"]
    missing = run_detector("val", f"data={coco8_val}")
    assert missing.returncode == 2 and missing.stderr.strip().endswith(
        "val needs model=<path to a .pt checkpoint> (or predictions=<COCO results JSON> with data=)")
