"""A synthetic DP4TL world with a known answer, as .npz datasets materialized into a store.

Source: six classes, each a fixed random 8x8 pattern plus noise. Target: fresh images of source
classes 1 and 4 only, upscaled to 16x16 (so the target must be resized to the source's size).
A surrogate trained on the source must therefore select exactly classes 1 and 4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.data import DataConfig
from distill.train import TrainConfig
from dp4tl.surrogate import SurrogateConfig
from tasks.datasets import materialize_dataset

TARGET_CLASSES = [1, 4]
SURROGATE = SurrogateConfig(
    net_kwargs={"width": 8, "depth": 1},
    train=TrainConfig(epochs=8, batch_size=32, lr=0.05, schedule="cosine", augment="none"),
)


def _images(labels: np.ndarray, seed: int) -> np.ndarray:
    templates = np.random.default_rng(123).uniform(40, 215, size=(6, 8, 8, 3))
    noise = np.random.default_rng(seed).normal(0, 12, size=(len(labels), 8, 8, 3))
    return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)


def write_world(root: Path) -> tuple[Path, Path]:
    """source.npz and target.npz under root."""
    names = np.array([f"pattern-{c}" for c in range(6)])
    y_train, y_test = np.arange(6).repeat(30), np.arange(6).repeat(5)
    source = root / "source.npz"
    np.savez(
        source,
        x_train=_images(y_train, 0),
        y_train=y_train,
        x_test=_images(y_test, 1),
        y_test=y_test,
        class_names=names,
    )
    t_train, t_test = np.array(TARGET_CLASSES).repeat(12), np.array(TARGET_CLASSES).repeat(6)
    up = lambda x: x.repeat(2, axis=1).repeat(2, axis=2)  # noqa: E731
    target = root / "target.npz"
    np.savez(
        target,
        x_train=up(_images(t_train, 2)),
        y_train=(t_train == 4).astype(np.int64),
        x_test=up(_images(t_test, 3)),
        y_test=(t_test == 4).astype(np.int64),
        class_names=np.array(["one", "four"]),
    )
    return source, target


def materialize_world(root: Path, store: str):
    """(source ref, target ref) in `store`: source at 8x8, target at 16x16 (native sizes)."""
    source, target = write_world(root)
    src = materialize_dataset.fn(DataConfig(source=str(source), image_size=None), store)
    tgt = materialize_dataset.fn(DataConfig(source=str(target), image_size=None), store)
    return src, tgt
