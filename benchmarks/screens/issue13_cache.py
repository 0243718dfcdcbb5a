"""Decode Tiny-ImageNet-200 and CIFAR-10 at 32 px once into /tmp/i13/data.pt for the issue-13 screens.

    mkdir -p /tmp/i13 && .venv/bin/python benchmarks/screens/issue13_cache.py

Exploratory, kept so benchmarks/records/transfer_screens.jsonl can be reproduced; the
benchmarks proper are benchmarks/transfer_regime.py, dp4tl.py and krr_st.py.
"""

import os
import time

import torch

# the real data, as the tests find it: DISTILLERY_DATA or ../shared/data beside the repo
DATA = os.environ.get("DISTILLERY_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))


def per_class(x, y, k, seed, classes=None):
    """A seeded sample of k rows per class (all classes of y, or `classes`)."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in classes if classes is not None else range(int(y.max()) + 1):
        w = (y == c).nonzero().flatten()
        idx.append(w[torch.randperm(len(w), generator=g)[:k]])
    idx = torch.cat(idx)
    return x[idx], y[idx]


def main():
    torch.set_num_threads(1)
    from distill.data import DataConfig

    t = time.time()
    out = {}
    for name, cfg, splits in [
        ("tiny", DataConfig(source=f"{DATA}/tiny-imagenet-200", test_split="valid"), ("train", "valid")),
        ("cifar", DataConfig(source=f"{DATA}/cifar10"), ("train", "test")),
    ]:
        for s in splits:
            im = cfg.load(s)
            out[f"{name}_{s}"] = (im.images, im.labels, im.class_names)
            print(name, s, im.images.shape, im.images.dtype, time.time() - t, flush=True)
    torch.save(out, "/tmp/i13/data.pt")


if __name__ == "__main__":
    main()
