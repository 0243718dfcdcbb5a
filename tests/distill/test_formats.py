"""Tests of the Parquet formats: exact round trips, compatibility with `datasets`, clear errors."""

from __future__ import annotations

import json
import os
import uuid

import fsspec
import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from distill.formats import (
    DISTILLED_DATA_FILE,
    FormatError,
    read_distilled,
    read_image_dataset,
    read_metrics,
    write_distilled,
    write_image_dataset,
    write_metrics,
)
from distill.fsio import read_json, write_json
from distill.transforms import Preprocessor
from tests.conftest import data_path

CLASSES = ["airplane", "automobile", "bird"]


def _images(n: int = 12, c: int = 3, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % len(CLASSES)


def _zca() -> Preprocessor:
    return Preprocessor.fit(_images()[0], zca=True)


def _distilled(path, **overrides) -> dict:
    g = torch.Generator().manual_seed(1)
    pre = _zca()
    args = dict(
        pixels=torch.randn(6, 3, 8, 8, generator=g) * 3,
        labels=torch.tensor([0, 0, 1, 1, 2, 2]),
        class_names=CLASSES,
        preprocessor_config=pre.config(),
        preprocessor_tensors=pre.state_dict(),
        recipe={"net": "convnet3", "epochs": 300, "optimizer": "sgd", "momentum": 0.9},
        method="mtt",
        provenance={"source": "cifar10", "experts": "0123456789abcdef", "seed": 0},
        soft_labels=torch.rand(6, 3, generator=g),
        targets=torch.randn(6, 5, generator=g),
        learned_lr=0.0123,
    )
    args.update(overrides)
    write_distilled(str(path), **args)
    return args


# ---------------------------------------------------------------- image datasets


@pytest.mark.parametrize("channels", [1, 3])
def test_image_dataset_round_trip(tmp_path, channels):
    images, labels = _images(c=channels)
    path = str(tmp_path / "train.parquet")
    assert write_image_dataset(path, images, labels, CLASSES, extra_metadata={"source": "test"}) == len(images)
    got_images, got_labels, names = read_image_dataset(path)
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels) and names == CLASSES
    schema = pq.read_schema(path)
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    assert json.loads(schema.metadata[b"huggingface"]) == {
        "info": {"features": {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}}
    }


def test_image_dataset_readable_by_datasets(tmp_path, hf_datasets):
    datasets, cache = hf_datasets
    images, labels = _images()
    path = str(tmp_path / "train.parquet")
    write_image_dataset(path, images, labels, CLASSES)
    ds = datasets.load_dataset("parquet", data_files={"train": path}, split="train", cache_dir=cache)
    assert ds.features["label"].names == CLASSES
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[4]["label"] == int(labels[4])
    assert torch.equal(torch.from_numpy(np.array(ds[4]["image"])).permute(2, 0, 1), images[4])


def test_reads_the_shared_real_data_layout(tmp_path):
    path = data_path("cifar10", "test.parquet")
    table = pq.ParquetFile(path).read_row_group(0).slice(0, 20)
    small = str(tmp_path / "cifar-head.parquet")
    pq.write_table(table, small)
    images, labels, names = read_image_dataset(small)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert names[0] == "airplane" and len(names) == 10 and labels.max() < 10


# ---------------------------------------------------------------- distilled datasets


def test_distilled_round_trip_is_exact(tmp_path):
    args = _distilled(tmp_path / "d")
    d = read_distilled(str(tmp_path / "d"))
    assert d.pixels.dtype == torch.float32 and torch.equal(d.pixels, args["pixels"])
    assert torch.equal(d.labels, args["labels"]) and d.class_names == CLASSES
    assert torch.equal(d.soft_labels, args["soft_labels"]) and torch.equal(d.targets, args["targets"])
    assert d.preprocessor_tensors.keys() == args["preprocessor_tensors"].keys()
    assert all(torch.equal(d.preprocessor_tensors[k], v) for k, v in args["preprocessor_tensors"].items())
    assert (d.recipe, d.method, d.learned_lr) == (args["recipe"], "mtt", 0.0123)
    assert (d.preprocessor_config, d.provenance) == (args["preprocessor_config"], args["provenance"])
    assert d.metadata["format"] == "distilled" and "model input space" in d.metadata["pixel_space"]
    assert sorted(os.listdir(tmp_path / "d")) == ["README.md", "data", "preprocessor.safetensors"]


def test_distilled_optional_columns_and_preview(tmp_path):
    previews = torch.full((6, 3, 8, 8), 7, dtype=torch.uint8)
    plain = Preprocessor.standard([0.5] * 3, [0.25] * 3)
    _distilled(
        tmp_path / "d",
        soft_labels=None,
        targets=None,
        learned_lr=None,
        previews=previews,
        preprocessor_config=plain.config(),
        preprocessor_tensors=plain.state_dict(),
    )
    d = read_distilled(str(tmp_path / "d"))
    assert d.soft_labels is None and d.targets is None and d.learned_lr is None
    table = pq.read_table(str(tmp_path / "d" / DISTILLED_DATA_FILE))
    assert table.column_names == ["pixels", "image", "label"]


def test_distilled_readable_by_datasets(tmp_path, hf_datasets):
    datasets, cache = hf_datasets
    args = _distilled(tmp_path / "d")
    data_file = str(tmp_path / "d" / DISTILLED_DATA_FILE)
    ds = datasets.load_dataset("parquet", data_files=data_file, split="train", cache_dir=cache)
    assert isinstance(ds.features["pixels"], datasets.Array3D) and ds.features["label"].names == CLASSES
    torch_ds = ds.with_format("torch")
    assert torch.equal(torch_ds["pixels"][:], args["pixels"])
    assert torch.equal(torch_ds[:]["soft_label"], args["soft_labels"])
    assert torch.equal(torch_ds[:]["target"], args["targets"])
    # The directory itself is a Hub-style dataset: the card's configs point at the data.
    by_dir = datasets.load_dataset(str(tmp_path / "d"), split="train", cache_dir=cache).with_format("torch")
    assert torch.equal(by_dir["pixels"][:], args["pixels"]) and by_dir.features == ds.features


def test_dataset_card_front_matter(tmp_path):
    _distilled(tmp_path / "d")
    text = (tmp_path / "d" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    card = yaml.safe_load(front)
    assert card["license"] == "other" and "mtt" in card["tags"]
    assert card["configs"][0]["data_files"][0]["path"] == "data/train-*"
    features = {f["name"]: f for f in card["dataset_info"]["features"]}
    assert features["pixels"]["dtype"]["array3_d"]["shape"] == [3, 8, 8]
    assert features["label"]["dtype"]["class_label"]["names"] == {"0": "airplane", "1": "automobile", "2": "bird"}
    assert card["dataset_info"]["splits"][0]["num_examples"] == 6
    assert "0.0123" in body and 'load_dataset("parquet"' in body and "pq.read_table" in body


def test_distilled_on_an_fsspec_filesystem():
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    root = f"/formats-{uuid.uuid4().hex}/d"
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(4, 1, 4, 4, generator=g)
    write_distilled(
        root,
        pixels=pixels,
        labels=torch.tensor([0, 1, 0, 1]),
        class_names=["a", "b"],
        preprocessor_config=Preprocessor.standard([0.5], [0.25]).config(),
        preprocessor_tensors=Preprocessor.standard([0.5], [0.25]).state_dict(),
        recipe={},
        method="krr_st",
        provenance={},
        filesystem=fs,
    )
    d = read_distilled(root, filesystem=fs)
    assert torch.equal(d.pixels, pixels) and sorted(d.preprocessor_tensors) == ["mean", "std"]


def test_write_distilled_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="soft_labels"):
        _distilled(tmp_path / "d", soft_labels=torch.rand(5, 3))
    with pytest.raises(ValueError, match="labels must lie"):
        _distilled(tmp_path / "d", labels=torch.tensor([0, 0, 1, 1, 2, 3]))


# ---------------------------------------------------------------- metrics and json


def test_metrics_round_trip(tmp_path, hf_datasets):
    rows = [
        {"method": "mtt", "ipc": 10, "seed": 0, "acc": 0.61, "wall_s": 12, "finished": True},
        {"method": "random", "ipc": 10, "seed": 0, "acc": 0.26, "wall_s": 1.5, "finished": False, "note": None},
        {"method": "dc", "ipc": np.int64(10), "seed": 1, "acc": np.float32(0.5), "wall_s": 2, "finished": np.bool_(1)},
    ]
    path = str(tmp_path / "metrics.parquet")
    assert write_metrics(path, rows, extra_metadata={"flow": "distill"}) == 3
    got = read_metrics(path)
    assert got[0] == {**rows[0], "wall_s": 12.0, "note": None} and got[1] == rows[1]
    assert got[2] == {**rows[2], "ipc": 10, "acc": 0.5, "wall_s": 2.0, "finished": True, "note": None}
    features = json.loads(pq.read_schema(path).metadata[b"huggingface"])["info"]["features"]
    assert features["ipc"] == {"dtype": "int64", "_type": "Value"} and features["wall_s"]["dtype"] == "float64"
    datasets, cache = hf_datasets
    ds = datasets.load_dataset("parquet", data_files=path, split="train", cache_dir=cache)
    assert ds[1]["method"] == "random" and ds.features["acc"].dtype == "float64"


def test_metrics_reject_unsupported_values(tmp_path):
    with pytest.raises(ValueError, match="'acc'"):
        write_metrics(str(tmp_path / "m.parquet"), [{"acc": [0.1]}])


def test_json_helpers(tmp_path):
    path = str(tmp_path / "sub" / "x.json")
    write_json(None, path, {"b": 1, "a": [1, 2]})
    assert read_json(None, path) == {"a": [1, 2], "b": 1}


# ---------------------------------------------------------------- errors


def test_truncated_file_raises_format_error(tmp_path):
    path = tmp_path / "train.parquet"
    write_image_dataset(str(path), *_images(), CLASSES)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="train.parquet.*truncated or corrupt"):
        read_image_dataset(str(path))
    with pytest.raises(FormatError, match="no such file"):
        read_metrics(str(tmp_path / "absent.parquet"))


def test_missing_column_raises_format_error(tmp_path):
    path = str(tmp_path / "train.parquet")
    write_image_dataset(path, *_images(), CLASSES)
    pq.write_table(pq.read_table(path).drop_columns(["label"]), path)
    with pytest.raises(FormatError, match=r"train.parquet: missing column\(s\) \['label'\]"):
        read_image_dataset(path)


def test_wrong_kind_and_version_raise_format_error(tmp_path):
    path = str(tmp_path / "m.parquet")
    write_metrics(path, [{"acc": 0.5}])
    with pytest.raises(FormatError, match="is a 'metrics' file, expected 'image'"):
        read_image_dataset(path)
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"distillery"] = json.dumps({"format": "metrics", "format_version": 99}).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(FormatError, match="unsupported format version 99"):
        read_metrics(path)


# ---------------------------------------------------------------- guards on outputs (issue 12 part 4)


def _guarded_write(tmp_path, pixels, **kw):
    from distill.transforms import Preprocessor

    pre = Preprocessor.fit(
        torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    )
    write_distilled(
        str(tmp_path / "set"),
        pixels=pixels,
        labels=torch.tensor([0, 1]),
        class_names=["a", "b"],
        preprocessor_config=pre.config(),
        preprocessor_tensors=pre.state_dict(),
        recipe={},
        method="t",
        provenance={},
        **kw,
    )


@pytest.mark.parametrize(
    ("mutate", "kw", "message"),
    [
        (lambda x: x.index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), {}, "NaN or infinite"),
        (lambda x: x.mul_(1e30), {}, "exploded"),  # the old code published values up to 7.6e36
        (lambda x: (x[1].fill_(0.3), x)[1], {}, "constant"),
        (lambda x: x, {"learned_lr": float("inf")}, "learned lr"),
        (lambda x: x, {"learned_lr": -0.01}, "learned lr"),
        (lambda x: x, {"targets": torch.tensor([[1.0], [float("inf")]])}, "targets"),
    ],
)
def test_write_distilled_refuses_broken_sets_and_writes_nothing(tmp_path, mutate, kw, message):
    from distill.formats import PublishError

    pixels = mutate(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(PublishError, match=message):
        _guarded_write(tmp_path, pixels, **kw)
    assert not (tmp_path / "set").exists()


def test_write_distilled_accepts_pixels_a_few_times_outside_the_real_range(tmp_path):
    _guarded_write(tmp_path, 5 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), learned_lr=0.01)
    assert (tmp_path / "set").exists()
