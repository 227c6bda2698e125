"""One image of the shapes dataset (detector/data/shapes.py): a textured background, unlabelled distractors,
and circles, rectangles, triangles and stars (filled or outlined, rotated, 8 to ~100 px at 256, partly
overlapping), each with the tight box of its visible pixels.

The generator handed in is the only source of randomness, so the same state renders the same image.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CLASS_NAMES = ("circle", "rectangle", "triangle", "star")
MIN_VISIBLE = 0.7  # fraction of an object's own pixels that must stay visible after occlusion
MIN_CONTRAST = 60.0  # RGB distance between an object and the mean of what it covers
SMALL_SHARE = 0.2  # of shapes drawn 8-16 px wide at 256 px: about 2-3x the reference set's share
SHIFT = 4  # cv2 fixed-point bits: sub-pixel vertices keep small anti-aliased shapes round


@dataclass(frozen=True)
class RenderedObject:
    """One labelled shape of a rendered image.

    Attributes:
        class_index: Index into CLASS_NAMES (category id is class_index + 1).
        box_xywh: Tight box of the visible pixels, (x, y, w, h) in pixels.
        area: Visible area of the shape's silhouette in pixels (interior included when outlined).
        color: Colour the shape was drawn with, (B, G, R) as stored by cv2.
        filled: False for an outline.
        visible: Fraction of the shape's drawn pixels not hidden by anything drawn on top.
        mask: bool (H, W), the pixels the shape still shows after everything drawn on top.
    """

    class_index: int
    box_xywh: tuple[int, int, int, int]
    area: float
    color: tuple[int, int, int]
    filled: bool
    visible: float
    mask: np.ndarray


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Colour noise with about `cells` blobs per side: float32 (size, size, 3) in [0, 255]."""
    grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
    return np.clip(cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC), 0, 255)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: uint8 (size, size, 3) mixing noise, gradients and stripes."""
    image = _smooth_noise(rng, size, int(rng.integers(2, 6)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if rng.random() < 0.5:  # a linear gradient between two colours at a random angle
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5, 0, 1)[..., None]
        first, second = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        image = 0.5 * image + 0.5 * (first * ramp + second * (1 - ramp))
    # Mid-frequency blotches: the texture a detector must learn not to fire on.
    alpha = rng.uniform(0.15, 0.5)
    image = (1 - alpha) * image + alpha * _smooth_noise(rng, size, int(rng.integers(12, 40)))
    if rng.random() < 0.4:
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 32) / size
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period * 2 * np.pi
        wave = np.sin(phase) if rng.random() < 0.5 else np.sign(np.sin(phase))
        amplitude = (rng.uniform(10, 45) * rng.choice([-1.0, 1.0], 3)).astype(np.float32)
        image = image + wave[..., None] * amplitude
    # uint8 from here on: cv2 anti-aliases only 8-bit images.
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, class_index: int, diameter: float) -> np.ndarray:
    """Vertices float (K, 2) of one shape centred at the origin, rotated at random."""
    radius = diameter / 2
    if class_index == 0:  # circle
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        points = np.stack([np.cos(angles), np.sin(angles)], 1) * radius
    elif class_index == 1:  # rectangle; thin ones are kept out so they are not mistaken for lines
        aspect = rng.uniform(min(1.0, max(0.4, 6.0 / diameter)), 1.0)
        half = np.array([radius, radius * aspect])
        points = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    elif class_index == 2:  # triangle: corners 80-160 degrees apart, so no angle is below 40
        gaps = rng.uniform(80, 160, 2)
        angles = np.deg2rad(np.array([0.0, gaps[0], gaps[0] + gaps[1]]))
        if 360 - gaps.sum() < 80:  # the third gap too: squeeze the first two evenly
            angles = np.deg2rad(np.array([0.0, 120.0, 240.0]) + rng.uniform(-15, 15, 3))
        points = np.stack([np.cos(angles), np.sin(angles)], 1) * radius * rng.uniform(0.85, 1.0, (3, 1))
    else:  # star with 5 or 6 points
        num_points = int(rng.integers(5, 7))
        angles = np.linspace(0, 2 * np.pi, 2 * num_points, endpoint=False)
        radii = np.where(np.arange(2 * num_points) % 2 == 0, radius, radius * rng.uniform(0.38, 0.55))
        points = np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
    theta = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return points @ rotation.T


def _draw(canvas: np.ndarray, points: np.ndarray, color, thickness: int, line_type: int) -> np.ndarray:
    """Draws a closed polygon (float (K, 2) pixels), filled when thickness is 0; returns canvas."""
    fixed = [np.round(points * (1 << SHIFT)).astype(np.int32)]
    if thickness == 0:
        return cv2.fillPoly(canvas, fixed, color, line_type, shift=SHIFT)
    return cv2.polylines(canvas, fixed, True, color, thickness, line_type, shift=SHIFT)


def _occlusion_ok(idmap: np.ndarray, mask: np.ndarray, ink: list[int]) -> bool:
    """True when covering `mask` leaves every object in `idmap` at least MIN_VISIBLE visible."""
    covered = idmap[mask]
    if not covered.any():
        return True
    lost = np.bincount(covered, minlength=len(ink) + 1)[1:]
    visible = np.bincount(idmap.ravel(), minlength=len(ink) + 1)[1:]
    return bool(np.all(visible - lost >= MIN_VISIBLE * np.asarray(ink)))


def _pick_color(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    """A random colour that stands out from the mean of the pixels it will cover."""
    under = canvas[mask].mean(0)
    best, best_distance = None, -1.0
    for _ in range(12):
        color = rng.uniform(0, 255, 3)
        distance = float(np.linalg.norm(color - under))
        if distance > best_distance:
            best, best_distance = color, distance
        if distance >= MIN_CONTRAST:
            break
    return tuple(int(c) for c in np.round(best))


def _sample_diameter(rng: np.random.Generator, scale: float) -> float:
    """Object size in pixels: SMALL_SHARE small (8-16 px at 256), the rest log-uniform 16-100 px."""
    if rng.random() < SMALL_SHARE:
        diameter = rng.uniform(8, 16) * scale
    else:
        diameter = float(np.exp(rng.uniform(np.log(16), np.log(100)))) * scale
    return max(diameter, 8.0)  # smaller is noise, not a shape, at any image size


def _place_object(rng: np.random.Generator, canvas: np.ndarray, idmap: np.ndarray, ink: list[int],
                  placed: list[dict]) -> dict | None:
    """Draws one labelled shape where it hides no object below MIN_VISIBLE; None if no room."""
    size, scale = canvas.shape[0], canvas.shape[0] / 256
    class_index = int(rng.integers(len(CLASS_NAMES)))
    diameter = _sample_diameter(rng, scale)
    polygon = _shape_polygon(rng, class_index, diameter)
    outlined = diameter >= 24 * scale and rng.random() < 0.25
    thickness = int(rng.integers(2, max(3, round(diameter / 10) + 1))) if outlined else 0
    low, high = -polygon.min(0) + 1, size - 2 - polygon.max(0)
    for _ in range(20):
        center = rng.uniform(low, high)
        if placed and rng.random() < 0.35:  # deliberately overlap a neighbour
            other = placed[int(rng.integers(len(placed)))]
            direction = rng.normal(size=2)
            reach = (other["radius"] + diameter / 2) * rng.uniform(0.55, 1.0)
            center = np.clip(other["center"] + direction / np.linalg.norm(direction) * reach, low, high)
        points = polygon + center
        mask = _draw(np.zeros(idmap.shape, np.uint8), points, 1, thickness, cv2.LINE_8).astype(bool)
        if mask.sum() < 12 or not _occlusion_ok(idmap, mask, ink):
            continue
        color = _pick_color(rng, canvas, mask)
        _draw(canvas, points, color, thickness, cv2.LINE_AA)
        idmap[mask] = len(ink) + 1
        ink.append(int(mask.sum()))
        silhouette = _draw(np.zeros(idmap.shape, np.uint8), points, 1, 0, cv2.LINE_8)
        return {"class_index": class_index, "color": color, "filled": thickness == 0, "center": center,
                "radius": diameter / 2, "silhouette": int(silhouette.sum())}
    return None


def _draw_distractor(rng: np.random.Generator, canvas: np.ndarray, color, thin: bool) -> None:
    """Draws one unlabelled line, arc, zigzag or (under the shapes only) lumpy blob."""
    size = canvas.shape[0]
    kind = rng.choice(["line", "arc", "zigzag"] if thin else ["line", "arc", "zigzag", "blob", "blob"])
    thickness = int(rng.integers(1, 3 if thin else 5))
    if kind == "line":
        start, end = rng.uniform(-0.2, 1.2, (2, 2)) * size
        start, end = (tuple(int(v) for v in np.round(p * (1 << SHIFT))) for p in (start, end))
        cv2.line(canvas, start, end, color, thickness, cv2.LINE_AA, shift=SHIFT)
    elif kind == "arc":  # spans under 220 degrees so an arc never reads as an outlined circle
        center = tuple(int(v) for v in rng.uniform(0, size, 2))
        axes = tuple(int(v) for v in rng.uniform(10, 0.5 * size, 2))
        start = rng.uniform(0, 360)
        cv2.ellipse(canvas, center, axes, rng.uniform(0, 180), start, start + rng.uniform(40, 220),
                    color, thickness, cv2.LINE_AA)
    elif kind == "zigzag":
        steps = rng.normal(0, size / 6, (int(rng.integers(3, 6)), 2))
        points = rng.uniform(0, size, (1, 2)) + np.cumsum(steps, 0)
        cv2.polylines(canvas, [np.round(points * (1 << SHIFT)).astype(np.int32)], False, color, thickness,
                      cv2.LINE_AA, shift=SHIFT)
    else:  # a semi-transparent lumpy blob: round-ish but never a clean circle
        angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        lumps = sum(rng.uniform(0.12, 0.25) * np.sin(k * angles + rng.uniform(0, 2 * np.pi))
                    for k in (2, 3, 5))
        radius = rng.uniform(8, 40) * size / 256 * (1 + lumps)
        points = rng.uniform(0, size, 2) + np.stack([np.cos(angles), np.sin(angles)], 1) * radius[:, None]
        layer = _draw(canvas.copy(), points, color, 0, cv2.LINE_AA)
        alpha = rng.uniform(0.35, 0.8)
        canvas[:] = cv2.addWeighted(canvas, 1 - alpha, layer, alpha, 0)


def _draw_over(rng: np.random.Generator, canvas: np.ndarray, idmap: np.ndarray, ink: list[int]) -> None:
    """Draws thin distractors across the shapes, skipping any that would hide too much of one."""
    for _ in range(int(rng.integers(0, 4))):
        layer = np.zeros(idmap.shape + (3,), np.uint8)
        _draw_distractor(rng, layer, (255, 255, 255), thin=True)
        mask = layer[..., 0] > 127
        color = rng.uniform(0, 255, 3).astype(np.float32)
        if _occlusion_ok(idmap, mask, ink):
            touched = layer[..., 0] > 0
            weight = layer[touched].astype(np.float32) / 255  # the anti-aliased coverage of the line
            canvas[touched] = np.round(canvas[touched] * (1 - weight) + color * weight).astype(np.uint8)
            idmap[mask] = 0


def render_image(rng: np.random.Generator, image_size: int = 256) -> tuple[np.ndarray, list[RenderedObject]]:
    """Renders one image of shapes.

    Args:
        rng: The only source of randomness; the same generator state gives the same image.
        image_size: Side of the square image in pixels; object sizes scale with it (base 256).

    Returns:
        The image, uint8 (image_size, image_size, 3) in cv2's BGR order, and its labelled objects.
    """
    canvas = _background(rng, image_size)
    for _ in range(int(rng.integers(2, 9))):
        _draw_distractor(rng, canvas, tuple(int(c) for c in rng.integers(0, 256, 3)), thin=False)
    idmap = np.zeros((image_size, image_size), np.int64)  # which object each pixel shows, 0 = none
    ink: list[int] = []
    placed: list[dict] = []
    num_objects = 0 if rng.random() < 0.03 else int(rng.integers(2, 9))  # a few pure negatives
    for _ in range(num_objects):
        shape = _place_object(rng, canvas, idmap, ink, placed)
        if shape is not None:
            placed.append(shape)
    _draw_over(rng, canvas, idmap, ink)
    noisy = canvas + rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(2, 9))
    if rng.random() < 0.25:
        noisy = cv2.GaussianBlur(noisy, (3, 3), rng.uniform(0.5, 1.0))
    image = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    objects = []
    for index, shape in enumerate(placed, start=1):
        mask = idmap == index
        x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
        visible = float(mask.sum() / ink[index - 1])
        area = float(round(shape["silhouette"] * visible))
        objects.append(RenderedObject(shape["class_index"], (x, y, w, h), area, shape["color"],
                                      shape["filled"], visible, mask))
    return image, objects
