"""Inference: streams batched as they arrive with results in order, AutoBatch for inference, fused Conv+BN."""

import contextlib
import functools
import json
import logging.handlers
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch.nn.modules.module import register_module_forward_pre_hook

import detector.api as api
from detector import Model
from detector.errors import DataError
from detector.inference.predict import inference_batch
from detector.model.network import Detector
from tests.conftest import content_sensitive_detector

GIB = 2**30


@contextlib.contextmanager
def forward_batches():
    """Records the batch size of every Detector forward while active, and whether gradients were on."""
    seen: list[tuple[int, bool]] = []

    def hook(module, args):
        if isinstance(module, Detector):
            seen.append((args[0].shape[0], torch.is_grad_enabled()))

    handle = register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def crops(datasets_dir):
    """Square 128 px views of coco8's val images (no letterbox padding, so scores follow the content)."""
    images = []
    for path in sorted((datasets_dir / "coco8" / "images" / "val").glob("*.jpg")):
        image = cv2.imread(str(path))
        side = min(image.shape[:2])
        for left in (0, image.shape[1] - side):
            images.append(cv2.resize(image[:side, left:left + side], (128, 128), interpolation=cv2.INTER_AREA))
    return images  # 8 frames


def test_a_stream_is_batched_as_it_arrives_and_results_come_in_order(coco8_checkpoint, crops):
    def camera():  # a stream with hiccups: 3 frames, a pause, 3 frames, a pause, 2 frames
        for index, image in enumerate(crops):
            yield image
            if index in (2, 5):
                time.sleep(0.8)

    model = Model(coco8_checkpoint)
    with forward_batches() as seen:
        results = list(model.predict(camera(), batch=8, max_wait_ms=200, conf=0.45, stream=True))
    assert [r.index for r in results] == list(range(8))
    assert all(r.image is image for r, image in zip(results, crops, strict=True))  # each result is its frame's
    sizes = [size for size, _ in seen]
    # The first batch went 0.2 s after frame 0 with the 3 frames before the pause, not waiting for 8.
    assert sizes[0] == 3 and sum(sizes) == 8
    assert not any(grad for _, grad in seen)
    # Batched, the detections are those of one frame at a time.
    one_by_one = model.predict(crops, batch=1, conf=0.45)
    assert sum(len(r.scores) for r in one_by_one) > 0
    for a, b in zip(results, one_by_one, strict=True):
        assert len(a.scores) == len(b.scores)
        np.testing.assert_array_equal(a.classes, b.classes)
        np.testing.assert_allclose(a.boxes_xyxy, b.boxes_xyxy, atol=1e-3)


class InjectedMemory:
    """A memory probe whose step at batch b peaks at fixed + per_image * b bytes, and a clock at which a step
    costs 0.1 s whatever its batch (so images/s always rises and memory decides). The batch is read from the
    detector's input, so the real inference step runs."""

    name = "injected"

    def __init__(self, *, fixed=1 * GIB, per_image=0.5 * GIB, capacity=10.5 * GIB):
        self.fixed, self.per_image, self.capacity_bytes = fixed, per_image, capacity
        self.now, self._peak = 0.0, 0
        self.handle = register_module_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if isinstance(module, Detector):
            self._peak = max(self._peak, int(self.fixed + self.per_image * args[0].shape[0]))
            self.now += 0.1

    def clock(self):
        return self.now

    def reset(self):
        self._peak = 0

    def watch(self):
        return contextlib.nullcontext()

    def peak(self):
        return self._peak

    def capacity(self):
        return int(self.capacity_bytes)

    def is_oom(self, err):
        return isinstance(err, MemoryError)

    def cleanup(self):
        pass


@pytest.fixture
def injected(monkeypatch):
    memory = InjectedMemory()
    monkeypatch.setattr(api, "inference_batch", functools.partial(inference_batch, probe=memory, clock=memory.clock))
    yield memory
    memory.handle.remove()


def white_box_forward(seen_shapes: list):
    """A forward whose one detection per image is the box around its white pixels, in input pixels."""

    def forward(images: torch.Tensor):
        seen_shapes.append(tuple(images.shape))
        boxes = []
        for image in images:
            rows, cols = (image.min(dim=0).values == 255).nonzero(as_tuple=True)
            boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        return torch.tensor(boxes, dtype=torch.float32)[:, None], torch.ones(len(images), 1, 1)

    return forward


def test_predict_letterboxes_each_frame_to_its_rectangle_and_maps_boxes_back_in_order():
    from detector.inference.predict import predict

    def frame(height, width, box):
        image = np.full((height, width, 3), 40, np.uint8)
        x1, y1, x2, y2 = box
        image[y1:y2, x1:x2] = 255
        return image

    wide, tall = frame(100, 200, (20, 30, 60, 70)), frame(300, 150, (100, 150, 140, 290))
    for frames, rect, shapes in (([wide, wide], True, [(2, 3, 64, 128)]),  # 128 x 64, nothing padded
                                 ([tall, wide, tall], True, [(2, 3, 128, 64), (1, 3, 64, 128)]),  # a forward per shape
                                 ([wide, tall], False, [(2, 3, 128, 128)])):
        seen = []
        results = list(predict(white_box_forward(seen), frames, names=["white"], category_ids=[1], image_size=128,
                               batch=len(frames), rect=rect))
        assert seen == shapes
        assert [r.index for r in results] == list(range(len(frames)))
        for result, image in zip(results, frames, strict=True):
            rows, cols = (image[..., 0] == 255).nonzero()
            # Within a pixel of the input, which is 128 / 200 (wide) or 128 / 300 (tall) of the original.
            np.testing.assert_allclose(result.boxes_xyxy[0], [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1],
                                       atol=max(image.shape[:2]) / 128)


def test_frames_wait_for_a_full_batch_of_their_shape_and_results_still_come_in_order():
    """A folder of landscape and portrait photos: without max_wait_ms each forward takes a full batch of one shape
    (frames held back up to HELD_BATCHES batches); with it, each arrived group runs at once, a forward per shape.
    A frame that cannot be read still leaves the results of the frames before it."""
    from detector.errors import DataError
    from detector.inference.predict import HELD_BATCHES, predict

    def frame(height, width):
        image = np.full((height, width, 3), 40, np.uint8)
        image[height // 4:height // 2, width // 4:width // 2] = 255
        return image

    wide, tall = frame(100, 200), frame(300, 150)
    frames = [wide, tall, tall, wide, tall, wide, wide, tall, tall, wide, wide, tall]  # 6 of each, mixed
    seen = []
    results = list(predict(white_box_forward(seen), frames, names=["white"], category_ids=[1], image_size=128,
                           batch=3))
    assert sorted(seen) == [(3, 3, 64, 128)] * 2 + [(3, 3, 128, 64)] * 2  # 4 full forwards, not 8 partial ones
    assert [r.index for r in results] == list(range(12))
    assert all(r.boxes_xyxy[0, 2] - r.boxes_xyxy[0, 0] == pytest.approx(frames[r.index].shape[1] / 4, abs=2)
               for r in results)
    arrived = []
    list(predict(white_box_forward(arrived), iter(frames), names=["white"], category_ids=[1], image_size=128,
                 batch=3, max_wait_ms=10_000))  # groups of 3 as they arrive, each split by shape
    assert [size for size, *_ in arrived] == [1, 2, 2, 1, 1, 2, 2, 1]  # oldest frame's shape first
    lone = []  # one tall frame among many wide ones: it waits only while the window has room
    stream = predict(white_box_forward(lone), [tall] + [wide] * 40, names=["white"], category_ids=[1],
                     image_size=128, batch=2)
    first = next(stream)
    assert first.index == 0 and lone == [(2, 3, 64, 128)] * HELD_BATCHES + [(1, 3, 128, 64)]  # 8 results waited
    assert [r.index for r in stream] == list(range(1, 41))

    def failing():
        yield from frames[:5]
        raise DataError("cannot read image broken.jpg")

    got = []
    with pytest.raises(DataError, match="broken.jpg"):
        for result in predict(white_box_forward([]), failing(), names=["white"], category_ids=[1], image_size=128,
                              batch=3):
            got.append(result.index)
    assert got == [0, 1, 2, 3, 4]


def test_save_txt_writes_yolo_labels_that_convert_back_to_the_same_boxes(coco8_checkpoint, datasets_dir, tmp_path):
    """predict save_txt= writes each image's detections as a YOLO label file; `detector convert` (yolo_to_coco) reads
    them back as the same boxes, so predictions can be trained on (pseudo-labels) or checked in a labelling tool."""
    from detector.data.coco import CocoDataset
    from detector.data.convert import COCO80_NAMES, yolo_to_coco

    images = tmp_path / "images"
    shutil.copytree(datasets_dir / "coco8" / "images" / "val", images)
    blank = np.full((90, 120, 3), 40, np.uint8)
    cv2.imwrite(str(images / "blank.png"), blank)
    results = Model(coco8_checkpoint).predict(images, conf=0.5, save_txt=tmp_path / "labels")
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == sorted(
        f"{Path(r.path).stem}.txt" for r in results)
    found = {Path(r.path).name: r for r in results}
    assert sum(len(r.scores) for r in results) > 5
    converted = CocoDataset(images, yolo_to_coco(images, tmp_path / "labels", tmp_path / "back.json", COCO80_NAMES))
    for path, target in zip(converted.paths, converted.targets, strict=True):
        result = found[path.name]
        np.testing.assert_array_equal(target.classes, result.classes)
        np.testing.assert_allclose(target.boxes_xyxy, result.boxes_xyxy, atol=0.01)  # 6 decimals of the size
    busiest = max(results, key=lambda r: len(r.scores))
    assert busiest.to_yolo(scores=True) == "".join(f"{line} {s:.5f}\n" for line, s in zip(
        busiest.to_yolo().splitlines(), busiest.scores, strict=True))
    assert (tmp_path / "labels" / "blank.txt").read_text() == found["blank.png"].to_yolo()  # "" without detections


def test_nms_classes_keeps_only_those_and_frees_their_places():
    from detector.model.postprocess import non_max_suppression

    boxes = torch.tensor([[[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]], dtype=torch.float32)
    scores = torch.tensor([[[0.9, 0.3], [0.8, 0.4], [0.1, 0.5]]])
    everything = non_max_suppression(boxes, scores, conf=0.25, max_det=2)[0]
    assert everything.classes.tolist() == [0, 0]  # class 0's two best boxes take max_det's places
    only_one = non_max_suppression(boxes, scores, conf=0.25, max_det=2, classes=[1])[0]
    assert only_one.classes.tolist() == [1, 1] and only_one.scores.tolist() == pytest.approx([0.5, 0.4])


def _random_outputs(generator: torch.Generator, batch: int, anchors: int, classes: int):
    """Boxes with integer corners (batched_nms's class offsets stay exact) and random scores."""
    corners = torch.randint(0, 60, (batch, anchors, 2), generator=generator)
    sizes = torch.randint(1, 30, (batch, anchors, 2), generator=generator)
    return torch.cat([corners, corners + sizes], -1).float(), torch.rand(batch, anchors, classes, generator=generator)


@pytest.mark.parametrize("first", [1, 7, 50, 10_000])
def test_nms_from_the_best_candidates_first_equals_nms_over_all_of_them(monkeypatch, first):
    from torchvision.ops import batched_nms

    from detector.model import postprocess

    monkeypatch.setattr(postprocess, "FIRST_CANDIDATES", first)
    generator = torch.Generator().manual_seed(first)
    boxes, scores = _random_outputs(generator, 3, 80, 4)
    for max_det in (1, 5, 40, 300):
        found = postprocess.non_max_suppression(boxes, scores, conf=0.3, iou=0.5, max_det=max_det)
        for index, detections in enumerate(found):
            anchor, cls = (scores[index] > 0.3).nonzero(as_tuple=True)
            keep = batched_nms(boxes[index, anchor], scores[index, anchor, cls], cls, 0.5)[:max_det]
            assert torch.equal(detections.classes, cls[keep])
            assert torch.equal(detections.boxes_xyxy, boxes[index, anchor[keep]])


def test_nms_of_an_image_does_not_depend_on_its_batch_mates(monkeypatch):
    from detector.model import postprocess

    monkeypatch.setattr(postprocess, "MAX_CANDIDATES", 100)  # fewer than the crowded image's candidates
    generator = torch.Generator().manual_seed(0)
    boxes, scores = _random_outputs(generator, 2, 200, 3)
    scores[1] = scores[1] * 0.5 + 0.5  # image 1 crowded: every one of its pairs passes conf, most outscore image 0's
    alone = postprocess.non_max_suppression(boxes[:1], scores[:1], conf=0.4, max_det=50)[0]
    together = postprocess.non_max_suppression(boxes, scores, conf=0.4, max_det=50)
    assert len(alone.scores) == 50 and torch.equal(alone.scores, together[0].scores)
    assert torch.equal(together[1].scores, postprocess.non_max_suppression(boxes[1:], scores[1:], conf=0.4,
                                                                           max_det=50)[0].scores)


def test_classes_are_indices_or_names_and_a_wrong_one_is_one_config_error():
    from detector.config import class_indices
    from detector.errors import ConfigError

    names = ["person", "bicycle", "car"]
    assert class_indices(None, names) is None
    assert class_indices("0,2", names) == [0, 2]
    assert class_indices("person, car", names) == [0, 2]
    assert class_indices(["car", 1], names) == [2, 1]
    assert class_indices(1, names) == [1]
    for bad in ("3", "persn", [-1], "0,,2"):
        with pytest.raises(ConfigError, match=r"^invalid value classes=.* is not one of the 3 classes "
                                              r"\(0 person, 1 bicycle, 2 car\); give indices 0-2 or names$"):
            class_indices(bad, names)


def test_predict_classes_gives_the_detections_of_those_classes(coco8_checkpoint, crops):
    model = Model(coco8_checkpoint)
    everything = model.predict(crops, conf=0.2)
    assert all(len(r.scores) < 300 for r in everything)  # max_det does not bind: no place to free
    found = [c for r in everything for c in r.classes.tolist()]
    wanted = sorted(set(found), key=found.count)[-2:]  # the two classes found most
    chosen = model.predict(crops, conf=0.2, classes=",".join(model.names[c] for c in wanted))
    assert sum(len(r.scores) for r in chosen) < len(found)
    for a, b in zip(everything, chosen, strict=True):
        mine = np.isin(a.classes, wanted)
        np.testing.assert_array_equal(a.classes[mine], b.classes)
        np.testing.assert_allclose(a.boxes_xyxy[mine], b.boxes_xyxy, atol=1e-4)


def test_batch_minus_one_predicts_at_autobatch_choice_from_forward_only_steps(coco8_checkpoint, crops, injected):
    model = Model(coco8_checkpoint)
    frames = crops * 3  # 24 frames
    with forward_batches() as seen:
        results = model.predict(frames, batch=-1, conf=0.45, imgsz=64)
    # 60% of 10.5 GiB = 6.3 GiB; 1 GiB + 0.5 GiB/image fits 10 images.
    assert [size for size, _ in seen][-3:] == [10, 10, 4]
    assert not any(grad for _, grad in seen)  # the measured steps were forward-only, like inference
    assert [r.index for r in results] == list(range(24))
    with forward_batches() as again:
        model.predict(frames, batch=-1, conf=0.45, imgsz=64)
    assert [size for size, _ in again] == [10, 10, 4]  # the choice is remembered, not measured again
    # Fewer frames than memory allows: sampling stops at the source's length, which is the batch.
    with forward_batches() as few:
        model.predict(crops[:4], batch=-1, conf=0.45, imgsz=64)
    assert [size for size, _ in few][-1:] == [4] and max(size for size, _ in few) == 4


def test_val_batch_minus_one_is_capped_by_the_dataset_and_matches_a_fixed_batch(coco8_checkpoint, datasets_dir,
                                                                                 injected, detector_log):
    data = str(datasets_dir / "coco8" / "annotations" / "instances_val.json")
    model = Model(coco8_checkpoint)
    auto = model.val(data=data, batch=-1, conf=0.3)
    assert "on 4 images (batch 4)" in detector_log()  # 4 val images, memory for 10
    fixed = model.val(data=data, batch=1, conf=0.3)
    assert auto["metrics/mAP50-95"] == pytest.approx(fixed["metrics/mAP50-95"], abs=1e-6)


def test_val_save_json_writes_the_detections_predict_makes_in_cocos_results_format(coco8_checkpoint, datasets_dir,
                                                                                   tmp_path):
    from pycocotools.coco import COCO

    from detector.errors import DetectorError
    from detector.inference.results import coco_detections

    truth = datasets_dir / "coco8" / "annotations" / "instances_val.json"
    model = Model(coco8_checkpoint)
    with pytest.raises(DetectorError, match=f"cannot write {tmp_path}: it is a folder"):
        model.val(data=str(truth), save_json=tmp_path)
    model.val(data=str(truth), conf=0.3, batch=1, save_json=tmp_path / "out" / "predictions.json")
    saved = json.loads((tmp_path / "out" / "predictions.json").read_text())
    # pycocotools reads it (the ground truth's image ids, its category ids); a copy, as loadRes adds keys to each.
    COCO(str(truth)).loadRes([dict(d) for d in saved])
    predicted = coco_detections(model.predict(datasets_dir / "coco8" / "images" / "val", conf=0.3, batch=1))

    def key(d):
        return d["image_id"], d["category_id"], -d["score"], d["bbox"]

    # One image per forward in both, and one path from there (letterbox_to_original, coco_results): the same entries.
    assert len(saved) > 10
    assert sorted(saved, key=key) == sorted(predicted, key=key)


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_large_photo_is_decoded_smaller_and_its_boxes_come_back_in_its_own_pixels(coco8_checkpoint, datasets_dir,
                                                                                      tmp_path, orientation):
    """A 2560 x 1920 JPEG at imgsz 128 is decoded at 1/8 (320 x 240, JPEG's frequency-domain shrink, as training and
    val decode it): its detections are those of the 1/8 decode, scaled by 8; an EXIF rotation is applied to both."""
    from PIL import Image

    image = cv2.imread(str(sorted((datasets_dir / "coco8" / "images" / "val").glob("*.jpg"))[1]))
    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    big = cv2.resize(image, (2560, 1920), interpolation=cv2.INTER_CUBIC)[:, :, ::-1]
    Image.fromarray(np.ascontiguousarray(big)).save(photo, quality=90, exif=exif)
    model = Model(coco8_checkpoint)
    small = cv2.imread(str(photo), cv2.IMREAD_REDUCED_COLOR_8)
    assert small.shape[:2] == ((240, 320) if orientation == 1 else (320, 240))
    [whole], [reduced] = (model.predict(item, conf=0.3, imgsz=128) for item in (photo, small))
    assert len(whole.scores) == len(reduced.scores) > 0
    np.testing.assert_allclose(whole.scores, reduced.scores, atol=1e-6)
    np.testing.assert_allclose(whole.boxes_xyxy, reduced.boxes_xyxy * 8, atol=1e-3)
    height, width = small.shape[:2]
    assert whole.boxes_xyxy[:, 0::2].max() > width and whole.boxes_xyxy[:, 1::2].max() > height  # not clipped small


def test_validation_runs_with_the_garbage_collector_paused_and_restores_it(coco8_checkpoint, datasets_dir):
    import gc

    from detector.evaluate.metrics import paused_gc

    seen = []
    model = Model(coco8_checkpoint)
    handle = register_module_forward_pre_hook(lambda module, args: seen.append(gc.isenabled()))
    try:
        model.val(data=str(datasets_dir / "coco8" / "annotations" / "instances_val.json"), conf=0.3)
    finally:
        handle.remove()
    assert seen and not any(seen) and gc.isenabled()
    with pytest.raises(ZeroDivisionError), paused_gc():
        assert not gc.isenabled()
        _ = 1 / 0
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # a caller's own setting is kept
    finally:
        gc.enable()


def test_fused_conv_bn_computes_the_same_outputs():
    model = content_sensitive_detector(num_classes=5, seed=1)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        fused = model.fuse()
        outputs = fused(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    for out, ref in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_a_video_gives_one_result_per_frame_and_drawn_frames(coco8_checkpoint, crops, tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (128, 128))
    for image in crops[:3]:
        writer.write(image)
    writer.release()
    results = Model(coco8_checkpoint).predict(video, batch=2, conf=0.45, save_dir=tmp_path / "drawn")
    assert [(r.frame, r.index, r.path) for r in results] == [(i, i, str(video)) for i in range(3)]
    assert all(r.image.shape == (128, 128, 3) for r in results)  # a video frame cannot be read again: kept
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == [f"clip_{i:06d}.jpg" for i in range(3)]


def test_the_validation_pictures_show_the_ground_truth_and_the_detections_above_conf(datasets_dir, tmp_path):
    from detector.data.coco import CocoDataset
    from detector.data.loader import build_dataloader
    from detector.evaluate.metrics import DetectionMetrics
    from detector.evaluate.plots import plot_batch
    from detector.evaluate.validate import plot_validation

    root = datasets_dir / "coco8"
    dataset = CocoDataset(root / "images" / "val", root / "annotations" / "instances_val.json")
    loader = build_dataloader(dataset, train=False, image_size=128, batch_size=4, workers=0)
    model = content_sensitive_detector(len(dataset.names))

    def pictures(conf):
        folder = tmp_path / f"conf{conf}"
        folder.mkdir()
        plot_validation(model, loader, DetectionMetrics(), dataset.names, folder, device=torch.device("cpu"),
                        conf=conf)
        assert (folder / "PR_curve.png").is_file()
        return (cv2.imread(str(folder / name)).astype(int) for name in ("val_batch0_labels.jpg", "val_batch0_pred.jpg"))

    bare = cv2.imread(str(plot_batch(next(iter(loader)).images, torch.zeros(0, 6), [], tmp_path / "bare.jpg")))
    labels, nothing = pictures(1.01)  # no score passes conf > 1
    assert np.array_equal(nothing, bare) and np.abs(labels - bare).mean() > 1  # coco8's boxes are drawn
    _, everything = pictures(0.0)  # every class of every anchor passes, up to 300 per image
    assert np.abs(everything - bare).mean() > np.abs(labels - bare).mean()


def test_save_dir_where_a_file_sits_is_one_config_error_naming_it(coco8_checkpoint, tmp_path):
    from detector.errors import ConfigError

    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    for save_dir in (notes, notes / "drawn"):
        with pytest.raises(ConfigError, match=f"^save_dir={save_dir} cannot be a folder: {notes} is a file; "):
            Model(coco8_checkpoint).predict(np.zeros((32, 32, 3), np.uint8), save_dir=save_dir)


def test_val_scores_a_cards_test_split_written_from_its_yolo_labels(coco8_checkpoint, datasets_dir, tmp_path):
    """An Ultralytics card with a test: folder that has only YOLO labels: split=test writes its JSON and scores it."""
    root = tmp_path / "c8"
    shutil.copytree(datasets_dir / "coco8", root)
    for image in sorted((root / "images" / "val").glob("*.jpg"))[:2]:  # a test split of 2 of the 4 val images
        for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):
            (root / kind / "test").mkdir(exist_ok=True)
            shutil.copy(root / kind / "val" / f"{image.stem}{suffix}", root / kind / "test")
    categories = json.loads((root / "annotations" / "instances_val.json").read_text())["categories"]
    card = root / "card.yaml"
    card.write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "test": "images/test",
                                    "names": [c["name"] for c in categories]}))
    model = Model(coco8_checkpoint)
    lines = logging.handlers.BufferingHandler(100)
    logging.getLogger("detector.api").addHandler(lines)
    try:
        model.val("test", data=str(card))
        model.val(data=str(card))
    finally:
        logging.getLogger("detector.api").removeHandler(lines)
    written = json.loads((root / "annotations" / "instances_test.json").read_text())
    assert len(written["images"]) == 2 and len(written["annotations"]) == sum(
        len((root / "labels" / "test" / f"{Path(i['file_name']).stem}.txt").read_text().splitlines())
        for i in written["images"])
    summaries = [r.getMessage() for r in lines.buffer if " images (batch " in r.getMessage()]
    assert summaries[0].startswith("test: ") and "on 2 images" in summaries[0]
    assert summaries[1].startswith("val: ") and "on 4 images" in summaries[1]
    with pytest.raises(DataError, match="split='dev' is not one of train, val, test"):
        model.val("dev", data=str(card))
    with pytest.raises(DataError, match="has no test split: add 'test: <image folder>'"):
        model.val("test", data=str(datasets_dir / "coco8" / "coco8.yaml"))
    with pytest.raises(DataError, match=r"the model knows 80 classes \(person, .*instances_val.json has 1 \(object"):
        model.val(data=str(card), single_cls=True)  # data whose classes are not the model's: no silent 0.0


def test_predict_marks_a_cut_short_image_and_skips_an_unreadable_one(coco8_checkpoint, datasets_dir, tmp_path,
                                                                     detector_log):
    photo = cv2.imread(str(sorted((datasets_dir / "coco8" / "images" / "val").glob("*.jpg"))[0]))
    jpeg, png = cv2.imencode(".jpg", photo)[1].tobytes(), cv2.imencode(".png", photo)[1].tobytes()
    (tmp_path / "a.jpg").write_bytes(jpeg)
    (tmp_path / "b.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (tmp_path / "c.png").write_bytes(png[:len(png) // 2])
    (tmp_path / "d.jpg").write_bytes(jpeg)
    model = Model(coco8_checkpoint)
    results = model.predict(tmp_path, conf=0.25)
    assert [(Path(r.path).name, r.index, r.incomplete) for r in results] == [
        ("a.jpg", 0, False), ("b.jpg", 1, True), ("d.jpg", 2, False)]
    log = detector_log()
    assert f"image {tmp_path / 'b.jpg'} is incomplete" in log and f"cannot read image {tmp_path / 'c.png'}" in log
    with pytest.raises(DataError, match="cannot read image .*c.png: it is cut short"):
        model.predict(tmp_path / "c.png")
