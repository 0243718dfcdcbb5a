"""Stage `dataset`: materialize an input dataset as image-dataset Parquet in the artifact store.

Decoding happens once per (source, data config): the train and test splits are decoded,
resized, class-subset and sampled as `DataConfig` says, re-encoded losslessly (PNG) into
`train.parquet` / `test.parquet` in the Hugging Face layout, and the preprocessing fitted
on train (normalization, optional ZCA) is saved beside them as `preprocessor.safetensors`.
Every later stage reads this artifact, so all stages see identical pixels and identical
preprocessing.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
from prefect import task

from distill.data import DataConfig, ImageSet, load_images
from distill.formats import PREPROCESSOR_FILE, write_image_dataset
from distill.fsio import read_bytes, write_bytes
from distill.manifest import source_files
from distill.transforms import Preprocessor
from tasks.artifacts import ArtifactRef
from tasks.reports import run_logger
from tasks.stage import Key, Publish, StageInfo, StageRun, stage
from tasks.store import Staging

STAGE = "dataset"


def source_stamp(source: str) -> list[tuple[str, int, int]]:
    """Size and mtime of every file of a local source, so an edited source gets a new key.

    Hub names and remote URIs are identified by their name only.
    """
    stats = [(name, os.stat(path)) for name, path in source_files(source)]
    return [(name, st.st_size, st.st_mtime_ns) for name, st in stats]


class DatasetInfo(StageInfo):
    """Manifest fields of an image-dataset artifact (stage `dataset`, and `pruned`, which adds its own):
    every later stage reads sizes, classes and fingerprints from here without decoding an image."""

    rows: dict[str, int]  # images per split
    class_counts: dict[str, list[int]]  # per split, per class id
    class_names: list[str]
    image_shape: list[int]  # [channels, height, width]
    fingerprints: dict[str, str]  # per split: names the exact pixels and labels
    preprocessor: dict[str, Any] | None  # the config of preprocessor.safetensors (normalization, ZCA)


def dataset_key(data: DataConfig) -> Key:
    stamp = hashlib.sha256(repr(source_stamp(data.source)).encode()).hexdigest()[:16]
    return Key({"data": data, "source_stamp": stamp})


@task(name="validate-data", result_serializer="json")
def validate_data(data: DataConfig, min_train_per_class: int | None = None) -> dict[str, list[int]]:
    """Check source, splits, classes and per-class counts from labels only, before any long stage."""
    counts = data.check(min_train_per_class=min_train_per_class)
    run_logger().info("%s: selected images per class %s", data.source, {k: (min(v), max(v)) for k, v in counts.items()})
    return counts


@stage(STAGE, key=dataset_key, task_name="materialize-dataset")
def materialize_dataset(data: DataConfig, store: str, run: StageRun) -> Publish:
    """Decode, subset and store a dataset's train and test splits with their preprocessing."""
    train = data.load(data.train_split)
    test = data.load(data.test_split)
    run_logger().info(
        "decoded %s: %d train / %d test images, %d classes", data.source, len(train), len(test), train.num_classes
    )
    pre = Preprocessor.fit(train.images, zca=data.zca)

    def write(staging: Staging) -> DatasetInfo:
        for name, part in (("train", train), ("test", test)):
            write_image_dataset(
                staging.file(f"{name}.parquet"),
                part.images,
                part.labels,
                part.class_names,
                filesystem=staging.fs,
                extra_metadata={"source": data.source, "split": getattr(data, f"{name}_split")},
            )
        write_bytes(staging.fs, staging.file(PREPROCESSOR_FILE), pre.to_bytes())
        return DatasetInfo(
            rows={"train": len(train), "test": len(test)},
            class_counts={"train": train.class_counts().tolist(), "test": test.class_counts().tolist()},
            class_names=train.class_names,
            image_shape=list(train.images.shape[1:]),
            fingerprints={"train": train.fingerprint(), "test": test.fingerprint()},
            preprocessor=pre.config(),
        )

    return Publish(write, seeds={"sample": data.seed})


def load_split(ref: ArtifactRef, split: str) -> ImageSet:
    """One split of a materialized dataset as uint8 images (decoded with both cores)."""
    # the stored channel count, so a one-channel dataset is not read back as replicated RGB
    return load_images(str(ref.local_dir()), split, channels=DatasetInfo.of(ref).image_shape[0])


def load_preprocessor(ref: ArtifactRef) -> Preprocessor:
    art = ref.open(verify=False)
    return Preprocessor.from_bytes(read_bytes(art.fs, art.file(PREPROCESSOR_FILE)), where=art.uri)


def data_config(ref: ArtifactRef) -> dict[str, Any] | None:
    """The DataConfig a dataset artifact was materialized from (recorded in distilled sets' provenance,
    so `python -m distill.train_on` rebuilds the same real test split from the artifact alone)."""
    return ref.open(verify=False).manifest.get("config", {}).get("data")


def class_counts(ref: ArtifactRef, split: str = "train") -> list[int]:
    """Images per class of a materialized split, from the manifest (no decoding)."""
    return DatasetInfo.of(ref).class_counts[split]


def preprocessed(
    ref: ArtifactRef, split: str, pre: Preprocessor | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A split in model input space: (float images, labels, class names)."""
    pre = pre or load_preprocessor(ref)
    images = load_split(ref, split)
    return pre(images.images), images.labels, images.class_names
