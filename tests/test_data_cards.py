"""Data cards, the YOLO -> COCO converter, downloads from a local server and safe unzipping."""

import contextlib
import functools
import hashlib
import http.server
import json
import re
import shutil
import socket
import stat
import threading
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlunsplit

import cv2
import numpy as np
import pytest

from detector import assets
from detector.data import cards
from detector.data.cards import load_data_card
from detector.data.coco import CocoDataset
from detector.data.convert import COCO80_NAMES, COCO80_TO_91, yolo_to_coco
from detector.data.download import check_url, download, safe_extract
from detector.errors import DataError


def _boxes_by_image(json_path: Path) -> dict[int, list[tuple[int, list[float]]]]:
    data = json.loads(json_path.read_text())
    boxes = {image["id"]: [] for image in data["images"]}
    for annotation in data["annotations"]:
        boxes[annotation["image_id"]].append((annotation["category_id"], annotation["bbox"]))
    return {k: sorted(v) for k, v in boxes.items()}


def _write_card(card_path: Path, /, **keys) -> Path:
    card_path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in keys.items()) + "\n")
    return card_path


def test_shipped_coco8_card_resolves_against_the_datasets_dir(datasets_dir):
    card = load_data_card("coco8", datasets_dir)
    assert card == load_data_card("coco8.yaml", datasets_dir)
    assert card.root == datasets_dir.resolve() / "coco8"
    assert card.train_images == card.root / "images" / "train"
    assert card.val_images == card.root / "images" / "val"
    assert card.train_json.is_file() and card.val_json.is_file()
    assert card.names == COCO80_NAMES and card.settings == {}
    coco128 = load_data_card("coco128", datasets_dir)
    assert coco128.train_json == coco128.val_json == coco128.root / "annotations" / "instances_train2017.json"


def test_datasets_dir_comes_from_the_environment(datasets_dir, monkeypatch):
    monkeypatch.setenv("DETECTOR_DATASETS", str(datasets_dir))
    assert load_data_card("coco8").root == datasets_dir.resolve() / "coco8"


def test_user_card_settings_and_default_json_names(tmp_path, datasets_dir):
    shutil.copytree(datasets_dir / "coco128", tmp_path / "c128")
    card = load_data_card(_write_card(tmp_path / "mine.yaml", path="c128", train="images/train2017",
                                      imgsz=320, epochs=3), tmp_path)
    assert card.train_json == tmp_path / "c128" / "annotations" / "instances_train2017.json"
    assert card.val_images == card.train_images  # val defaults to train
    assert card.settings == {"imgsz": 320, "epochs": 3}
    assert len(card.names) == 80 and card.names[0] == "person"  # from the JSON's categories


def test_card_names_must_count_the_json_categories_and_the_json_is_parsed_once(tmp_path, datasets_dir, monkeypatch):
    shutil.copytree(datasets_dir / "coco8", tmp_path / "c8")
    parsed = []
    monkeypatch.setattr(cards.json, "load", lambda file, **kw: parsed.append(file.name) or json.loads(file.read()))
    card = load_data_card(_write_card(tmp_path / "mine.yaml", path="c8", train="images/train", val="images/val"),
                          tmp_path)
    assert len(card.names) == 80 and parsed == [str(card.train_json)]  # names from the JSON, read once
    with pytest.raises(DataError, match=r"^data card two: 'names' has 2 classes but .*instances_train\.json has 80 "
                                        r"categories; fix 'names' or leave it out$"):
        load_data_card(_write_card(tmp_path / "two.yaml", path="c8", train="images/train", val="images/val",
                                   names=["a", "b"]), tmp_path)


def test_an_ultralytics_card_without_path_is_its_own_folder(tmp_path, datasets_dir):
    """Ultralytics' own coco8.yaml (path: empty, test: empty) beside a copy of its dataset: that copy is used."""
    shutil.copytree(datasets_dir / "coco8", tmp_path / "elsewhere" / "coco8")
    card = load_data_card(tmp_path / "elsewhere" / "coco8" / "coco8.yaml", datasets_dir)
    assert card.root == tmp_path / "elsewhere" / "coco8"  # not datasets_dir / coco8, the other copy
    assert card.train_json.is_file() and card.settings == {} and card.names == COCO80_NAMES
    absent = _write_card(tmp_path / "elsewhere" / "coco8" / "nopath.yaml", train="images/train", val="images/val")
    assert load_data_card(absent, datasets_dir).root == card.root


def test_an_ultralytics_dataset_with_yolo_labels_only_trains_from_its_own_card(tmp_path, datasets_dir):
    """Images and YOLO labels with Ultralytics' unchanged card, no COCO JSON: each split's JSON is written from its
    labels, with the boxes of the shipped JSON."""
    root = tmp_path / "coco8"
    shutil.copytree(datasets_dir / "coco8", root, ignore=shutil.ignore_patterns("annotations"))
    card = load_data_card(root / "coco8.yaml", tmp_path / "unused")
    for split, json_path in (("train", card.train_json), ("val", card.val_json)):
        assert json_path == root / "annotations" / f"instances_{split}.json"
        assert _boxes_by_image(json_path).keys() == _boxes_by_image(
            datasets_dir / "coco8" / "annotations" / f"instances_{split}.json").keys()
    assert sum(len(t) for t in CocoDataset(card.train_images, card.train_json).targets) == 13


def test_a_roboflow_layout_gets_one_json_per_split(tmp_path, datasets_dir):
    """train/images + train/labels, valid/images + valid/labels, paths given from a card one folder down."""
    for split, ours in (("train", "train"), ("valid", "val")):
        shutil.copytree(datasets_dir / "coco8" / "images" / ours, tmp_path / "ds" / split / "images")
        shutil.copytree(datasets_dir / "coco8" / "labels" / ours, tmp_path / "ds" / split / "labels")
    (tmp_path / "ds" / "cards").mkdir()
    card = load_data_card(_write_card(tmp_path / "ds" / "cards" / "data.yaml", train="../train/images",
                                      val=str(tmp_path / "ds" / "valid" / "images"), names=COCO80_NAMES), tmp_path)
    assert card.train_json.name == "instances_train.json" and card.val_json.name == "instances_valid.json"
    assert len(_boxes_by_image(card.train_json)) == len(_boxes_by_image(card.val_json)) == 4
    assert _boxes_by_image(card.train_json) != _boxes_by_image(card.val_json)


@pytest.mark.parametrize("annotations", ["coco", "yolo"])
def test_a_split_listing_folders_gets_one_json_for_all_of_them(tmp_path, datasets_dir, annotations):
    """Ultralytics cards list several folders for a split (VOC's train: [images/train2012, images/train2007, ...]):
    one JSON holds them all, written from each folder's COCO JSON, or from its YOLO labels where there is none."""
    root = tmp_path / "c8"
    shutil.copytree(datasets_dir / "coco8", root, ignore=shutil.ignore_patterns(*(["annotations"] if annotations ==
                                                                                  "yolo" else [])))
    card = load_data_card(_write_card(root / "both.yaml", train=["images/train", "images/val"], val="images/val",
                                      names=COCO80_NAMES), tmp_path)
    assert card.train_images == root / "images" and card.train_json == root / "annotations/instances_train+val.json"
    assert card.val_images == root / "images" / "val" and card.merged == {
        "train": [root / "images" / "train", root / "images" / "val"]}
    both = CocoDataset(card.train_images, card.train_json)
    parts = [CocoDataset(root / "images" / split, root / "annotations" / f"instances_{split}.json")
             for split in ("train", "val")]
    assert both.paths == [path for part in parts for path in part.paths]
    assert len(set(both.image_ids)) == 8 and both.names == parts[0].names
    for ours, theirs in zip(both.targets, [t for part in parts for t in part.targets], strict=True):
        np.testing.assert_array_equal(ours.boxes_xyxy, theirs.boxes_xyxy)
        np.testing.assert_array_equal(ours.classes, theirs.classes)


def test_a_split_listed_in_a_txt_gets_a_json_of_the_listed_images(tmp_path, datasets_dir):
    """Ultralytics' coco.yaml gives its splits as .txt lists of images (./images/train2017/x.jpg per line): the JSON
    holds the listed images only, from their YOLO labels, file names relative to the folder they share; a JSON
    already at the default name (COCO's own instances_val2017.json, in Ultralytics' download) is used as it is."""
    root = tmp_path / "c8"
    shutil.copytree(datasets_dir / "coco8", root, ignore=shutil.ignore_patterns("annotations"))
    train = sorted((root / "images" / "train").glob("*.jpg"))[:3]
    val = sorted((root / "images" / "val").glob("*.jpg"))
    (root / "train.txt").write_text("".join(f"./images/train/{path.name}\n" for path in train) + "\n")
    (root / "lists").mkdir()
    (root / "lists" / "mixed.txt").write_text(f"{val[0]}\n../images/train/{train[0].name}\n")  # absolute, relative
    card = load_data_card(_write_card(root / "card.yaml", train="train.txt", val="lists/mixed.txt",
                                      names=COCO80_NAMES), tmp_path)
    assert card.train_images == root / "images" / "train"
    assert card.train_json == root / "annotations/instances_train.json"
    assert card.val_images == root / "images" and card.val_json == root / "annotations/instances_mixed.json"
    assert card.listed == {"train": root / "train.txt", "val": root / "lists" / "mixed.txt"}
    listed = CocoDataset(card.train_images, card.train_json)
    assert listed.paths == train
    assert CocoDataset(card.val_images, card.val_json).paths == [val[0], train[0]]
    whole = CocoDataset(*(lambda d: (d, yolo_to_coco(d, root / "labels" / "train", tmp_path / "all.json",
                                                     COCO80_NAMES)))(root / "images" / "train"))
    for ours, theirs in zip(listed.targets, whole.targets[:3], strict=True):
        np.testing.assert_array_equal(ours.boxes_xyxy, theirs.boxes_xyxy)
    (root / "train.txt").write_text(f"./images/train/{train[0].name}\n")  # a changed list: the JSON follows
    assert CocoDataset(*cards.split_files(load_data_card(root / "card.yaml", tmp_path), "train")).paths == train[:1]


def test_a_json_written_from_labels_follows_them_and_a_datasets_own_json_is_never_rewritten(tmp_path, datasets_dir):
    """Like Ultralytics' label cache: images or labels added, removed or edited since a JSON was written from them
    get it written again (a merged JSON too); a JSON the dataset came with has no stamp and stays as it is."""
    root = tmp_path / "c8"
    shutil.copytree(datasets_dir / "coco8", root)
    (root / "annotations" / "instances_val.json").unlink()  # val: from its labels; train: the dataset's own
    card_path = _write_card(root / "card.yaml", train="images/train", val="images/val", names=COCO80_NAMES)
    both_path = _write_card(root / "both.yaml", train=["images/train", "images/val"], val="images/val",
                            names=COCO80_NAMES)

    def boxes(card_path, split="val"):
        return {Path(p).name: len(t) for p, t in zip(*(lambda d: (d.paths, d.targets))(CocoDataset(
            *cards.split_files(load_data_card(card_path, tmp_path), split))), strict=True)}

    before, merged_before = boxes(card_path), boxes(both_path, "train")
    assert len(before) == 4 and len(merged_before) == 8
    own = (root / "annotations" / "instances_train.json").read_bytes()
    label = sorted((root / "labels" / "val").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")  # one box more
    shutil.copy(root / "images" / "val" / f"{label.stem}.jpg", root / "images" / "val" / "added.jpg")  # a negative
    for path in (root / "labels" / "train").glob("*.txt"):
        path.write_text("")  # the train split's own JSON ignores its labels
    after = boxes(card_path)
    assert after == {**before, f"{label.stem}.jpg": before[f"{label.stem}.jpg"] + 1, "added.jpg": 0}
    assert boxes(both_path, "train") == {**merged_before, **after}
    assert (root / "annotations" / "instances_train.json").read_bytes() == own
    stamp = root / "annotations" / "instances_val.json.sources"
    written = stamp.stat().st_mtime_ns
    assert boxes(card_path) == after and stamp.stat().st_mtime_ns == written  # unchanged: not written again


@pytest.mark.parametrize(("line", "problem"), [
    ("./images/train/missing.jpg", r"list.txt:2: the image .*missing.jpg does not exist; fix the line or remove it"),
    ("./labels/train/x.txt", r"list.txt:2: './labels/train/x.txt' is not an image file"),
])
def test_a_bad_line_in_an_image_list_names_the_list_and_line(tmp_path, datasets_dir, line, problem):
    root = tmp_path / "c8"
    shutil.copytree(datasets_dir / "coco8", root, ignore=shutil.ignore_patterns("annotations"))
    first = sorted((root / "images" / "train").glob("*.jpg"))[0].name
    (root / "list.txt").write_text(f"./images/train/{first}\n{line}\n")
    with pytest.raises(DataError, match=problem):
        load_data_card(_write_card(root / "card.yaml", train="list.txt", names=COCO80_NAMES), tmp_path)
    with pytest.raises(DataError, match=r"data card card: the train image list .*nowhere.txt does not exist"):
        load_data_card(_write_card(root / "card.yaml", train="nowhere.txt", names=COCO80_NAMES), tmp_path)


def test_a_download_script_is_not_run_and_not_needed_when_the_images_are_there(tmp_path, datasets_dir):
    card = _write_card(tmp_path / "coco.yaml", path="coco", train="images/train", val="images/val",
                       names=COCO80_NAMES, download="from pathlib import Path\nPath('ran').touch()\n")
    with pytest.raises(DataError, match=r"dataset 'coco' not found: .*; the card's download: is a script, and no "
                                        r"code from a card is run here"):
        load_data_card(card, tmp_path)
    assert not list(tmp_path.rglob("ran")) and not (tmp_path / "coco").exists()
    shutil.copytree(datasets_dir / "coco8", tmp_path / "coco", ignore=shutil.ignore_patterns("annotations"))
    assert len(CocoDataset(*cards.split_files(load_data_card(card, tmp_path), "val"))) == 4  # from the YOLO labels


def test_merged_folders_must_share_their_classes(tmp_path, datasets_dir):
    root = tmp_path / "c8"
    shutil.copytree(datasets_dir / "coco8", root)
    val = json.loads((root / "annotations" / "instances_val.json").read_text())
    val["categories"][0]["name"] = "human"
    (root / "annotations" / "instances_val.json").write_text(json.dumps(val))
    card = _write_card(root / "both.yaml", train=["images/train", "images/val"], val="images/val")
    with pytest.raises(DataError, match=r"data card both: .*instances_val.json has other categories \(ids, names\) "
                                        r"than .*images/train's JSON; the folders of a split must share their classes"):
        load_data_card(card, tmp_path)


def test_a_split_without_json_or_labels_says_what_to_put_where(tmp_path, datasets_dir):
    root = tmp_path / "c8"
    shutil.copytree(datasets_dir / "coco8", root, ignore=shutil.ignore_patterns("annotations", "labels"))
    with pytest.raises(DataError, match=rf"instances_train.json is missing: .*or YOLO labels at {root}/labels/train"):
        load_data_card(root / "coco8.yaml", tmp_path)
    shutil.copytree(datasets_dir / "coco8" / "labels", root / "labels")
    card = _write_card(root / "nonames.yaml", train="images/train")
    with pytest.raises(DataError, match="'names' is needed to convert the YOLO labels"):
        load_data_card(card, tmp_path)


def test_a_data_card_key_that_is_no_setting_names_the_card(tmp_path, datasets_dir):
    from detector.errors import ConfigError
    from detector.train.build import resolve_config

    card = _write_card(tmp_path / "mine.yaml", path=str(datasets_dir.resolve() / "coco8"), train="images/train", foo=1)
    with pytest.raises(ConfigError, match=f"unknown key in data card {card}: 'foo'"):
        resolve_config({"data": str(card)})


def test_bare_coco_json_finds_its_images(datasets_dir):
    card = load_data_card(datasets_dir / "coco8" / "annotations" / "instances_val.json")
    # Paths come back resolved, whether DETECTOR_DATASETS was given relative or absolute.
    assert card.train_images == card.val_images == (datasets_dir / "coco8" / "images" / "val").resolve()
    assert card.train_json == card.val_json
    assert len(CocoDataset(card.val_images, card.val_json)) == 4


def test_a_bare_coco_json_finds_its_images_in_the_images_folder_beside_it_and_says_so(tmp_path, datasets_dir,
                                                                                       detector_log):
    dataset = tmp_path / "ds"
    shutil.copytree(datasets_dir / "coco8" / "images" / "val", dataset / "images")
    shutil.copy(datasets_dir / "coco8" / "annotations" / "instances_val.json", dataset / "labels.json")
    card = load_data_card(dataset / "labels.json")
    assert card.train_images == card.val_images == dataset / "images" and card.root == dataset
    assert len(CocoDataset(card.val_images, card.val_json)) == 4
    assert f"labels.json: its images are in {dataset / 'images'}" in detector_log().splitlines()
    shutil.rmtree(dataset / "images")
    json_path, where = re.escape(str(dataset / "labels.json")), re.escape(f"{dataset}, {dataset / 'images'}")
    with pytest.raises(DataError, match=rf"^the images of {json_path} \(first: \d+\.jpg\) "
                                        rf"are in none of {where}; put them in one, or name their folder in a data "
                                        r"card: train: <image folder>, train_json: .*labels\.json$"):
        load_data_card(dataset / "labels.json")


def test_generator_card_generates_the_missing_dataset(tmp_path, monkeypatch):
    import detector.data.shapes as shapes

    calls = []

    def fake_generate(root: Path) -> Path:
        calls.append(root)
        for split in ("train", "val"):
            (root / "images" / split).mkdir(parents=True)
            (root / "annotations").mkdir(exist_ok=True)
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
                {"images": [], "annotations": [], "categories": [{"id": 1, "name": "circle"}]}))
        return root

    monkeypatch.setattr(shapes, "generate_shapes", fake_generate)
    card = load_data_card("shapes", tmp_path)
    assert calls == [tmp_path / "shapes"]
    assert card.names == ["circle"] and card.settings == {"imgsz": 256, "epochs": 15}


def test_missing_dataset_without_download_names_the_folder(tmp_path):
    card = _write_card(tmp_path / "gone.yaml", path="gone", train="images/train")
    with pytest.raises(DataError, match=str(tmp_path / "gone" / "images" / "train")):
        load_data_card(card, tmp_path)


@pytest.mark.parametrize(("keys", "pattern"), [
    ({"path": "x", "val": "images/val"}, "'train'.*missing"),
    ({"path": "x", "train": 7}, "'train' must be a string"),
    ({"path": "x", "train": ["a", 3]}, r"'train' must be an image folder, a list of image folders or one \.txt list "
                                        r"of images, got \['a', 3\]$"),
    ({"path": "x", "train": ["a", "b.txt"]}, r"'train' must be .* one \.txt list of images, got \['a', 'b.txt'\]$"),
    ({"path": "x", "train": "images", "converter": "voc"}, "converter 'voc'"),
    ({"path": "x", "train": "images", "names": {"1": "a"}}, "'names' keys"),
])
def test_bad_cards_name_the_card_and_key(tmp_path, keys, pattern):
    with pytest.raises(DataError, match=rf"data card bad: {pattern}"):
        load_data_card(_write_card(tmp_path / "bad.yaml", **keys), tmp_path)


def test_unreadable_yaml_and_unknown_card(tmp_path):
    (tmp_path / "broken.yaml").write_text("path: [unclosed\n")
    with pytest.raises(DataError, match="cannot read data card"):
        load_data_card(tmp_path / "broken.yaml", tmp_path)
    with pytest.raises(DataError, match="coco8"):  # the message lists the shipped cards
        load_data_card("no_such_card", tmp_path)


@pytest.mark.parametrize("split", ["train", "val"])
def test_converter_reproduces_coco8_annotations(tmp_path, datasets_dir, split):
    root = datasets_dir / "coco8"
    out = yolo_to_coco(root / "images" / split, root / "labels" / split, tmp_path / "out.json", COCO80_NAMES)
    expected = _boxes_by_image(root / "annotations" / f"instances_{split}.json")
    produced = _boxes_by_image(out)
    assert produced.keys() == expected.keys()
    for image_id, boxes in expected.items():
        assert [c for c, _ in produced[image_id]] == [c for c, _ in boxes]
        np.testing.assert_allclose([b for _, b in produced[image_id]], [b for _, b in boxes], atol=0.5)
    categories = json.loads(out.read_text())["categories"]
    assert [c["id"] for c in categories] == COCO80_TO_91 and not list(tmp_path.glob(".*tmp"))


def test_converter_skips_labels_without_images_and_keeps_negatives(tmp_path, datasets_dir):
    root = datasets_dir / "coco128"
    out = yolo_to_coco(root / "images" / "train2017", root / "labels" / "train2017", tmp_path / "o.json",
                       COCO80_NAMES)
    boxes = _boxes_by_image(out)
    assert len(boxes) == 128 and sum(len(v) for v in boxes.values()) == 929
    assert boxes[250] == [] and 656 not in boxes


def _zip_folder(zip_path: Path, folder: Path, arcroot: str, skip: str = "annotations") -> None:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and skip not in path.parts:
                archive.write(path, f"{arcroot}/{path.relative_to(folder).as_posix()}")


@contextlib.contextmanager
def _local_server(folder: Path, redirects: dict[str, str] | None = None):
    """An HTTP server on 127.0.0.1 serving `folder`; yields its URL.

    It answers 302 for the paths in `redirects`, and serves /unsized/<file> without a Content-Length.
    """

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path in (redirects or {}):
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.end_headers()
                return
            if self.path.startswith("/unsized/"):  # HTTP/1.0: the body ends when the connection closes
                data = (folder / self.path.removeprefix("/unsized/")).read_bytes()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(data)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_download_convert_and_load_from_a_local_server(tmp_path, datasets_dir):
    served = tmp_path / "served"
    served.mkdir()
    _zip_folder(served / "x.zip", datasets_dir / "coco8", "coco8")  # YOLO labels only, like the real zip
    with _local_server(served) as url:
        card_path = _write_card(tmp_path / "dl.yaml", path="dl", train="images/train", val="images/val",
                                download=f"{url}/x.zip", converter="yolo", names=COCO80_NAMES)
        card = load_data_card(card_path, tmp_path / "datasets")
    assert card.root == tmp_path / "datasets" / "dl"
    assert card.train_json == card.root / "annotations" / "instances_train.json" and card.train_json.is_file()
    assert not (tmp_path / "datasets" / "dl.zip").exists()
    train = CocoDataset(card.train_images, card.train_json)
    assert len(train) == 4 and sum(len(t) for t in train.targets) == 13
    assert train.category_ids == COCO80_TO_91


def test_offline_download_failure_says_where_to_put_the_files(tmp_path):
    card = _write_card(tmp_path / "off.yaml", path="off", train="images/train",
                       download=(tmp_path / "nothing.zip").as_uri())
    folder = tmp_path / "datasets" / "off"
    with pytest.raises(DataError, match=rf"cannot download.*put the images in {folder}"):
        load_data_card(card, tmp_path / "datasets")


def _remote(scheme: str, path: str = "/coco8.zip") -> str:
    """A URL on a host off this machine. The host is under the reserved .invalid domain (RFC 2606), which never
    resolves, and conftest's _no_internet refuses any host off this machine anyway."""
    return urlunsplit((scheme, "downloads.invalid", path, "", ""))


def test_tests_cannot_reach_the_network():
    with pytest.raises(OSError, match="tests may not reach the network"):
        urllib.request.urlopen(_remote("https"), timeout=1)
    with pytest.raises(OSError, match="tests may not reach the network"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)  # by address, no name to resolve


def test_plain_http_to_other_hosts_is_refused():
    for url in (_remote("http"), _remote("ftp"), "data:,hello"):
        with pytest.raises(DataError, match="https"):
            check_url(url)
    check_url(_remote("https"))
    check_url("http://localhost:8000/coco8.zip")


def test_a_redirect_to_plain_http_is_refused(tmp_path):
    (tmp_path / "ok.zip").write_bytes(b"zip")
    plain = _remote("http", "/x.zip")
    with _local_server(tmp_path, {"/down.zip": plain, "/moved.zip": "/ok.zip"}) as url:
        with pytest.raises(DataError, match=f"refusing to download {plain}"):
            download(f"{url}/down.zip", tmp_path / "out" / "x.zip")
        assert not list((tmp_path / "out").iterdir())
        assert download(f"{url}/moved.zip", tmp_path / "out" / "y.zip").read_bytes() == b"zip"  # to http://127.0.0.1


def test_a_local_path_is_a_download_source(tmp_path, monkeypatch):
    (tmp_path / "here.zip").write_bytes(b"payload")
    assert download(str(tmp_path / "here.zip"), tmp_path / "a.zip").read_bytes() == b"payload"
    monkeypatch.chdir(tmp_path)
    assert download("here.zip", tmp_path / "b.zip").read_bytes() == b"payload"


def test_downloads_are_bounded_in_size(tmp_path):
    (tmp_path / "big.zip").write_bytes(b"x" * 5000)
    out = tmp_path / "out"
    with _local_server(tmp_path) as url:
        # Served with a Content-Length (or a local file): refused before reading.
        for source in (f"{url}/big.zip", str(tmp_path / "big.zip")):
            with pytest.raises(DataError, match="is 5000 bytes, more than the 1000 allowed"):
                download(source, out / "a.zip", max_bytes=1000)
        # Without a length up front: stopped once past the bound.
        with pytest.raises(DataError, match="larger than the 1000 bytes allowed"):
            download(f"{url}/unsized/big.zip", out / "b.zip", max_bytes=1000)
    assert not list(out.iterdir())  # no partial file left behind
    assert download(f"{(tmp_path / 'big.zip').as_uri()}", out / "c.zip", max_bytes=5000).stat().st_size == 5000


@pytest.mark.parametrize("bad_name", ["../escape.txt", "/abs/escape.txt", "ok/../../escape.txt", "C:/escape.txt"])
def test_safe_extract_rejects_entries_outside_the_target(tmp_path, bad_name):
    zip_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("fine.txt", "ok")
        archive.writestr(zipfile.ZipInfo(bad_name), "gotcha")
    target = tmp_path / "a" / "b"
    with pytest.raises(DataError, match="outside"):
        safe_extract(zip_path, target)
    assert not list(tmp_path.rglob("escape.txt")) and not (target / "fine.txt").exists()


def test_a_download_with_the_wrong_checksum_is_discarded(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"payload")
    with pytest.raises(DataError, match="sha256 .* does not match the expected 00000000"):
        download(str(tmp_path / "x.zip"), tmp_path / "out" / "x.zip", sha256="0" * 64)
    assert not list((tmp_path / "out").iterdir())
    digest = hashlib.sha256(b"payload").hexdigest()
    assert download(str(tmp_path / "x.zip"), tmp_path / "out" / "x.zip", sha256=digest.upper()).is_file()


@pytest.mark.parametrize(("line", "problem"), [("0 0.5 0.5 0.2", "expected 'class cx cy w h'"),
                                               ("zero 0.5 0.5 0.2 0.2", "expected 'class cx cy w h'"),
                                               ("7 0.5 0.5 0.2 0.2", r"class 7 is not in 0\.\.1")])
def test_a_malformed_yolo_label_names_its_file_and_line(tmp_path, line, problem):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.jpg"), np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "labels" / "a.txt").write_text(f"1 0.5 0.5 0.5 0.5\n{line}\n")
    with pytest.raises(DataError, match=rf"a\.txt:2: {problem}"):
        yolo_to_coco(tmp_path / "images", tmp_path / "labels", tmp_path / "out.json", ["x", "y"])
    assert not (tmp_path / "out.json").exists()


def test_safe_extract_refuses_symbolic_links(tmp_path):
    zip_path = tmp_path / "links.zip"
    link = zipfile.ZipInfo("data/passwd")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("data/fine.txt", "ok")
        archive.writestr(link, "/etc/passwd")  # a link's content is its target
    with pytest.raises(DataError, match="'data/passwd' is a symbolic link"):
        safe_extract(zip_path, tmp_path / "out")
    assert not (tmp_path / "out" / "data").exists()


def test_safe_extract_does_not_follow_a_link_already_in_the_target(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "data").symlink_to(outside, target_is_directory=True)
    zip_path = tmp_path / "through.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("data/escape.txt", "gotcha")
    with pytest.raises(DataError, match="resolves outside"):
        safe_extract(zip_path, target)
    assert not list(outside.iterdir())


def test_a_card_with_python_tags_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    card = tmp_path / "evil.yaml"
    card.write_text(f"path: x\ntrain: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(DataError, match="cannot read data card"):
        load_data_card(card, tmp_path)
    assert not marker.exists()


def test_safe_extract_bounds_the_uncompressed_size(tmp_path):
    zip_path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\0" * 100_000)
    with pytest.raises(DataError, match="more than"):
        safe_extract(zip_path, tmp_path / "out", max_bytes=10_000)
    assert safe_extract(zip_path, tmp_path / "ok").joinpath("zeros.bin").stat().st_size == 100_000


def test_cards_dir_holds_the_shipped_cards():
    assert {p.stem for p in assets.cards_dir().glob("*.yaml")} >= {"coco8", "coco128", "shapes"}


def test_importing_the_package_asks_nothing_of_the_network_and_leaves_the_environment_alone():
    """albumentations asks PyPI for a newer version when imported, unless NO_ALBUMENTATIONS_UPDATE is set: the
    package sets it for that import alone, so a training job (offline, on a cluster) makes no request and waits
    for none, and the variable is gone again after the import (cv2 and torch set others of their own)."""
    import os
    import subprocess
    import sys

    code = ("import socket\n"
            "def refuse(*args, **kwargs):\n"
            "    raise SystemExit(f'asked the network: {args[1:]}')\n"
            "socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse\n"
            "import os\n"
            "import detector.data.augment, detector.api\n"
            "print('environment changed' if 'NO_ALBUMENTATIONS_UPDATE' in os.environ else 'no request')\n")
    env = {key: value for key, value in os.environ.items() if key != "NO_ALBUMENTATIONS_UPDATE"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "no request", result.stderr[-500:]
