"""Data-loading benchmark: Tiny-ImageNet-200 train JPEGs -> uint8 32x32 -> normalized float32.

Measures `distill.data.load_images` (select, decode, resize in worker processes) and the
per-channel normalization of `distill.transforms.Preprocessor` (fit + apply), with the peak
resident memory of this process and of its decoding workers.

    python benchmarks/data_load.py --preset cpu --workers 2     # all 100,000 train images
    python benchmarks/data_load.py --preset tiny                # 5,000 images (25 per class)

Data from ../shared/data beside the repository, or DISTILLERY_DATA. The last line of output
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from distill.data import load_images
from distill.transforms import Preprocessor

PRESETS = {
    "cpu": {"per_class": None, "image_size": 32},  # the full 100k train split
    "tiny": {"per_class": 25, "image_size": 32},  # 25 x 200 classes = 5k images, seconds
}
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DISTILLERY_DATA", DEFAULT_DATA)))
    return parser


def peak_rss_mib(who: int) -> float:
    # Linux reports ru_maxrss in KiB; for RUSAGE_CHILDREN it is the largest single child.
    return resource.getrusage(who).ru_maxrss / 1024


def main() -> None:
    args = get_args_parser().parse_args()
    source = args.data / "tiny-imagenet-200"
    if not source.exists():
        sys.exit(f"Tiny-ImageNet-200 not found at {source}; pass --data or set DISTILLERY_DATA")
    preset = PRESETS[args.preset]
    workers = args.workers or len(os.sched_getaffinity(0))

    t0 = time.perf_counter()
    images = load_images(
        source, "train", image_size=preset["image_size"], per_class=preset["per_class"], num_workers=workers
    )
    decode_s = time.perf_counter() - t0
    n = len(images)
    print(
        f"decode+resize: {n} images {list(images.images.shape[1:])} in {decode_s:.2f} s "
        f"= {n / decode_s:,.0f} images/s ({workers} workers)"
    )

    t0 = time.perf_counter()
    pre = Preprocessor.fit(images.images)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = pre(images.images)
    apply_s = time.perf_counter() - t0
    assert x.dtype == torch.float32 and x.shape == images.images.shape
    print(f"normalize: fit {fit_s:.2f} s, apply {apply_s:.2f} s ({x.numel() * 4 / 2**20:.0f} MiB float32)")

    rss_self, rss_children = peak_rss_mib(resource.RUSAGE_SELF), peak_rss_mib(resource.RUSAGE_CHILDREN)
    # The children's figure includes a helper process that `import torch` forks (~0.4 GiB).
    print(f"peak RSS: {rss_self:.0f} MiB (this process), {rss_children:.0f} MiB (largest child process)")
    print(
        json.dumps(
            {
                "benchmark": "data_load",
                "preset": args.preset,
                "images": n,
                "image_size": preset["image_size"],
                "images_per_s": round(n / decode_s, 1),
                "seconds": round(decode_s, 3),
                "normalize_fit_s": round(fit_s, 3),
                "normalize_apply_s": round(apply_s, 3),
                "total_s": round(decode_s + fit_s + apply_s, 3),
                "peak_rss_mib": round(rss_self, 1),
                "peak_rss_children_mib": round(rss_children, 1),
                "workers": workers,
                "fingerprint": images.fingerprint(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
