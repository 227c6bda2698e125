"""A YOLO-style anchor-free object detector trainer that picks its batch size by measuring."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("detector")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["Model", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import detector.data.coco` (and data loader workers) do not import torch's model stack.
    if name == "Model":
        from detector.api import Model

        return Model
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
