"""Boxes and class labels drawn on uint8 RGB images with OpenCV, and PNGs written atomically.

plots.py draws batches and detections with these; figures (matplotlib) stay there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detector.atomic import atomic_write_bytes

# Distinct, readable colours (RGB) for up to 20 classes; more classes wrap around.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)


def save_png(image_rgb: np.ndarray, out_path: Path) -> Path:
    """Writes a uint8 (H, W, 3) RGB array as a PNG at out_path atomically."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {out_path} as PNG")
    atomic_write_bytes(Path(out_path), lambda file: file.write(encoded.tobytes()))
    return Path(out_path)


def to_numpy(array: Any) -> np.ndarray:
    """Tensors (any device) and array-likes to a numpy array."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _draw_label(tile: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int]) -> None:
    """Writes text on a filled box of `color` just above (x, y), or inside the tile at its top."""
    font, font_scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1
    (text_w, text_h), baseline = cv2.getTextSize(text, font, font_scale, thickness)
    top = y - text_h - baseline - 2 if y - text_h - baseline - 2 >= 0 else y
    x = min(max(x, 0), max(tile.shape[1] - text_w - 2, 0))
    cv2.rectangle(tile, (x, top), (x + text_w + 2, top + text_h + baseline + 2), color, -1)
    # Dark text on light colours, white on dark ones, so every label stays legible.
    ink = (0, 0, 0) if sum(color) > 400 else (255, 255, 255)
    cv2.putText(tile, text, (x + 1, top + text_h + 1), font, font_scale, ink, thickness, cv2.LINE_AA)


def draw_boxes(tile: np.ndarray, rows: np.ndarray, labels: Sequence[str], scale: float) -> None:
    """Draws boxes rows (K, 6) [_, class, x1, y1, x2, y2] (pixels before `scale`) on a tile."""
    for row, label in zip(rows, labels, strict=True):
        color = PALETTE[int(row[1]) % len(PALETTE)]
        x1, y1, x2, y2 = (int(round(v * scale)) for v in row[2:6])
        cv2.rectangle(tile, (x1, y1), (x2, y2), color, 2)
        _draw_label(tile, label, x1, y1, color)


def box_labels(classes: np.ndarray, names: Sequence[str], scores: np.ndarray | None) -> list[str]:
    """'name' or 'name 0.87' per box; a class without a name is shown as its number."""
    labels = [names[int(c)] if 0 <= int(c) < len(names) else str(int(c)) for c in classes]
    if scores is None:
        return labels
    return [f"{label} {score:.2f}" for label, score in zip(labels, scores, strict=True)]
