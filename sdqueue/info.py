"""`sdqueue info IMAGE`: print the generation parameters an image file carries (A1111 text and sdqueue's record)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import UnidentifiedImageError

from core.imagefile import read_parameters


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", type=Path, help="a PNG, JPEG or WebP file")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        info = read_parameters(args.image)
    except (OSError, UnidentifiedImageError) as exc:
        print(f"sdqueue info: cannot read {args.image}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0
    print(f"{args.image}: {info['format']} {info['width']}x{info['height']}")
    if info["parameters"] is None and info["sdqueue"] is None:
        print("no generation parameters in this file", file=sys.stderr)
        return 1
    if info["parameters"] is not None:
        print(info["parameters"])
    if info["sdqueue"] is not None:
        print("\nsdqueue record:")
        print(json.dumps(info["sdqueue"], indent=2, ensure_ascii=False))
    return 0
