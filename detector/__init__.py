"""A YOLO-style anchor-free object detector trainer that picks its batch size by measuring."""

__all__ = ["Model"]


def __getattr__(name: str):
    # Lazy, so `import detector.data.coco` (and data loader workers) do not import torch's model stack.
    if name == "Model":
        from detector.api import Model

        return Model
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
