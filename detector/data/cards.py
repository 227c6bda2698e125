"""Data card (YAML) -> DataCard: resolved image folders and COCO JSON files, fetched or generated if missing.

A card names a dataset root (`path`, relative to the datasets dir; empty or absent: the card's own folder,
as in Ultralytics cards), train/val image folders and their COCO JSON files. A split whose JSON is missing
but which has YOLO labels (the image folder with its last `images` part read as `labels`, as Ultralytics
pairs them) gets its JSON written from them, so an Ultralytics dataset and card train as they are; a split
that lists several folders gets one JSON for all of them (written from theirs on first use), and a split given as
a .txt list of images (Ultralytics' coco.yaml) one JSON for the listed images; each is written again when what it
was written from changes (detector/data/derived.py). A split starting with `../` whose folder does not exist is
read below the root instead, as Ultralytics reads it: a Roboflow export's data.yaml, beside its train/ valid/ test/
folders, names them `../train/images`, so the export trains as it is.

Keys: those in CARD_KEYS are the card's. Keys another tool wrote for itself are ignored, all named in one log line:
a key that is no training setting and whose value is a mapping (Roboflow's `roboflow:` block) or that is dataset
metadata (license, url, version, ...: card_yaml.METADATA_KEYS). Every other key (imgsz, epochs, ...) is a training
setting, returned in `settings` for the config to validate, so a misspelt one (`epocsh: 3`) is still an error.

A bare COCO JSON as the card finds its images beside it, in the images/ folder next to it, or in the COCO layout's
images/<split> (saying where in one line), and says where it looked when they are in none of them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from detector.assets import cards_dir
from detector.data.card_yaml import card_text, foreign_keys, parse_names, read_card_yaml, split_folders
from detector.data.coco_json import category_names, find_images
from detector.data.derived import default_json, list_base, write_split_json
from detector.errors import DataError

logger = logging.getLogger(__name__)

CARD_KEYS = {"path", "train", "val", "test", "train_json", "val_json", "test_json", "names", "download", "converter",
             "generator", "nc"}
SPLITS = ("train", "val", "test")
CONVERTERS = ("yolo",)  # the labels a missing JSON is written from; YOLO labels are found without the key too
GENERATORS = ("shapes",)
SAMPLED_IMAGES = 20  # a bare COCO JSON's images are looked for by this many of its file names


@dataclass(frozen=True)
class DataCard:
    """A data card with every path resolved.

    Attributes:
        name: Card name (file stem).
        root: Dataset root folder.
        train_images, val_images: Image folders the JSON file_name entries are relative to.
        train_json, val_json: COCO instances JSON files.
        names: Class names in category-id order.
        settings: Training settings the card sets (validated by the caller).
        test_images, test_json: The test split, when the card names one (`detector val split=test`); its JSON is
            written from YOLO labels when first asked for (split_files).
        merged: The image folders of each split the card lists several for; that split's images are the folder
            they share, and its JSON, written on first use (and again when theirs change), holds them all
            (split_files).
        listed: The .txt image list of each split given as one (lines are image paths, relative to the list's
            folder or absolute); that split's images are the folder its images share, and its JSON, when missing
            (or written here before the list, the images or their labels changed), is written from their YOLO
            labels (split_files).
    """

    name: str
    root: Path
    train_images: Path
    train_json: Path
    val_images: Path
    val_json: Path
    names: list[str]
    settings: dict = field(default_factory=dict)
    test_images: Path | None = None
    test_json: Path | None = None
    merged: dict[str, list[Path]] = field(default_factory=dict)
    listed: dict[str, Path] = field(default_factory=dict)


def datasets_root(datasets_dir: Path | str | None = None) -> Path:
    """The folder relative dataset paths resolve against: argument, $DETECTOR_DATASETS, or ./datasets."""
    if datasets_dir is None:
        datasets_dir = os.environ.get("DETECTOR_DATASETS", "datasets")
    path = Path(datasets_dir).expanduser().resolve()
    logger.info("datasets dir: %s", path)
    return path


def load_data_card(spec: str | Path, datasets_dir: Path | None = None) -> DataCard:
    """Resolves a data card, fetching, converting or generating the dataset when it is missing.

    Args:
        spec: A shipped card name ("coco8" or "coco8.yaml"), a YAML path, or a COCO JSON path.
        datasets_dir: Folder for relative dataset paths (default $DETECTOR_DATASETS, else ./datasets).

    Returns:
        The DataCard.

    Raises:
        DataError: Unknown card, unreadable YAML, bad keys or types, or a dataset that is missing
            and cannot be fetched (the message says where to put it).
    """
    spec_path = Path(spec).expanduser()
    if spec_path.suffix.lower() == ".json":
        return _card_from_json(spec_path)
    card_path = _find_card(spec_path)
    raw = _without_foreign_keys(card_path, read_card_yaml(card_path))
    datasets_dir = datasets_root(datasets_dir)
    card = _resolve(card_path.stem, raw, datasets_dir, card_path.parent)
    if not _dataset_present(card):
        _materialize(card, raw)
        card = _resolve(card_path.stem, raw, datasets_dir, card_path.parent)  # a .txt split's folder, now it exists
    for split in ("train", "val"):
        split_files(card, split)  # writes a JSON that is missing or stale from YOLO labels
    from_json = _names_from_json(card.train_json)  # one parse of what may be a large file
    if card.names and len(card.names) != len(from_json):
        raise DataError(f"data card {card_path.stem}: 'names' has {len(card.names)} classes but {card.train_json} "
                        f"has {len(from_json)} categories; fix 'names' or leave it out")
    return replace(card, names=card.names or from_json)


def split_files(card: DataCard, split: str) -> tuple[Path, Path]:
    """(image folder, COCO JSON) of a card's train, val or test split; a JSON that is missing, or was written from
    YOLO labels that changed since, is written here (detector/data/derived.py), so cards with a test split cost
    nothing until it is used."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if split == "test" and card.test_images is None:
        raise DataError(f"data card {card.name} has no test split: add 'test: <image folder>' to it")
    images, json_path = {"train": (card.train_images, card.train_json), "val": (card.val_images, card.val_json),
                         "test": (card.test_images, card.test_json)}[split]
    if split in card.listed and not card.listed[split].is_file():
        raise DataError(f"data card {card.name}: the {split} image list {card.listed[split]} does not exist")
    if not images.is_dir():
        raise DataError(f"the {split} images of data card {card.name} are not at {images}")
    write_split_json(card.name, card.names, card.root, images, json_path, folders=card.merged.get(split),
                     listed=card.listed.get(split))
    return images, json_path


def _find_card(spec: Path) -> Path:
    if spec.is_file():
        return spec
    name = spec.name if spec.suffix.lower() in (".yaml", ".yml") else f"{spec.name}.yaml"
    shipped = cards_dir() / name
    if len(spec.parts) == 1 and shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in cards_dir().glob("*.yaml")))
    raise DataError(f"data card {spec} not found: give a YAML or COCO JSON path, or one of: {available}")


def _without_foreign_keys(card_path: Path, raw: dict) -> dict:
    """The card's keys less those another tool wrote for itself (the module docstring), named in one line."""
    ignored = foreign_keys(raw, CARD_KEYS)
    if ignored:
        logger.info("data card %s: ignoring %s: written by another tool for itself, not card keys or training "
                    "settings", card_path, ", ".join(ignored))
    return {key: value for key, value in raw.items() if key not in ignored}


def _below_root(root: Path, entry: str) -> Path:
    """root / entry, but for an entry starting with ../ whose place does not exist: root / the rest, as Ultralytics
    reads it (a Roboflow export's data.yaml sits beside the train/ it names ../train/images)."""
    path = root / entry
    if not entry.startswith("../") or path.exists():
        return path
    inside = root / entry[3:]
    if inside.exists():
        logger.info("%s does not exist: using %s", path, inside)
    return inside


def _resolve(name: str, raw: dict, datasets_dir: Path, card_folder: Path) -> DataCard:
    """Card keys -> paths (nothing is checked on disk yet, but for the image lists a split may name)."""
    splits = {split: split_folders(name, raw, split) for split in SPLITS}
    if not splits["train"]:
        raise DataError(f"data card {name}: 'train' (training image folder, relative to 'path') is missing")
    splits["val"] = splits["val"] or splits["train"]
    path = card_text(name, raw, "path")
    root = datasets_dir / Path(path).expanduser() if path else card_folder.resolve()  # an absolute path stays
    for key in ("download", "converter", "generator"):
        card_text(name, raw, key)
    if raw.get("converter") not in (None, *CONVERTERS):
        raise DataError(f"data card {name}: converter {raw['converter']!r} is unknown; use {CONVERTERS}")
    if raw.get("generator") not in (None, *GENERATORS):
        raise DataError(f"data card {name}: generator {raw['generator']!r} is unknown; use {GENERATORS}")
    names = parse_names(name, raw.get("names"))
    if raw.get("nc") is not None and names and raw["nc"] != len(names):
        raise DataError(f"data card {name}: nc={raw['nc']} but 'names' has {len(names)} entries")
    settings = {k: v for k, v in raw.items() if k not in CARD_KEYS}
    paths, merged, listed = {}, {}, {}
    for split, folders in splits.items():
        if not folders:  # test: absent, or left empty as Ultralytics cards often do
            paths[split] = (None, None)
            continue
        if len(folders) == 1 and folders[0].lower().endswith(".txt"):  # a list of images
            listed[split] = _below_root(root, folders[0])
            images = list_base(listed[split])
            default = f"annotations/instances_{Path(folders[0]).stem}.json"
        elif len(folders) == 1:
            images, default = _below_root(root, folders[0]), default_json(folders[0])
        else:  # one JSON for all of them, its file names relative to the folder they share
            merged[split] = [root / folder for folder in folders]
            images = Path(os.path.commonpath(merged[split]))
            default = f"annotations/instances_{'+'.join(Path(folder).name for folder in folders)}.json"
        paths[split] = (images, root / card_text(name, raw, f"{split}_json", default))
    return DataCard(name=name, root=root, train_images=paths["train"][0], train_json=paths["train"][1],
                    val_images=paths["val"][0], val_json=paths["val"][1], names=names, settings=settings,
                    test_images=paths["test"][0], test_json=paths["test"][1], merged=merged,
                    listed=listed)


def _dataset_present(card: DataCard) -> bool:
    return all(p.is_dir() for p in (card.train_images, card.val_images)) and all(
        p.is_file() for p in (card.train_json, card.val_json))


def _missing_message(card: DataCard) -> str:
    return (f"dataset '{card.name}' not found: put the images in {card.train_images} "
            f"(val: {card.val_images}) "
            f"and COCO JSON at {card.train_json} (val: {card.val_json}), or set DETECTOR_DATASETS "
            "to the folder that holds it")


def _materialize(card: DataCard, raw: dict) -> None:
    """Generates or downloads a dataset whose images are missing; raises where neither is possible."""
    if raw.get("generator") == "shapes":
        from detector.data.shapes import generate_shapes  # lazy: only cards that need it pay for it

        generate_shapes(card.root)
    elif card.train_images.is_dir() and card.val_images.is_dir():
        return  # only JSONs are missing: split_files writes them from YOLO labels, or says what to put where
    elif raw.get("download") and "\n" in raw["download"].strip():  # an Ultralytics card's Python download script
        raise DataError(f"{_missing_message(card)}; the card's download: is a script, and no code from a card is run "
                        "here: fetch the dataset with the tool the card was written for")
    elif raw.get("download"):
        from detector.data.download import download, safe_extract

        card.root.parent.mkdir(parents=True, exist_ok=True)
        zip_path = card.root.parent / f"{card.name}.zip"
        try:
            download(raw["download"], zip_path)
        except DataError as err:
            raise DataError(f"{err}. {_missing_message(card)}") from err
        _unpack(zip_path, card.root, safe_extract)
        zip_path.unlink(missing_ok=True)
    if not (card.train_images.is_dir() and card.val_images.is_dir()):
        raise DataError(_missing_message(card))


def _unpack(zip_path: Path, root: Path, safe_extract) -> None:
    """Unzips next to root, then moves the zip's single top folder (or everything) to root."""
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        safe_extract(zip_path, staging)
        entries = [p for p in staging.iterdir() if p.name != "__MACOSX"]
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        if root.exists():
            shutil.rmtree(root)
        os.replace(source, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _names_from_json(json_path: Path) -> list[str]:
    try:
        with open(json_path, encoding="utf-8") as file:
            return category_names(json_path, json.load(file))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read category names from {json_path}: {err}") from err


def _card_from_json(json_path: Path) -> DataCard:
    """A bare COCO JSON: train and val are that file; its images where the first of them are
    (coco_json.find_images)."""
    json_path = json_path.resolve()
    if not json_path.is_file():
        raise DataError(f"annotation file {json_path} not found")
    try:
        with open(json_path, encoding="utf-8") as file:
            data = json.load(file)
        file_names = [str(image["file_name"]) for image in data.get("images", [])[:SAMPLED_IMAGES]]
        names = category_names(json_path, data)
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as err:
        raise DataError(f"annotation file {json_path} is not a COCO instances JSON: {err!r}") from err
    folder = json_path.parent
    root = folder.parent if folder.name == "annotations" else folder
    images = find_images(json_path, file_names)
    return DataCard(json_path.stem, root, images, json_path, images, json_path, names, {})
