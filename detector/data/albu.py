"""albumentations, imported without its update check (the augmentation modules take `A` from here)."""

from __future__ import annotations

import os


def _import_albumentations():
    """albumentations asks PyPI for a newer version of itself on import unless NO_ALBUMENTATIONS_UPDATE is set (a
    request and up to 2 s of waiting, offline). Set it for the import alone: the user's environment stays as it was."""
    unset = "NO_ALBUMENTATIONS_UPDATE" not in os.environ
    if unset:
        os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    try:
        import albumentations
    finally:
        if unset:
            del os.environ["NO_ALBUMENTATIONS_UPDATE"]
    return albumentations


A = _import_albumentations()
