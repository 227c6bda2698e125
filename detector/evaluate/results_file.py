"""A COCO results file written by any tool (another detector, our val save_json), read, checked and scored against
a split of a dataset with the evaluator and table validation uses, so other detectors' output compares with ours.
Model.val(predictions=...) and `detector val predictions=...` run `evaluate_predictions`; no model runs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from detector.config import class_indices
from detector.data.cards import load_data_card, split_files
from detector.data.coco import relabel
from detector.data.coco_json import load_coco_json
from detector.errors import DataError
from detector.evaluate.metrics import coco_evaluate, ground_truth_index
from detector.evaluate.validate import Validation

logger = logging.getLogger(__name__)

RESULT_KEYS = ("image_id", "category_id", "bbox", "score")
RESULT_FORMAT = "COCO results are {image_id, category_id, bbox: [x, y, width, height], score}"
NAMED_IDS = 5  # an unknown-id error names this many of each kind


def evaluate_predictions(data: str | Path, predictions: str | Path, *, split: str = "val", classes=None,
                         single_cls: bool = False) -> Validation:
    """Score a COCO results file against a split of `data` as validation scores our model's detections, and log
    the same table (every class with ground truth; the confusion matrix is counted too) and a closing line as
    Model.val's.

    Args:
        data: a data card (a shipped name or a YAML path), or a COCO instances JSON path (its own train and val
            split; its images are not needed).
        predictions: a COCO results JSON: a list of {image_id, category_id, bbox [x, y, width, height] in original
            pixels, score} with the annotation file's image and category ids (what val save_json writes).
        split: the card's split to score against: val, test or train.
        classes: score these classes only, in the classes= setting's forms (indices or names, "0,2"); None: all.
            Detections of other classes are left out, as validation's NMS leaves them out.
        single_cls: score every class as one, 'object' (detection without classification).

    Returns:
        The metrics, the detections scored (relabelled as the ground truth is), and the ids of every image of the
        split's annotation file (an image without detections counts as missed).

    Raises:
        DataError: the results file is missing, not a list of results, has a malformed entry, or names image or
            category ids the annotation file lacks; or the data cannot be read.
        ConfigError: a class in `classes` that the data lacks.
    """
    annotation_json, card_names = _annotation_file(data, split)
    detections = read_predictions(Path(predictions))
    truth = load_coco_json(annotation_json)
    check_prediction_ids(detections, truth, Path(predictions), annotation_json)
    categories = sorted(truth["categories"], key=lambda category: category["id"])
    indices = class_indices(classes, card_names or [category["name"] for category in categories])
    detections = relabel({"categories": categories, "annotations": detections}, indices, single_cls)["annotations"]
    truth = relabel(truth, indices, single_cls)
    names = {category["id"]: category["name"] for category in sorted(truth["categories"], key=lambda c: c["id"])}
    image_ids = [image["id"] for image in truth["images"]]
    metrics = coco_evaluate(ground_truth_index(truth), detections, image_ids, names)
    for line in metrics.table(per_class=True):
        logger.info(line)
    logger.info("%s: mAP50-95 %.4f mAP50 %.4f P %.3f R %.3f on %d images (%d detections from %s)", split,
                metrics.map50_95, metrics.map50, metrics.precision, metrics.recall, len(image_ids), len(detections),
                predictions)
    return Validation(metrics, detections, image_ids)


def _annotation_file(data: str | Path, split: str) -> tuple[Path, list[str] | None]:
    """The COCO JSON of `data`'s split and the card's class names (None for a bare JSON: the file's own)."""
    path = Path(data).expanduser()
    if path.suffix.lower() != ".json":
        card = load_data_card(data)
        return split_files(card, split)[1], card.names
    if split not in ("train", "val"):
        raise DataError(f"split={split!r}: data={data} is a COCO JSON, its own train and val split; give a data "
                        "card to score another split")
    return path, None


def read_predictions(path: Path) -> list[dict]:
    """A COCO results JSON, checked entry by entry; each entry keeps image_id, category_id, bbox and score.

    Raises:
        DataError: naming the file and what is wrong: missing, not JSON, not a list, or its first bad entry.
    """
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except FileNotFoundError as err:
        raise DataError(f"predictions file {path} not found") from err
    except IsADirectoryError as err:
        raise DataError(f"predictions={path} is a folder; give the COCO results JSON file") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"predictions file {path} is not valid JSON: {err}") from err
    if not isinstance(entries, list):
        hint = ("; it looks like an annotation file, give the detections' results file" if isinstance(entries, dict)
                and "annotations" in entries else "")
        raise DataError(f"predictions file {path} holds a JSON {type(entries).__name__}, not a list of detections "
                        f"({RESULT_FORMAT}){hint}")
    for index, entry in enumerate(entries):
        problem = _result_problem(entry)
        if problem is not None:
            raise DataError(f"predictions file {path}: entry [{index}] {problem} ({RESULT_FORMAT})")
    return [{key: entry[key] for key in RESULT_KEYS} for entry in entries]


def _result_problem(entry) -> str | None:
    """What is wrong with one results entry, or None."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    missing = [key for key in RESULT_KEYS if key not in entry]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key in ("image_id", "category_id"):
        if not isinstance(entry[key], int) or isinstance(entry[key], bool):
            return f"has {key} {entry[key]!r}, not an integer id"
    bbox = entry["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_finite_number(v) for v in bbox):
        return f"has bbox {bbox!r}, not 4 finite numbers"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"has bbox {bbox!r}, whose width or height is negative"
    if not _is_finite_number(entry["score"]):
        return f"has score {entry['score']!r}, not a finite number"
    return None


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_prediction_ids(detections: list[dict], truth: dict, path: Path, annotation_json: Path) -> None:
    """Every detection's image id and category id are the annotation file's (`truth`: its checked JSON dict).

    Raises:
        DataError: how many image and category ids are unknown, the first few of each, and the file's categories
            (tools that write class indices 0..C-1 instead of category ids are the usual cause).
    """
    known = {"image": {image["id"] for image in truth["images"]},
             "category": {category["id"] for category in truth["categories"]}}
    problems = []
    for what, ids in known.items():
        unknown = sorted({detection[f"{what}_id"] for detection in detections} - ids)
        if unknown:
            shown = ", ".join(map(str, unknown[:NAMED_IDS])) + (", ..." if len(unknown) > NAMED_IDS else "")
            problems.append(f"{len(unknown)} unknown {what} id{'s' if len(unknown) > 1 else ''} ({shown})")
    if problems:
        categories = sorted(truth["categories"], key=lambda category: category["id"])
        listed = ", ".join(f"{c['id']} {c['name']}" for c in categories[:4]) + (", ..." if len(categories) > 4 else "")
        raise DataError(f"predictions file {path} does not match {annotation_json}: {' and '.join(problems)}; "
                        f"detections must use its image ids and its category ids ({listed})")
