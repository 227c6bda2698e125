"""Training speed side by side with the best-known YOLO trainer (the `ultralytics` package), same data and machine.

    python benchmarks/peer_compare.py --peer-python /work/peer-env/bin/python
        [--configs coco8-320 coco8-640 coco128-320 coco128-640 shapes-320 shapes-640] [--epochs 3]
        [--repeats 1] [--close-mosaic 0] [--work /tmp/peer-compare] [--datasets DIR] [--font TTF]
        [--variants ours peer peer-2t] [--ours KEY=VALUE ...] [--device cpu] [--batch 16]

Installs nothing: the peer runs from its own environment (`--peer-python`, a python with ultralytics).
A configuration is DATASET-IMGSZ, optionally @EPOCHS (e.g. shapes-320@15). coco8 and coco128 are copied
from `--datasets` (default $DETECTOR_DATASETS) into `--work`, since the peer writes label caches next to
the data; the embedded shapes set is rendered there and its COCO JSON converted to YOLO labels for the
peer. Every run trains the nano model from scratch at batch 16 on the CPU (or --batch, --device: a GPU
index, or batch -1 for each side's AutoBatch), in a fresh process:

    ours           this package with its defaults (threads = physical cores, workers=-1: on the CPU the
                   cores torch's threads leave, none on 2 cores; on a GPU every core but one, at most 8)
    peer           the peer's nano model built from its YAML (yolov8n.yaml), its defaults (it sets
                   cpu_count - 1 torch threads, here 1, and loads data in the main process)
    peer-2t        the same with torch forced to 2 threads

Both sides validate only after the last epoch (val=false) and draw no plots; close_mosaic is the same on
both (default 0: mosaic in every epoch, as in most of a long run). Printed per configuration:

    img/s          the train loop in steady state, data loading included: images over the time from each
                   batch's end to the next one's (from the epoch start for an epoch's first batch),
                   every batch of every epoch but the run's first (warm-up); validation is excluded
    pure           our training step alone (engine.train_step) on a batch already in memory, measured after
                   training, paired with the loop batch by batch (see paired_rates)
    loop/pure      our train loop as a fraction of our pure step rate, both over the same 12 paired batches
                   (the img/s column's loop ran minutes earlier, when the machine may have been faster or slower)
    RSS, PSS       peak resident memory of the training process, and peak of the summed proportional
                   memory of it and its loader workers (sampled every 0.25 s)
    mAP50-95       COCOeval (faster-coco-eval, as our validation; pycocotools' numbers) of each final model on
                   the validation JSON;
                   the peer's predictions come from its predict() at conf 0.001, iou 0.7, max_det 300
    ours/peer      ratios of the train-loop images/s

Times on a shared machine are noisy: use --repeats (medians are printed) and say so next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("ours", "peer", "peer-2t")
DATASETS = ("coco8", "coco128", "shapes")
FONT_NAMES = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")


def parse_config(text: str, epochs: int) -> dict:
    """'coco128-320' or 'shapes-320@15' -> {name, dataset, imgsz, epochs}."""
    head, _, epoch_text = text.partition("@")
    dataset, _, size = head.rpartition("-")
    if dataset not in DATASETS or not size.isdigit() or (epoch_text and not epoch_text.isdigit()):
        raise SystemExit(f"bad configuration {text!r}: expected DATASET-IMGSZ[@EPOCHS] with DATASET one of "
                         f"{', '.join(DATASETS)}, e.g. coco128-320 or shapes-320@15")
    return {"name": head, "dataset": dataset, "imgsz": int(size), "epochs": int(epoch_text or epochs)}


# --- preparing the data ---------------------------------------------------------------------------------

def prepare_data(work: Path, source: Path, datasets: set[str]) -> dict[str, dict]:
    """Copies/renders each dataset into work/datasets and writes the peer's YAML; returns paths per dataset."""
    from detector.data.cards import load_data_card

    root = work / "datasets"
    prepared = {}
    for name in sorted(datasets):
        if name != "shapes" and not (root / name).is_dir():
            shutil.copytree(source / name, root / name)
        card = load_data_card(f"{name}.yaml", datasets_dir=root)  # renders shapes on first use
        if name == "shapes":
            for images, annotations in ((card.train_images, card.train_json), (card.val_images, card.val_json)):
                write_yolo_labels(images, annotations)
        peer_yaml = work / "peer-data" / f"{name}.yaml"
        peer_yaml.parent.mkdir(parents=True, exist_ok=True)
        peer_yaml.write_text(json.dumps({"path": str(card.root), "train": str(card.train_images),
                                         "val": str(card.val_images), "names": dict(enumerate(card.names))}))
        prepared[name] = {"card": f"{name}.yaml", "peer_yaml": str(peer_yaml), "val_images": str(card.val_images),
                          "val_json": str(card.val_json)}
    return prepared


def write_yolo_labels(images_dir: Path, annotation_json: Path) -> None:
    """COCO JSON -> one YOLO label file per image (class cx cy w h, normalised) in the sibling labels/ folder."""
    data = json.loads(annotation_json.read_text())
    class_of = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    lines: dict[int, list[str]] = {image["id"]: [] for image in data["images"]}
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    for annotation in data["annotations"]:
        width, height = sizes[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        lines[annotation["image_id"]].append(f"{class_of[annotation['category_id']]} {(x + w / 2) / width:.6f} "
                                             f"{(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}")
    labels_dir = Path(str(images_dir).replace(f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"))
    labels_dir.mkdir(parents=True, exist_ok=True)
    for image in data["images"]:
        (labels_dir / Path(image["file_name"]).with_suffix(".txt").name).write_text("\n".join(lines[image["id"]]))


def install_font(work: Path, font: str | None) -> Path:
    """The peer's settings folder, holding a local TTF as the Arial.ttf it would otherwise download."""
    if font is None:
        found = [p for name in FONT_NAMES for p in Path("/usr/share/fonts").rglob(name)]
        if not found:
            raise SystemExit("no TTF font found under /usr/share/fonts: pass --font PATH (the peer needs one offline)")
        font = str(found[0])
    config_dir = work / "peer-config"
    (config_dir / "Ultralytics").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(font, config_dir / "Ultralytics" / "Arial.ttf")
    return config_dir


# --- the runs, each in its own process ------------------------------------------------------------------

def child_ours(spec: dict) -> dict:
    """Trains with this package (defaults), timing every batch; then our loop and pure step paired."""
    import torch
    from loop_speed import paired_rates  # benchmarks/ is this script's folder, first on sys.path

    from detector.train import engine
    from detector.train import trainer as trainer_module

    batches, epoch_starts = [], []
    train_step, train_one_epoch = engine.train_step, trainer_module.train_one_epoch

    def timed_step(ctx, images, targets):
        items = train_step(ctx, images, targets)
        batches.append((len(epoch_starts) - 1, time.perf_counter(), len(images)))
        return items

    def timed_epoch(*args, **kwargs):
        epoch_starts.append(time.perf_counter())
        return train_one_epoch(*args, **kwargs)

    engine.train_step, trainer_module.train_one_epoch = timed_step, timed_epoch
    run = trainer_module.Trainer({"data": spec["card"], "model": "n", "imgsz": spec["imgsz"], "batch": spec["batch"],
                                  "epochs": spec["epochs"], "device": spec["device"],
                                  "close_mosaic": spec["close_mosaic"],
                                  "val": False, "plots": False, "project": spec["project"], "name": spec["run"],
                                  "exist_ok": True, **spec["ours_overrides"]})
    metrics = run.fit()
    engine.train_step = train_step
    loop, pure, _ = paired_rates(run, mosaic=spec["close_mosaic"] == 0, first_epoch=spec["epochs"])
    return {"batches": batches, "epoch_starts": epoch_starts, "threads": torch.get_num_threads(),
            "workers": run.loader(True).num_workers, "pure": pure, "loop_over_pure": loop / pure,
            "map50_95": metrics["metrics/mAP50-95"]}


def child_peer(spec: dict) -> dict:
    """Trains the peer's nano model (its defaults; torch threads forced when spec['threads']), timing every
    batch; then its predictions on the validation images for COCOeval."""
    import torch
    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS, torch_utils

    SETTINGS.update({"sync": False})
    if spec["threads"]:
        torch_utils.NUM_THREADS = spec["threads"]  # what its select_device() passes to torch.set_num_threads
    batches, epoch_starts, seen = [], [], {}

    def epoch_start(trainer):
        epoch_starts.append(time.perf_counter())

    def batch_end(trainer):
        # The batch is a local of the peer's loop: its size follows from its place in the epoch (no drop_last).
        epoch = len(epoch_starts) - 1
        index = sum(1 for b in batches if b[0] == epoch)
        size = trainer.batch_size
        count = min(size, len(trainer.train_loader.dataset) - size * index)
        batches.append((epoch, time.perf_counter(), count))
        seen.setdefault("threads", torch.get_num_threads())
        seen.setdefault("workers", trainer.train_loader.num_workers)

    model = YOLO("yolov8n.yaml")
    model.add_callback("on_train_epoch_start", epoch_start)
    model.add_callback("on_train_batch_end", batch_end)
    model.train(data=spec["peer_yaml"], imgsz=spec["imgsz"], batch=spec["batch"], epochs=spec["epochs"],
                device=spec["device"],
                close_mosaic=spec["close_mosaic"], val=False, plots=False, project=spec["project"],
                name=spec["run"], exist_ok=True, verbose=False)
    own_map = float(model.trainer.metrics.get("metrics/mAP50-95(B)", float("nan")))
    best = YOLO(str(model.trainer.best))
    sources = sorted(str(p) for p in Path(spec["val_images"]).iterdir() if p.suffix.lower() in (".jpg", ".png"))
    detections = []
    for result in best.predict(sources, imgsz=spec["imgsz"], conf=0.001, iou=0.7, max_det=300, device=spec["device"],
                               batch=16, stream=True, verbose=False):
        boxes = result.boxes
        for box, score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True):
            detections.append({"file_name": Path(result.path).name, "class": int(cls), "score": score,
                               "box_xyxy": box})
    return {"batches": batches, "epoch_starts": epoch_starts, **seen, "peer_map50_95": own_map,
            "detections": detections}


def run_child(variant: str, spec: dict, work: Path, peer_python: str, env: dict) -> dict:
    """Runs one training in a fresh process; returns its result with the sampled peak memory (MiB)."""
    spec_path = work / "specs" / f"{spec['run']}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    python = sys.executable if variant == "ours" else peer_python
    log = open(work / "logs" / f"{spec['run']}.log", "w")
    process = subprocess.Popen([python, __file__, "--child", variant, str(spec_path)], stdout=log,
                               stderr=subprocess.STDOUT, env=env, cwd=work)
    peaks = sample_peak_memory(process)
    log.close()
    if process.returncode != 0:
        raise SystemExit(f"{variant} run {spec['run']} failed (exit {process.returncode}); see {log.name}")
    return {**json.loads(spec_path.with_suffix(".out.json").read_text()), **peaks}


def sample_peak_memory(process: subprocess.Popen, interval: float = 0.25) -> dict[str, float]:
    """Waits for `process`; returns in MiB the peak RSS of the process itself and the peak of the summed PSS
    of it and its descendants (loader workers: PSS splits the pages they share with the parent, which a sum
    of RSS would count twice)."""
    import psutil

    peaks, done = {"peak_rss_mib": 0.0, "peak_pss_mib": 0.0}, threading.Event()

    def sample():
        try:
            root = psutil.Process(process.pid)
            while not done.is_set():
                total = 0
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        memory = proc.memory_full_info()
                    except psutil.Error:
                        continue
                    total += memory.pss
                    if proc is root:
                        peaks["peak_rss_mib"] = max(peaks["peak_rss_mib"], memory.rss / 2**20)
                peaks["peak_pss_mib"] = max(peaks["peak_pss_mib"], total / 2**20)
                done.wait(interval)
        except psutil.Error:
            return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    process.wait()
    done.set()
    thread.join()
    return peaks


# --- results --------------------------------------------------------------------------------------------

def steady_rate(result: dict) -> float:
    """Train-loop images/s: every batch's time since the previous batch's end (or its epoch's start), all
    batches but the run's first."""
    images = seconds = 0.0
    previous: dict[int, float] = {}
    for index, (epoch, end, count) in enumerate(result["batches"]):
        begin = previous.get(epoch, result["epoch_starts"][epoch])
        previous[epoch] = end
        if index:
            images, seconds = images + count, seconds + end - begin
    return images / seconds if seconds else float("nan")


def peer_map(result: dict, val_json: str) -> float:
    """COCOeval mAP50-95 of the peer's detections against our validation JSON (same evaluator as ours)."""
    from detector.evaluate.metrics import coco_evaluate, load_ground_truth

    ground_truth = load_ground_truth(Path(val_json))
    image_of = {image["file_name"]: image["id"] for image in ground_truth.dataset["images"]}
    category_ids = sorted(ground_truth.getCatIds())
    detections = [{"image_id": image_of[d["file_name"]], "category_id": category_ids[d["class"]],
                   "bbox": [d["box_xyxy"][0], d["box_xyxy"][1], d["box_xyxy"][2] - d["box_xyxy"][0],
                            d["box_xyxy"][3] - d["box_xyxy"][1]], "score": d["score"]}
                  for d in result["detections"] if d["file_name"] in image_of]
    names = {c["id"]: c["name"] for c in ground_truth.dataset["categories"]}
    return coco_evaluate(ground_truth, detections, sorted(image_of.values()), names).map50_95


def summarize(config: dict, runs: dict[str, list[dict]]) -> dict:
    """Medians over repeats of each variant's figures, and the ratios."""
    def median(variant: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[variant])

    row = {"config": config["name"], "epochs": config["epochs"]}
    for variant in VARIANTS:
        row[f"{variant}_rate"] = median(variant, "rate")
        row[f"{variant}_rss"] = median(variant, "peak_rss_mib")
        row[f"{variant}_pss"] = median(variant, "peak_pss_mib")
        row[f"{variant}_map"] = median(variant, "map")
        row[f"{variant}_threads"] = runs[variant][0].get("threads")
        row[f"{variant}_workers"] = runs[variant][0].get("workers")
    row["ours_pure"] = median("ours", "pure")
    row["loop_over_pure"] = median("ours", "loop_over_pure")
    row["peer_own_map"] = median("peer", "peer_map50_95")
    row["ours_over_peer"] = row["ours_rate"] / row["peer_rate"]
    row["ours_over_peer_2t"] = row["ours_rate"] / row["peer-2t_rate"]
    return row


def print_table(rows: list[dict]) -> None:
    def triple(r: dict, key: str, form: str) -> str:
        return " / ".join(format(r[f"{v}_{key}"], form) for v in VARIANTS)

    print("\n| config | epochs | ours img/s | peer img/s | peer-2t img/s | ours pure img/s | loop/pure | ours/peer "
          "| ours/peer-2t | peak RSS MiB ours / peer / peer-2t | peak PSS with workers "
          "| mAP50-95 ours / peer / peer-2t |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['epochs']} | {r['ours_rate']:.2f} | {r['peer_rate']:.2f} "
              f"| {r['peer-2t_rate']:.2f} | {r['ours_pure']:.2f} | {r['loop_over_pure']:.2f} "
              f"| {r['ours_over_peer']:.2f} | {r['ours_over_peer_2t']:.2f} | {triple(r, 'rss', '.0f')} "
              f"| {triple(r, 'pss', '.0f')} | {triple(r, 'map', '.3f')} |")
    r = rows[0]
    print("\nthreads/workers: " + ", ".join(f"{v} {r[f'{v}_threads']}/{r[f'{v}_workers']}" for v in VARIANTS)
          + "; the peer's own mAP50-95 (its validator): "
          + ", ".join(f"{r['config']} {r['peer_own_map']:.3f}" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="python of an environment with ultralytics installed")
    parser.add_argument("--configs", nargs="+", default=[f"{d}-{s}" for d in DATASETS for s in (320, 640)])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--close-mosaic", type=int, default=0, help="epochs without mosaic at the end (both)")
    parser.add_argument("--work", default="/tmp/peer-compare", help="data copies, runs and logs")
    parser.add_argument("--datasets", default=os.environ.get("DETECTOR_DATASETS", str(REPO.parent / "shared" /
                                                                                       "datasets")))
    parser.add_argument("--font", help="a TTF file for the peer (default: found under /usr/share/fonts)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                        help="settings for our runs besides their defaults, e.g. workers=0 cache=true")
    parser.add_argument("--device", default="cpu", help="cpu, or a GPU index (both sides)")
    parser.add_argument("--batch", type=float, default=16, help="batch of both sides; -1 = each side's AutoBatch")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: VARIANT SPEC_JSON
    args = parser.parse_args()
    if args.child:
        variant, spec_path = args.child[0], Path(args.child[1])
        spec = json.loads(spec_path.read_text())
        result = child_ours(spec) if variant == "ours" else child_peer(spec)
        spec_path.with_suffix(".out.json").write_text(json.dumps(result))
        return
    if not args.peer_python or not Path(args.peer_python).is_file():
        raise SystemExit("--peer-python must name the python of an environment with ultralytics installed")
    configs = [parse_config(text, args.epochs) for text in args.configs]
    work = Path(args.work).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, Path(args.datasets), {c["dataset"] for c in configs})
    env = {**os.environ, "DETECTOR_DATASETS": str(work / "datasets"), "YOLO_OFFLINE": "1",
           "YOLO_CONFIG_DIR": str(install_font(work, args.font)), "PYTHONPATH": str(REPO)}
    runs: dict[str, dict[str, list[dict]]] = {c["name"]: {v: [] for v in VARIANTS} for c in configs}
    for repeat in range(args.repeats):
        for config in configs:
            for variant in args.variants:  # interleaved, so that a busy spell on the machine hits every variant
                spec = {**config, **data[config["dataset"]], "close_mosaic": args.close_mosaic, "device": args.device,
                        "batch": int(args.batch) if args.batch == int(args.batch) else args.batch,
                        "ours_overrides": dict(item.split("=", 1) for item in args.ours),
                        "threads": 2 if variant == "peer-2t" else 0, "project": str(work / "runs" / variant),
                        "run": f"{config['name']}-e{config['epochs']}-{variant}-r{repeat}"}
                result = run_child(variant, spec, work, args.peer_python, env)
                result["rate"] = steady_rate(result)
                result["map"] = result["map50_95"] if variant == "ours" else peer_map(result, spec["val_json"])
                runs[config["name"]][variant].append(result)
                print(f"{spec['run']}: {result['rate']:.2f} img/s, peak RSS {result['peak_rss_mib']:.0f} MiB "
                      f"(PSS with workers {result['peak_pss_mib']:.0f}), "
                      f"mAP50-95 {result['map']:.3f}" + (f", pure step {result['pure']:.2f} img/s, loop/pure "
                                                         f"{result['loop_over_pure']:.3f} (paired)"
                                                         if variant == "ours" else ""), flush=True)
                (work / "results.json").write_text(json.dumps({"runs": runs}, indent=1))  # kept if stopped early
    if set(args.variants) == set(VARIANTS):
        rows = [summarize(c, runs[c["name"]]) for c in configs]
        (work / "results.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))
        print_table(rows)
    print(f"\nraw results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
