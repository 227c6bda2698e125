"""The options of the benchmarks that time a trained checkpoint on a dataset's validation images."""

from __future__ import annotations

import argparse


def checkpoint_parser(doc: str, *, batch: int, repeats: int) -> argparse.ArgumentParser:
    """--model (a trained .pt), --data (a card), --batch, --repeats (alternated passes; medians are printed) and
    --threads (torch threads; 0: one per physical core, as training chooses); the caller adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained checkpoint (.pt)")
    parser.add_argument("--data", default="coco128.yaml")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=0)
    return parser
