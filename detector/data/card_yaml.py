"""A data card's YAML read, and its keys checked for type: each mistake is a DataError naming the card and key.

Keys another tool wrote for itself are told apart from misspelt settings (foreign_keys): a key that is neither a
card key nor a training setting is that tool's when its value is a mapping (a block of its own, like Roboflow's
`roboflow:` with workspace, project, version, license and url) or when it is one of METADATA_KEYS (who made the
dataset and under what terms); any other key stays with the settings, where the config rejects it with the
closest setting names (`epocsh: 3`: did you mean epochs?).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from detector.config import FIELDS
from detector.errors import DataError

# Top-level keys that describe a dataset, not how to train on it; none is a setting, and no setting is a mapping.
METADATA_KEYS = ("author", "citation", "date", "description", "license", "url", "version")


def read_card_yaml(path: Path) -> dict[str, Any]:
    """The card's keys as YAML gives them."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"cannot read data card {path}: {err}") from err
    if not isinstance(raw, dict):
        raise DataError(f"data card {path} must be a mapping of keys (path, train, val, ...)")
    return raw


def foreign_keys(raw: dict[str, Any], card_keys: set[str]) -> list[str]:
    """The keys of a card that another tool wrote for itself and that training ignores (see the module docstring);
    a key that is a setting is never one, whatever its value, so `lr0: {...}` still fails as a bad value."""
    return [key for key in raw if key not in card_keys and key not in FIELDS
            and (isinstance(raw[key], dict) or key in METADATA_KEYS)]


def card_text(name: str, raw: dict, key: str, default: str | None = None) -> str | None:
    """A key that holds text (a path, a URL, a name), or None when absent and without default."""
    value = raw.get(key, default)
    if value is not None and not isinstance(value, str | Path):
        raise DataError(f"data card {name}: '{key}' must be a string, got {type(value).__name__} {value!r}")
    return None if value is None else str(value)


def split_folders(name: str, raw: dict, split: str) -> list[str]:
    """A split's image folders: one, or a list (Ultralytics cards list several, e.g. VOC's), or a .txt listing its
    images (Ultralytics' coco.yaml); none when absent."""
    value = raw.get(split)
    if isinstance(value, list):
        if not value or not all(isinstance(folder, str) and folder and not folder.lower().endswith(".txt")
                                for folder in value):
            raise DataError(f"data card {name}: '{split}' must be an image folder, a list of image folders or one .txt "
                            f"list of images, got {value!r}")
        return list(value)
    value = card_text(name, raw, split)
    return [value] if value else []


def parse_names(name: str, names: Any) -> list[str]:
    """names as a list, or a dict {index: name} with indices 0..C-1."""
    if names is None:
        return []
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"data card {name}: 'names' keys must be the class indices 0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not all(isinstance(n, str | int) for n in names):
        raise DataError(f"data card {name}: 'names' must be a list of class names or a dict index: name")
    return [str(n) for n in names]
