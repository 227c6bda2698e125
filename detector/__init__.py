"""A YOLO-style anchor-free object detector trainer that picks its batch size by measuring."""

import os

# albumentations asks PyPI for a newer version of itself whenever it is imported (a request, and up to 2 s of
# waiting, offline); a training job should make neither. A user's own setting of the variable wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__all__ = ["Model"]


def __getattr__(name: str):
    # Lazy, so `import detector.data.coco` (and data loader workers) do not import torch's model stack.
    if name == "Model":
        from detector.api import Model

        return Model
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
