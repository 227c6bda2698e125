"""Files shipped inside the package: the settings (cfg/), model scales (cfg/models/) and data cards (data/).

In a checkout they are the repository's top-level cfg/ and data/ folders; pyproject.toml maps them into
the package as detector.cfg and detector.datacards, so a wheel carries them and importlib.resources finds
them the same way wherever the package is installed.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def default_yaml() -> Path:
    return Path(files("detector.cfg") / "default.yaml")


def models_dir() -> Path:
    return Path(files("detector.cfg.models"))


def cards_dir() -> Path:
    return Path(files("detector.datacards"))
