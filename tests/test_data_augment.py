"""Augmentation keeps boxes on their objects; letterbox maps exactly; the loader is deterministic."""

import colorsys
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from albumentations.augmentations.pixel.functional import adjust_saturation_torchvision

from detector.data.augment import TrainTransform, letterbox, round_image_size
from detector.data.coco import CocoDataset, Target
from detector.data.colour import LinearColourJitter, colour_matrix
from detector.data.loader import Batch, DetectionDataset, Sample, TrainSampling, build_dataloader, collate, set_epoch

# Saturated colours (RGB), far from the dark background and the grey padding (114).
COLOURS = [(230, 30, 30), (30, 220, 30), (30, 30, 230), (230, 230, 30), (230, 30, 230), (30, 230, 230)]
BACKGROUND = 20


def _colour_dataset(root: Path, count: int = 6) -> CocoDataset:
    """Images of non-overlapping solid rectangles; class k is always drawn in COLOURS[k]."""
    rng = np.random.default_rng(1)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        height, width = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        image = np.full((height, width, 3), BACKGROUND, np.uint8)
        for slot, cls in enumerate(rng.choice(len(COLOURS), 3, replace=False)):
            # One rectangle per third of the width, so they never overlap.
            x1 = int(slot * width / 3 + rng.integers(0, width // 12))
            w = int(rng.integers(width // 8, width // 4))
            y1, h = int(rng.integers(0, height // 2)), int(rng.integers(height // 6, height // 2))
            image[y1:y1 + h, x1:x1 + w] = COLOURS[cls]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
        cv2.imwrite(str(images_dir / f"{image_id}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
    categories = [{"id": k + 1, "name": f"colour{k}"} for k in range(len(COLOURS))]
    json_path = root / "instances.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return CocoDataset(images_dir, json_path)


def _colour_share(image: np.ndarray, box: np.ndarray, colour) -> float:
    x1, y1, x2, y2 = np.round(box).astype(int)
    crop = image[y1:y2, x1:x2].astype(np.int32)
    return float((np.abs(crop - np.array(colour)).max(axis=2) < 40).mean())


@pytest.mark.parametrize(("mosaic", "flipud"), [(1.0, 0.0), (0.0, 0.0), (1.0, 0.5)])
def test_augmented_boxes_stay_on_their_objects(tmp_path, mosaic, flipud):
    dataset = _colour_dataset(tmp_path)
    size = 256
    transform = TrainTransform(size, mosaic=mosaic, degrees=5.0, translate=0.1, scale=0.5, shear=2.0,
                               fliplr=0.5, flipud=flipud, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)
    shares = []
    for seed in range(12):
        image, target = transform(dataset, seed % len(dataset), np.random.default_rng(seed))
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert target.boxes_xyxy.dtype == np.float32 and target.classes.dtype == np.int64
        assert (target.boxes_xyxy >= 0).all() and (target.boxes_xyxy <= size).all()
        for box, cls in zip(target.boxes_xyxy, target.classes, strict=True):
            if min(box[2:] - box[:2]) >= 10:  # a sliver cut at the border may hold a corner of a tilted edge
                shares.append(_colour_share(image, box, COLOURS[cls]))
    assert len(shares) >= 20
    # Rotation and shear enlarge the box of a rectangle (a thin one rotated 5 degrees covers about
    # half its box); a box off its object, e.g. mirrored, scores about 0.
    assert min(shares) > 0.45, shares
    assert np.median(shares) > 0.7


def test_flipud_mirrors_image_and_boxes_top_to_bottom(tmp_path):
    dataset = _colour_dataset(tmp_path)
    still = dict(mosaic=0.0, translate=0.0, scale=0.0, fliplr=0.0, hsv_h=0, hsv_s=0, hsv_v=0)
    image_a, target_a = TrainTransform(128, **still)(dataset, 0, np.random.default_rng(3))
    image_b, target_b = TrainTransform(128, flipud=1.0, **still)(dataset, 0, np.random.default_rng(3))
    assert len(target_a) >= 1 and np.array_equal(image_b, image_a[::-1])
    mirrored = target_a.boxes_xyxy[:, [0, 3, 2, 1]] * [1, -1, 1, -1] + [0, 128, 0, 128]
    np.testing.assert_allclose(target_b.boxes_xyxy, mirrored, atol=1e-3)
    np.testing.assert_array_equal(target_b.classes, target_a.classes)


def test_hsv_jitter_changes_colours_but_not_boxes(tmp_path):
    dataset = _colour_dataset(tmp_path)
    plain = TrainTransform(128, mosaic=0.0, translate=0.0, scale=0.0, fliplr=0.0, hsv_h=0, hsv_s=0, hsv_v=0)
    jitter = TrainTransform(128, mosaic=0.0, translate=0.0, scale=0.0, fliplr=0.0, hsv_h=0.5, hsv_s=0.7,
                            hsv_v=0.4)
    image_a, target_a = plain(dataset, 0, np.random.default_rng(3))
    image_b, target_b = jitter(dataset, 0, np.random.default_rng(3))
    np.testing.assert_allclose(target_a.boxes_xyxy, target_b.boxes_xyxy, atol=1e-3)
    assert np.abs(image_a.astype(int) - image_b.astype(int)).mean() > 5


def test_colour_matrix_turns_hue_about_grey_and_scales_saturation_and_value():
    grey = np.array([90.0, 90.0, 90.0])
    for hue, saturation in [(0.015, 1.7), (-0.3, 0.2), (0.5, 0.0)]:
        np.testing.assert_allclose(colour_matrix(hue, saturation, 1.0) @ grey, grey, atol=1e-9)  # grey stays grey
    np.testing.assert_allclose(colour_matrix(0.2, 0.6, 1.4) @ grey, 1.4 * grey, atol=1e-9)  # the value gain
    # A third of a turn maps red to green to blue, as HSV's hue does.
    np.testing.assert_allclose(colour_matrix(1 / 3, 1, 1), np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]), atol=1e-9)
    # A small turn moves HSV hue by about as much, averaged round the wheel (not exactly at each hue).
    shifts = []
    for start in np.linspace(0, 1, 24, endpoint=False):
        rgb = np.array(colorsys.hsv_to_rgb(start, 0.8, 0.8))
        turned = np.clip(colour_matrix(0.03, 1, 1) @ rgb, 0, 1)
        shifts.append((colorsys.rgb_to_hsv(*turned)[0] - start + 0.5) % 1 - 0.5)
    assert 0.027 < np.mean(shifts) < 0.033 and min(shifts) > 0


def test_colour_jitter_saturation_is_torchvisions_blend_with_grey():
    image = np.random.default_rng(0).integers(0, 256, (64, 48, 3), np.uint8)
    jitter = LinearColourJitter(hue=0.0, saturation=0.7, value=0.0)
    for factor in (0.3, 1.0, 1.6):
        ours = jitter.apply(image, colour_matrix(0.0, factor, 1.0).astype(np.float32))
        theirs = adjust_saturation_torchvision(image, factor)
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_letterbox_maps_boxes_and_back_exactly():
    image = np.zeros((300, 500, 3), np.uint8)
    image[100:200, 50:150] = 255
    boxes = np.array([[50, 100, 150, 200], [0, 0, 500, 300]], np.float32)
    out, mapped, scale, (pad_x, pad_y) = letterbox(image, boxes, 320)
    assert out.shape == (320, 320, 3) and scale == pytest.approx(320 / 500)
    assert pad_x == 0 and pad_y == (320 - 192) // 2
    np.testing.assert_allclose(mapped, boxes * scale + [pad_x, pad_y, pad_x, pad_y], rtol=0, atol=1e-4)
    np.testing.assert_allclose((mapped - [pad_x, pad_y, pad_x, pad_y]) / scale, boxes, atol=1e-3)
    top = int(pad_y)
    assert (out[:top] == 114).all() and (out[top + 192:] == 114).all()
    x1, y1, x2, y2 = mapped[0].round().astype(int)
    assert out[y1 + 2:y2 - 2, x1 + 2:x2 - 2].min() == 255  # the white square is where its box says
    # Into a rectangle: the same scale (the width still fills), and only the rows left over are padding.
    rect, rect_boxes, rect_scale, (rect_x, rect_y) = letterbox(image, boxes, (224, 320))
    assert rect.shape == (224, 320, 3) and rect_scale == scale and (rect_x, rect_y) == (0, (224 - 192) // 2)
    np.testing.assert_array_equal(rect[int(rect_y):int(rect_y) + 192], out[top:top + 192])
    np.testing.assert_allclose(rect_boxes, boxes * scale + [0, rect_y, 0, rect_y], atol=1e-4)
    # A rectangle narrower than the image's aspect: the width decides the scale.
    _, _, narrow_scale, (narrow_x, narrow_y) = letterbox(image, boxes, (320, 160))
    assert narrow_scale == pytest.approx(160 / 500) and narrow_x == 0 and narrow_y == (320 - 96) // 2


def test_round_image_size_rounds_up_with_a_warning(caplog):
    assert round_image_size(640) == 640
    with caplog.at_level(logging.WARNING):
        assert round_image_size(100) == 128
    assert "multiple of 32" in caplog.text


def test_collate_shapes_and_dtypes():
    samples = [
        Sample(np.zeros((64, 64, 3), np.uint8), Target(np.array([[1, 2, 3, 4]], np.float32), np.array([5])),
               9, 0.5, (0.0, 8.0), (96, 128)),
        Sample(np.ones((64, 64, 3), np.uint8), Target(np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
               25, 0.25, (4.0, 0.0), (256, 200)),
        Sample(np.ones((64, 64, 3), np.uint8), Target(np.array([[5, 6, 7, 8], [0, 0, 9, 9]], np.float32),
                                                      np.array([1, 2])), 30, 1.0, (0.0, 0.0), (64, 64)),
    ]
    batch = collate(samples)
    assert batch.images.shape == (3, 3, 64, 64) and batch.images.dtype == torch.uint8
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.images[0].sum() == 0 and bool((batch.images[1:] == 1).all())
    assert batch.targets.shape == (3, 6) and batch.targets.dtype == torch.float32
    assert batch.targets[:, 0].tolist() == [0, 2, 2] and batch.targets[:, 1].tolist() == [5, 1, 2]
    assert batch.targets[0, 2:].tolist() == [1, 2, 3, 4]
    assert batch.image_ids.tolist() == [9, 25, 30] and batch.image_ids.dtype == torch.int64
    assert batch.scales.dtype == torch.float32 and batch.pads.shape == (3, 2) and batch.pads[1, 0] == 4
    assert batch.orig_sizes.dtype == torch.int64 and batch.orig_sizes[1].tolist() == [256, 200]
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and len(moved) == 3 and moved.images.dtype == torch.uint8
    empty = collate(samples[1:2])
    assert empty.targets.shape == (0, 6)


def test_collate_in_a_worker_stacks_into_shared_memory(monkeypatch):
    # A worker's batch reaches the main process through shared memory: stacked there directly, the pickler
    # does not copy it again.
    samples = [Sample(np.full((32, 32, 3), i, np.uint8), Target(np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
                      i, 1.0, (0.0, 0.0), (32, 32)) for i in range(2)]
    assert not collate(samples).images.is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    images = collate(samples).images
    assert images.is_shared() and images.is_contiguous(memory_format=torch.channels_last)
    assert images[1].unique().tolist() == [1]


def test_val_loader_letterboxes_each_coco8_image_to_its_own_rectangle(datasets_dir):
    root = datasets_dir / "coco8"
    dataset = CocoDataset(root / "images" / "val", root / "annotations" / "instances_val.json")
    batches = list(build_dataloader(dataset, train=False, image_size=320, batch_size=2, workers=0))
    # coco8's val has two landscape and two portrait images: each pair is one batch, padded only to a multiple of 32.
    assert [tuple(b.images.shape[2:]) for b in batches] == [(256, 320), (320, 256)]
    assert [i for b in batches for i in b.image_ids.tolist()] == [42, 61, 49, 36]  # ordered by height / width
    assert sum(len(b.targets) for b in batches) == 17
    for batch in batches:
        for i, image_id in enumerate(batch.image_ids.tolist()):
            # input = original * scale + pad: the original boxes come back from the batch's targets.
            index = dataset.image_ids.index(image_id)
            boxes = batch.targets[batch.targets[:, 0] == i, 2:].numpy()
            restored = (boxes - np.tile(batch.pads[i].numpy(), 2)) / batch.scales[i].item()
            np.testing.assert_allclose(restored, dataset.targets[index].boxes_xyxy, atol=1e-2)
            assert batch.orig_sizes[i].tolist() == list(dataset.orig_size(index))
            assert batch.scales[i].item() == pytest.approx(320 / max(dataset.orig_size(index)), rel=1e-3)
    inputs = {i: image for b in batches for i, image in zip(b.image_ids.tolist(), b.images, strict=True)}
    for batch_size in (1, 3, 4):  # each image's input is its own rectangle, whatever its batch
        loader = build_dataloader(dataset, train=False, image_size=320, batch_size=batch_size, workers=0)
        sizes = [len(b.image_ids) for b in loader]
        assert sizes == sorted(sizes, reverse=True) and max(sizes) == min(batch_size, 2)  # full batches first
        for batch in loader:
            for image_id, image in zip(batch.image_ids.tolist(), batch.images, strict=True):
                assert torch.equal(image, inputs[image_id])


def test_samples_depend_on_seed_epoch_index_only(tmp_path):
    dataset = _colour_dataset(tmp_path)
    wrapped = DetectionDataset(dataset, train=True, image_size=128, seed=3)
    first = wrapped[2]
    again = wrapped[2]
    np.testing.assert_array_equal(first.image, again.image)
    wrapped.set_epoch(1)
    assert not np.array_equal(wrapped[2].image, first.image)


def test_batches_are_the_same_with_any_worker_count(tmp_path):
    dataset = _colour_dataset(tmp_path)
    batches = []
    for workers in (0, 2):
        loader = build_dataloader(dataset, train=True, image_size=128, batch_size=3, workers=workers, seed=5)
        set_epoch(loader, 2)
        batches.append([b for b in loader])
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.image_ids, b.image_ids)


def test_order_of_an_epoch_depends_on_seed_and_epoch_not_on_earlier_epochs(tmp_path):
    # What resume relies on: a fresh loader at epoch 1 gives what a loader that already ran epoch 0 gives.
    dataset = _colour_dataset(tmp_path)

    def order(loader, epoch):
        set_epoch(loader, epoch)
        return [i for batch in loader for i in batch.image_ids.tolist()]

    used = build_dataloader(dataset, train=True, image_size=64, batch_size=2, workers=0, seed=5)
    first, second = order(used, 0), order(used, 1)
    fresh = build_dataloader(dataset, train=True, image_size=64, batch_size=2, workers=0, seed=5)
    assert order(fresh, 1) == second != first
    assert sorted(first) == sorted(second) == sorted(dataset.image_ids)


def test_a_resumed_epoch_skips_the_batches_already_trained_on(tmp_path):
    dataset = _colour_dataset(tmp_path)
    loader = build_dataloader(dataset, train=True, image_size=64, batch_size=2, workers=0, seed=5)
    set_epoch(loader, 1)
    whole = list(loader)
    set_epoch(loader, 1, skip_batches=2)
    rest = list(loader)
    assert len(loader) == len(whole) - 2 == len(rest) > 0
    for a, b in zip(whole[2:], rest, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.image_ids, b.image_ids)
    set_epoch(loader, 2)  # the next epoch is whole again
    assert len(list(loader)) == len(whole)
    validation = build_dataloader(dataset, train=False, image_size=64, batch_size=2, workers=0)
    with pytest.raises(ValueError, match="only a training loader"):
        set_epoch(validation, 1, skip_batches=1)


def test_mosaic_false_uses_one_image_per_sample(tmp_path):
    dataset = _colour_dataset(tmp_path)
    sampling = TrainSampling(augment={"mosaic": 1.0, "scale": 0.0, "translate": 0.0}, mosaic=False)
    loader = build_dataloader(dataset, train=True, image_size=128, batch_size=6, workers=0, sampling=sampling)
    batch = next(iter(loader))
    for i, image_id in enumerate(batch.image_ids.tolist()):
        classes = set(batch.targets[batch.targets[:, 0] == i, 1].long().tolist())
        own = set(dataset.targets[dataset.image_ids.index(image_id)].classes.tolist())
        assert classes <= own and classes


def test_one_warp_mosaic_crop_equals_affine_then_centre_crop():
    """CenterCroppedAffine folds the crop into the warp: same draws, same pixels, same boxes as Affine + CenterCrop."""
    import albumentations as A

    from detector.data.augment import CenterCroppedAffine

    size, rng = 64, np.random.default_rng(0)
    canvas = rng.integers(0, 255, (2 * size, 2 * size, 3), dtype=np.uint8)
    corners = rng.uniform(0, 2 * size - 20, (12, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(6, 20, (12, 2))], axis=1).astype(np.float32)
    classes = np.arange(12)
    args = dict(scale=(0.5, 1.5), translate_percent=(-0.1, 0.1), rotate=(-10, 10), shear=(-5, 5),
                interpolation=cv2.INTER_LINEAR, keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=114, p=1.0)
    params = A.BboxParams(format="pascal_voc", label_fields=["classes"], clip=True, min_visibility=0.1,
                          min_width=2, min_height=2)
    two_steps = A.Compose([A.Affine(**args), A.CenterCrop(size, size)], bbox_params=params)
    one_warp = A.Compose([CenterCroppedAffine(size, **args)], bbox_params=params)
    kept = 0
    for seed in range(20):
        two_steps.set_random_seed(seed)
        one_warp.set_random_seed(seed)
        a = two_steps(image=canvas, bboxes=boxes, classes=classes)
        b = one_warp(image=canvas, bboxes=boxes, classes=classes)
        assert b["image"].shape == (size, size, 3)
        # The same warp, only its output window moved: at most a rounding step apart, almost everywhere equal.
        difference = np.abs(a["image"].astype(int) - b["image"].astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01
        assert list(a["classes"]) == list(b["classes"])
        np.testing.assert_allclose(np.reshape(a["bboxes"], (-1, 4)), np.reshape(b["bboxes"], (-1, 4)), atol=1e-3)
        kept += len(a["classes"])
    assert kept > 20  # the comparison saw boxes, not only empty crops


def test_the_affine_warps_three_channels_as_four_to_the_same_pixels():
    """The warp runs on an RGBA copy (OpenCV's fast path): the pixels of A.Affine's 3-channel warp, borders included."""
    import albumentations as A

    from detector.data.augment import PAD_VALUE, CenterCroppedAffine

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    affine = CenterCroppedAffine(64, border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE, interpolation=cv2.INTER_LINEAR)
    bordered = 0
    for _ in range(10):
        angle, scale = rng.uniform(-0.5, 0.5), rng.uniform(0.5, 1.5)
        matrix = np.array([[scale * np.cos(angle), -scale * np.sin(angle), rng.uniform(-60, 20)],
                           [scale * np.sin(angle), scale * np.cos(angle), rng.uniform(-60, 20)], [0, 0, 1]])
        fast = affine.apply(image, matrix=matrix, output_shape=(64, 64))
        plain = A.Affine.apply(affine, image, matrix=matrix, output_shape=(64, 64))
        assert fast.shape == plain.shape == (64, 64, 3)
        np.testing.assert_array_equal(fast, plain)
        bordered += (fast == PAD_VALUE).all(axis=2).any()
    assert bordered >= 3  # some warps left the image: the border fill was compared too


@pytest.mark.parametrize("mosaic", [1.0, 0.0])
def test_boxes_filtered_once_at_the_end_equal_boxes_filtered_after_every_transform(tmp_path, mosaic):
    """Training filters boxes only after its last transform: the same boxes as filtering after each one."""
    import copy

    import albumentations as A

    dataset = _colour_dataset(tmp_path, count=4)
    transform = TrainTransform(64, mosaic=mosaic, degrees=10, shear=5, translate=0.4)
    pipeline = transform._pipelines[64]
    params = copy.copy(pipeline.processors["bboxes"].params)
    assert not params.check_each_transform
    params.check_each_transform = True
    each_step = A.Compose(pipeline.transforms, bbox_params=params)
    dropped = kept = 0
    for seed in range(40):
        once = transform(dataset, seed % 4, np.random.default_rng(seed))
        transform_each = copy.copy(transform)
        transform_each._pipelines = {64: each_step}
        every = transform_each(dataset, seed % 4, np.random.default_rng(seed))
        np.testing.assert_array_equal(once[0], every[0])
        np.testing.assert_array_equal(once[1].classes, every[1].classes)
        np.testing.assert_allclose(once[1].boxes_xyxy, every[1].boxes_xyxy, atol=1e-4)
        kept += len(once[1].classes)
        dropped += 3 * (4 if mosaic else 1) - len(once[1].classes)
    assert kept > 40 and dropped > 0  # boxes were kept, and the filter removed some


def test_opencv_runs_single_threaded_where_loading_shares_cores_with_torch(tmp_path):
    """OpenCV's thread pool competes with torch's threads: a worker, or the main process training on the CPU,
    gets single-threaded OpenCV; the main process loading for a GPU keeps OpenCV's threads."""
    dataset = _colour_dataset(tmp_path, count=2)
    before = cv2.getNumThreads()
    try:
        for workers, device, expected in ((0, "cuda", 2), (1, "cuda", 1), (0, "cpu", 1), (1, "cpu", 1)):
            cv2.setNumThreads(2)
            build_dataloader(dataset, train=True, image_size=64, batch_size=2, workers=workers, device=device)
            assert cv2.getNumThreads() == expected, (workers, device)
    finally:
        cv2.setNumThreads(before)


@pytest.mark.parametrize(("device", "cores", "threads", "expected"), [
    ("cpu", 2, 2, 0),  # torch's threads compute on both cores: load in the main process
    ("cpu", 16, 8, 8),  # the SMT siblings of torch's 8 cores load
    ("cpu", 64, 32, 8),  # at most 8
    ("cuda", 2, 2, 1),  # the GPU computes: every core but the main process's loads
    ("cuda", 1, 1, 0),
])
def test_workers_minus_one_takes_the_cores_the_device_leaves_free(tmp_path, monkeypatch, caplog, device, cores,
                                                                  threads, expected):
    import detector.data.loader as loader_module

    dataset = _colour_dataset(tmp_path, count=2)
    monkeypatch.setattr(loader_module, "cpu_share", lambda: cores)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    caplog.set_level(logging.INFO)
    before = cv2.getNumThreads()
    try:
        loader = build_dataloader(dataset, train=True, image_size=64, batch_size=2, workers=-1, device=device)
    finally:
        cv2.setNumThreads(before)
    assert loader.num_workers == expected
    assert loader.pin_memory == (device == "cuda")
    assert f"workers=-1: {expected} loader processes ({cores} CPU cores" in caplog.text  # the log says what it chose


def test_mixup_blends_two_samples_pixel_for_pixel_and_keeps_the_boxes_of_both(tmp_path):
    dataset = _colour_dataset(tmp_path)
    options = dict(mosaic=1.0, degrees=3.0, translate=0.1, scale=0.3, fliplr=0.5)
    plain, mixed = TrainTransform(128, **options), TrainTransform(128, mixup=1.0, **options)
    for seed in range(4):
        # The mixed sample draws, from one generator: its own sample (as without mixup), the mixup draw, the index
        # of the second sample, that sample, then the weight.
        rng = np.random.default_rng(seed)
        image_a, target_a = plain(dataset, seed, rng)
        rng.random()
        image_b, target_b = plain(dataset, int(rng.integers(len(dataset))), rng)
        lam = rng.beta(32.0, 32.0)
        image, target = mixed(dataset, seed, np.random.default_rng(seed))
        expected = lam * image_a.astype(np.float64) + (1 - lam) * image_b.astype(np.float64)
        assert 0.3 < lam < 0.7 and image.dtype == np.uint8 and image.shape == image_a.shape
        assert np.abs(image - expected).max() <= 0.5 + 1e-3  # lam * a + (1 - lam) * b, rounded once
        assert not np.array_equal(image, image_a) and not np.array_equal(image, image_b)
        np.testing.assert_array_equal(target.boxes_xyxy, np.concatenate([target_a.boxes_xyxy, target_b.boxes_xyxy]))
        np.testing.assert_array_equal(target.classes, np.concatenate([target_a.classes, target_b.classes]))
    # mixup=0 draws nothing for it: its samples are those of a transform without the setting.
    still = TrainTransform(128, mixup=0.0, **options)(dataset, 1, np.random.default_rng(9))
    np.testing.assert_array_equal(still[0], plain(dataset, 1, np.random.default_rng(9))[0])


def test_closing_mosaic_also_closes_mixup(tmp_path):
    dataset = _colour_dataset(tmp_path)
    sampling = TrainSampling(augment={"mosaic": 0.0, "mixup": 1.0, "scale": 0.0, "translate": 0.0}, mosaic=False)
    loader = build_dataloader(dataset, train=True, image_size=128, batch_size=6, workers=0, sampling=sampling)
    batch = next(iter(loader))
    for i, image_id in enumerate(batch.image_ids.tolist()):  # each image's boxes are its own alone
        classes = batch.targets[batch.targets[:, 0] == i, 1].long().tolist()
        assert sorted(classes) == sorted(dataset.targets[dataset.image_ids.index(image_id)].classes.tolist())


def test_a_sample_made_at_another_side_is_the_same_sample_scaled(tmp_path):
    dataset = _colour_dataset(tmp_path)
    transform = TrainTransform(128, mosaic=1.0, degrees=0.0, translate=0.1, scale=0.2, hsv_h=0, hsv_s=0, hsv_v=0)
    checked = 0
    for seed in range(8):
        small, target_small = transform(dataset, seed % 6, np.random.default_rng(seed))
        large, target_large = transform(dataset, seed % 6, np.random.default_rng(seed), size=256)
        assert small.shape == (128, 128, 3) and large.shape == (256, 256, 3)
        # Each box of one is in the other with its class, at twice or half the size (the mosaic's centre is drawn in
        # whole pixels and the resampling moves edges by a pixel or so). Boxes cut by the border are left out: a
        # pixel more or less decides whether their visible part passes the 10% filter; so are slivers under 8 px.
        for source, other, factor in [(target_small, target_large, 2.0), (target_large, target_small, 0.5)]:
            side = 128 if source is target_small else 256
            for box, cls in zip(source.boxes_xyxy, source.classes, strict=True):
                if min(box) <= 1 or max(box) >= side - 1 or min(box[2:] - box[:2]) < 8 * side / 128:
                    continue
                error = np.abs(other.boxes_xyxy - factor * box).max(axis=1)
                assert ((error <= 3.0 * max(factor, 1)) & (other.classes == cls)).any(), (seed, box, cls)
                checked += 1
    assert checked >= 10


def test_scale_sides_are_the_multiples_of_32_within_the_range():
    from detector.data.batches import scale_sides

    assert scale_sides(640, 0.5) == list(range(320, 961, 32))
    assert scale_sides(640, 0.0) == [640] and scale_sides(320, 0.1) == [288, 320, 352]
    assert scale_sides(64, 0.9) == [32, 64, 96]  # never below one stride


def _sides(loader, epoch, skip=0):
    set_epoch(loader, epoch, skip_batches=skip)
    batches = list(loader)
    for batch in batches:
        side = batch.images.shape[-1]
        assert batch.images.shape[-2] == side and (batch.targets[:, 2:] <= side).all()
    return [batch.images.shape[-1] for batch in batches]


def test_multi_scale_draws_each_batch_side_from_seed_epoch_and_batch_index(tmp_path):
    dataset = _colour_dataset(tmp_path)

    def loader(rank=0, world_size=1, multi_scale=0.5):
        sampling = TrainSampling(multi_scale=multi_scale, rank=rank, world_size=world_size)
        return build_dataloader(dataset, train=True, image_size=128, batch_size=1, workers=0, seed=5,
                                sampling=sampling)

    sides = [_sides(loader(), epoch) for epoch in range(4)]
    drawn = {side for epoch in sides for side in epoch}
    assert drawn <= {64, 96, 128, 160, 192} and len(drawn) >= 3, sides
    assert _sides(loader(), 2, skip=2) == sides[2][2:]  # a resumed epoch: the same sides for the batches left
    # Under DDP each rank's k-th batch has the side of every other rank's k-th batch.
    assert _sides(loader(0, 2), 1) == _sides(loader(1, 2), 1) == sides[1][:3]
    assert {side for side in _sides(loader(multi_scale=0.0), 1)} == {128}
