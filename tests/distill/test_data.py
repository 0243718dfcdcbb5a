"""Tests for distill.data: every source format, selection, decoding and every bad input.

Real data comes from ../shared/data (override with DISTILLERY_DATA) and is read in slices;
the format and error tests build small synthetic datasets in tmp_path.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from distill import data
from distill.data import (
    SOURCE_FORMATS,
    DataConfig,
    DataError,
    ImageSet,
    check_ipc,
    dataset_splits,
    load_images,
    sample_per_class,
    to_grey,
)

DATA = Path(os.environ.get("DISTILLERY_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
CIFAR = DATA / "cifar10"
TINY = DATA / "tiny-imagenet-200"
CLASS_NAMES = ["ant", "bee", "cat"]


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"real data not found at {path}; set DISTILLERY_DATA to the folder holding cifar10/ and tiny-imagenet-200/"
        )
    return path


# --- synthetic fixtures ------------------------------------------------------------------------


def make_images(n: int, size: tuple[int, int] = (12, 10), seed: int = 0) -> list[Image.Image]:
    """Random RGB images (w x h); PNG keeps them lossless so every format must decode them identically."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def write_hf_parquet(path: Path, images: list[Image.Image], labels: list[int], **kwargs) -> None:
    """What `datasets` writes (image struct<bytes, path>, ClassLabel names in the schema metadata)."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes(im), "path": None} for im in images], "label": labels}, features=features
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path), **kwargs)


def write_raw_parquet(path: Path, encoded: list[bytes], labels: list[int], names: list[str] = CLASS_NAMES) -> None:
    """The same layout written with plain pyarrow, for inputs `datasets` would refuse to write."""
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}}
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": b, "path": None} for b in encoded],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "label": pa.array(labels, pa.int64()),
        }
    ).replace_schema_metadata({"huggingface": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)


@pytest.fixture
def synthetic() -> tuple[list[Image.Image], list[int]]:
    images = make_images(30)
    labels = [i % 3 for i in range(30)]
    return images, labels


@pytest.fixture
def parquet_dir(tmp_path: Path, synthetic) -> Path:
    images, labels = synthetic
    write_hf_parquet(tmp_path / "pq" / "train.parquet", images, labels, batch_size=7)
    write_hf_parquet(tmp_path / "pq" / "test.parquet", images[:9], labels[:9])
    return tmp_path / "pq"


def write_image_folder(root: Path, images: list[Image.Image], labels: list[int], split: str = "train") -> None:
    for i, (im, y) in enumerate(zip(images, labels)):
        d = root / split / CLASS_NAMES[y]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:04d}.png")


# --- real data -----------------------------------------------------------------------------------


def test_cifar_slice_shapes_names_and_counts():
    s = load_images(need(CIFAR), "test", per_class=20)
    assert s.images.dtype == torch.uint8 and s.images.shape == (200, 3, 32, 32)
    assert s.labels.dtype == torch.int64 and len(s) == 200
    assert s.class_names[:3] == ["airplane", "automobile", "bird"] and s.num_classes == 10
    assert s.class_counts().tolist() == [20] * 10
    assert "cifar10" in s.source


def test_rows_match_direct_decode_in_dataset_order():
    s = load_images(need(CIFAR), "test", per_class=3, seed=5)
    labels = pq.read_table(CIFAR / "test.parquet", columns=["label"]).column(0).to_numpy()
    rows = np.sort(sample_per_class(torch.from_numpy(labels), 3, 5).numpy())
    table = pq.read_table(CIFAR / "test.parquet").take(pa.array(rows))
    expected = as_tensor([Image.open(io.BytesIO(d["bytes"])) for d in table.column("image").to_pylist()])
    assert torch.equal(s.images, expected)
    assert s.labels.tolist() == labels[rows].tolist()


def test_per_class_sampling_is_seeded():
    a = load_images(need(CIFAR), "test", per_class=10, seed=1)
    b = load_images(CIFAR, "test", per_class=10, seed=1)
    c = load_images(CIFAR, "test", per_class=10, seed=2)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()


def test_workers_give_identical_tensors_and_resize():
    # 5,000 rows over 20 row groups: several tasks, so two workers really run in parallel.
    one = load_images(need(TINY), "train", per_class=25, image_size=32, num_workers=1)
    two = load_images(TINY, "train", per_class=25, image_size=32, num_workers=2)
    assert one.images.shape == (5000, 3, 32, 32)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    assert one.class_names[0].startswith("n01443537")


def test_greyscale_jpeg_becomes_rgb():
    labels = torch.from_numpy(pq.read_table(need(TINY) / "train.parquet", columns=["label"]).column(0).to_numpy())
    first = pq.ParquetFile(TINY / "train.parquet").read_row_group(0, columns=["image"]).column(0)
    grey_row = next(i for i, d in enumerate(first.to_pylist()) if Image.open(io.BytesIO(d["bytes"])).mode == "L")
    c = int(labels[grey_row])
    s = load_images(TINY, "train", classes=[c])
    pos = int(torch.nonzero(torch.nonzero(labels == c).flatten() == grey_row))
    grey = s.images[pos]
    assert grey.shape == (3, 64, 64)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_class_subset_and_remap():
    kept = load_images(need(CIFAR), "test", classes=[7, 2], per_class=5)
    assert sorted(set(kept.labels.tolist())) == [2, 7] and kept.num_classes == 10
    remapped = load_images(CIFAR, "test", classes=[7, 2], per_class=5, remap_labels=True)
    assert remapped.class_names == ["horse", "bird"]
    assert torch.equal(remapped.labels, torch.where(kept.labels == 7, 0, 1))
    assert torch.equal(remapped.images, kept.images)


def test_real_splits():
    assert dataset_splits(need(CIFAR)) == ["test", "train"]
    assert dataset_splits(need(TINY)) == ["train", "valid"]


# --- sampling ------------------------------------------------------------------------------------


def test_sample_per_class_grouped_deterministic_nested():
    labels = torch.arange(100) % 4
    idx = sample_per_class(labels, 5, seed=3)
    assert labels[idx].tolist() == sorted(labels[idx].tolist())
    assert torch.equal(idx, sample_per_class(labels, 5, seed=3))
    assert not torch.equal(idx, sample_per_class(labels, 5, seed=4))
    # A class's sample does not depend on which other classes were requested ...
    assert torch.equal(sample_per_class(labels, 5, 3, classes=[2]), idx[labels[idx] == 2])
    # ... and a larger sample extends the smaller one.
    bigger = sample_per_class(labels, 6, seed=3)
    assert torch.equal(bigger[labels[bigger] == 1][:5], idx[labels[idx] == 1])


def test_sample_per_class_errors():
    labels = torch.tensor([0, 0, 1])
    with pytest.raises(
        DataError, match="per_class=2 images per class is larger than a class: '1' has 1; use per_class <= 1"
    ):
        sample_per_class(labels, 2, 0)
    with pytest.raises(DataError, match="per_class=0 images per class is not possible"):
        sample_per_class(labels, 0, 0)


def test_one_ipc_rule_names_the_short_classes():
    check_ipc([5, 3, 4], 3)
    with pytest.raises(
        DataError,
        match=r"^ipc=4 images per class is larger than a class of cifar \[train\]: "
        r"'cat' has 3; use ipc <= 3 or raise train_per_class$",
    ):
        check_ipc([5, 3, 4], 4, ["dog", "cat", "frog"], where="cifar [train]", hint=" or raise train_per_class")
    with pytest.raises(DataError, match=r"'6' has 0, '7' has 0, '8' has 0, '9' has 0, '10' has 0, \.\.\."):
        check_ipc([5] * 6 + [0] * 6, 1)
    with pytest.raises(DataError, match="no class of x has images"):
        check_ipc([], 1, where="x")
    with pytest.raises(KeyError):
        check_ipc([1], 2, error=KeyError)


# --- formats -------------------------------------------------------------------------------------


def test_all_formats_agree(tmp_path: Path, parquet_dir: Path, synthetic):
    images, labels = synthetic
    expected = as_tensor(images)
    write_image_folder(tmp_path / "folder", images, labels)
    # ImageFolder lists files class by class, so compare against that order.
    order = sorted(range(30), key=lambda i: (labels[i], i))
    x = expected.numpy()
    y = np.array(labels)
    np.savez(tmp_path / "nhwc.npz", x_train=x.transpose(0, 2, 3, 1), y_train=y, class_names=np.array(CLASS_NAMES))
    np.savez(tmp_path / "nchw.npz", x_train=x, y_train=y)
    np.savez(tmp_path / "float.npz", x_train=x.astype(np.float32) / 255, y_train=y)
    hub_layout = tmp_path / "hub"
    write_hf_parquet(hub_layout / "data" / "train-00000-of-00002.parquet", images[:13], labels[:13])
    write_hf_parquet(hub_layout / "data" / "train-00001-of-00002.parquet", images[13:], labels[13:])

    npzs = [tmp_path / f"{name}.npz" for name in ("nhwc", "nchw", "float")]
    for source in (parquet_dir, parquet_dir / "train.parquet", hub_layout, *npzs):
        s = load_images(source, "train", num_workers=1)
        assert torch.equal(s.images, expected), source
        assert s.labels.tolist() == labels, source
    assert load_images(tmp_path / "nhwc.npz").class_names == CLASS_NAMES
    assert load_images(tmp_path / "nchw.npz").class_names == ["0", "1", "2"]
    folder = load_images(tmp_path / "folder", "train", num_workers=2)
    assert folder.class_names == CLASS_NAMES
    assert torch.equal(folder.images, expected[order])
    assert folder.labels.tolist() == [labels[i] for i in order]
    assert load_images(tmp_path / "folder", format="imagefolder").fingerprint() == folder.fingerprint()


def test_parquet_multi_file_split_with_selection(tmp_path: Path, synthetic):
    images, labels = synthetic
    root = tmp_path / "hub"
    write_hf_parquet(root / "data" / "train-00000-of-00002.parquet", images[:13], labels[:13], batch_size=4)
    write_hf_parquet(root / "data" / "train-00001-of-00002.parquet", images[13:], labels[13:], batch_size=4)
    s = load_images(root, classes=[1], per_class=4, seed=9, num_workers=2)
    rows = np.sort(sample_per_class(torch.tensor(labels), 4, 9, classes=[1]).numpy())
    assert torch.equal(s.images, as_tensor(images)[rows])
    assert dataset_splits(root) == ["train"]


def test_splits_of_every_format(tmp_path: Path, parquet_dir: Path, synthetic):
    images, labels = synthetic
    write_image_folder(tmp_path / "folder", images[:3], labels[:3], "train")
    write_image_folder(tmp_path / "folder", images[:3], labels[:3], "val")
    x = np.zeros((2, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.zeros(2), x_test=x[:1], y_test=np.zeros(1))
    assert dataset_splits(parquet_dir) == ["test", "train"]
    assert dataset_splits(parquet_dir / "test.parquet") == ["test"]
    assert dataset_splits(tmp_path / "folder") == ["train", "val"]
    assert dataset_splits(tmp_path / "d.npz") == ["test", "train"]


def test_grey_and_resize_synthetic(tmp_path: Path):
    grey = [Image.fromarray(np.full((20, 30), 40 * i, np.uint8), mode="L") for i in range(3)]
    write_raw_parquet(tmp_path / "g.parquet", [jpeg_bytes(im) for im in grey], [0, 1, 2])
    s = load_images(tmp_path / "g.parquet", image_size=8)
    assert s.images.shape == (3, 3, 8, 8)
    assert torch.equal(s.images[:, 0], s.images[:, 2])
    assert abs(int(s.images[2].float().mean()) - 80) <= 2
    npz = load_images(_npz(tmp_path, np.stack([np.asarray(im) for im in grey])), image_size=5)
    assert npz.images.shape == (3, 3, 5, 5)


def _npz(tmp_path: Path, x: np.ndarray) -> Path:
    path = tmp_path / "x.npz"
    np.savez(path, x_train=x, y_train=np.arange(len(x)))
    return path


def test_hub_source_uses_features(monkeypatch: pytest.MonkeyPatch, synthetic):
    images, labels = synthetic
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=CLASS_NAMES)})
    local = datasets.Dataset.from_dict({"img": images, "fine": labels}, features=features)
    calls = []

    def fake_load_dataset(name: str, split: str):
        calls.append((name, split))
        return local

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # skip the reachability probe
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "_TASK_ROWS", 2)  # several lazily built tasks through the process pool
    s = load_images("hub:someone/tiny", "train", per_class=2, seed=0, num_workers=2)
    assert calls == [("someone/tiny", "train")]
    assert s.class_names == CLASS_NAMES and s.class_counts().tolist() == [2, 2, 2]
    rows = np.sort(sample_per_class(torch.tensor(labels), 2, 0).numpy())
    assert torch.equal(s.images, as_tensor(images)[rows])
    assert load_images("someone/tiny", format="hub").fingerprint() == load_images("hub:x").fingerprint()


def test_hub_offline_fails_fast(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub is unreachable.*local Parquet"):
        load_images("hub:uoft-cs/cifar10", "train")


# --- ImageSet --------------------------------------------------------------------------------


def test_imageset_helpers_and_validation():
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    s = ImageSet(images, torch.tensor([0, 1, 1, 2, 2, 2]), CLASS_NAMES, "mem")
    assert s.class_counts().tolist() == [1, 2, 3]
    sub = s.subset([5, 0])
    assert torch.equal(sub.images, images[[5, 0]]) and sub.labels.tolist() == [2, 0] and sub.class_names == CLASS_NAMES
    assert torch.equal(s.subset(s.labels == 1).images, images[1:3])
    changed = images.clone()
    changed[3, 1, 2, 2] ^= 1
    assert ImageSet(changed, s.labels, CLASS_NAMES, "mem").fingerprint() != s.fingerprint()
    assert ImageSet(images, s.labels, CLASS_NAMES, "elsewhere").fingerprint() == s.fingerprint()
    with pytest.raises(DataError, match="uint8"):
        ImageSet(images.float(), s.labels, CLASS_NAMES, "mem")
    with pytest.raises(DataError, match="out of range"):
        ImageSet(images, torch.tensor([0, 1, 1, 2, 2, 3]), CLASS_NAMES, "mem")


# --- bad inputs ------------------------------------------------------------------------------


def test_unknown_format(parquet_dir: Path, tmp_path: Path):
    valid = ", ".join(SOURCE_FORMATS)
    with pytest.raises(DataError, match=f"unknown dataset format 'tfrecord'; valid: {valid}"):
        load_images(parquet_dir, format="tfrecord")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"suffix '\.csv'.*parquet"):
        load_images(tmp_path / "x.csv")
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "nowhere")


def test_missing_split_lists_splits(tmp_path: Path, parquet_dir: Path, synthetic):
    with pytest.raises(DataError, match="split 'valid' not found.*splits there: test, train"):
        load_images(parquet_dir, "valid")
    images, labels = synthetic
    write_image_folder(tmp_path / "folder", images[:3], labels[:3])
    with pytest.raises(DataError, match="split 'test' not found.*splits there: train"):
        load_images(tmp_path / "folder", "test")
    path = _npz(tmp_path, np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="split 'test' not found.*splits there: train"):
        load_images(path, "test")


def test_label_out_of_range(tmp_path: Path):
    images = make_images(3)
    write_raw_parquet(tmp_path / "bad.parquet", [png_bytes(im) for im in images], [0, 5, 1])
    with pytest.raises(DataError, match=r"labels out of range.*e\.g\. 5.*0\.\.2"):
        load_images(tmp_path / "bad.parquet")


def test_mixed_sizes_need_image_size(tmp_path: Path):
    images = make_images(3, (8, 8)) + make_images(3, (9, 7))
    write_raw_parquet(tmp_path / "mixed.parquet", [png_bytes(im) for im in images], [0, 1, 2] * 2)
    with pytest.raises(DataError, match="mixed sizes.*pass image_size"):
        load_images(tmp_path / "mixed.parquet", num_workers=1)
    assert load_images(tmp_path / "mixed.parquet", image_size=6).images.shape == (6, 3, 6, 6)


@pytest.mark.parametrize("task_rows", [2, 100])
def test_mixed_sizes_across_row_groups_and_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_rows: int):
    # Row groups of 4: sizes differ between row groups only, caught within one task (100) or
    # between worker tasks (2).
    monkeypatch.setattr(data, "_TASK_ROWS", task_rows)
    images = make_images(4, (8, 8)) + make_images(4, (9, 7))
    write_raw_parquet(tmp_path / "mixed.parquet", [png_bytes(im) for im in images], [0, 1] * 4)
    with pytest.raises(DataError, match="mixed sizes.*pass image_size"):
        load_images(tmp_path / "mixed.parquet", num_workers=2)


def test_many_small_tasks_across_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parquet_dir: Path, synthetic):
    """Tiny tasks force the process pool on every format; the result must not depend on it."""
    images, labels = synthetic
    write_image_folder(tmp_path / "folder", images, labels)
    monkeypatch.setattr(data, "_TASK_ROWS", 3)
    for source in (parquet_dir, tmp_path / "folder"):
        one = load_images(source, per_class=7, seed=4, num_workers=1)
        two = load_images(source, per_class=7, seed=4, num_workers=2)
        assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
        assert one.images.shape == (21, 3, 10, 12)


def test_empty_class_and_bad_class_ids(parquet_dir: Path, tmp_path: Path):
    images = make_images(4)
    write_raw_parquet(tmp_path / "gap.parquet", [png_bytes(im) for im in images], [0, 0, 2, 2])
    with pytest.raises(DataError, match="no images in this split: 1 \\('bee'\\)"):
        load_images(tmp_path / "gap.parquet", classes=[1, 2])
    with pytest.raises(DataError, match="no images in this split: 1 \\('bee'\\)"):
        load_images(tmp_path / "gap.parquet", per_class=1)
    with pytest.raises(DataError, match=r"class ids \[3\] out of range; valid ids: 0\.\.2"):
        load_images(parquet_dir, classes=[0, 3])


def test_per_class_larger_than_class(parquet_dir: Path):
    with pytest.raises(
        DataError,
        match=r"per_class=11 images per class is larger than a class: 'ant' has 10, 'bee' has 10.*; "
        r"use per_class <= 10",
    ):
        load_images(parquet_dir, per_class=11)


def test_corrupt_and_truncated_parquet(tmp_path: Path, parquet_dir: Path):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not a parquet file at all" * 10)
    with pytest.raises(DataError, match="garbage.parquet"):
        load_images(garbage)
    data = (parquet_dir / "train.parquet").read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.parquet"):
        load_images(truncated)


def test_corrupt_image_bytes(tmp_path: Path):
    write_raw_parquet(tmp_path / "bad.parquet", [png_bytes(make_images(1)[0]), b"\xff\xd8 broken jpeg"], [0, 1])
    with pytest.raises(DataError, match="bad.parquet row group 0: cannot decode row 1"):
        load_images(tmp_path / "bad.parquet")


def test_npz_bad_values(tmp_path: Path):
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\]"):
        load_images(_npz(tmp_path, np.full((2, 4, 4, 3), 2.0, np.float32)))
    with pytest.raises(DataError, match="expected uint8, or float"):
        load_images(_npz(tmp_path, np.zeros((2, 4, 4, 3), np.int32)))


def test_one_channel_keeps_grey_exactly_and_converts_colour_as_pillow(tmp_path: Path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)  # MNIST-shaped, every grey level likely
    source = _npz(tmp_path, grey)
    kept = load_images(source, channels=1)  # native size
    assert kept.images.shape == (6, 1, 28, 28) and torch.equal(kept.images[:, 0], torch.from_numpy(grey))
    assert load_images(source).images.shape == (6, 3, 28, 28)  # the default stays RGB (replicated)
    assert torch.equal(to_grey(load_images(source).images), kept.images)  # replicate then luma: exact

    colour = [Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)) for _ in range(3)]
    write_raw_parquet(tmp_path / "c.parquet", [png_bytes(im) for im in colour], [0, 1, 2])
    luma = load_images(tmp_path / "c.parquet", channels=1).images
    expected = torch.stack([torch.from_numpy(np.array(im.convert("L"))) for im in colour]).unsqueeze(1)
    assert torch.equal(luma, expected)

    cfg = DataConfig(source=str(source), image_size=None, channels=1, test_split="valid")
    assert cfg.load("train").images.shape == (6, 1, 28, 28)
    assert "channels" not in DataConfig(source=str(source)).model_dump()  # RGB configs keep their keys
    assert cfg.model_dump()["channels"] == 1
    with pytest.raises(DataError, match="channels must be 3 \\(RGB\\) or 1 \\(grey\\); got 2"):
        load_images(source, channels=2)
    with pytest.raises(ValidationError, match="channels"):
        DataConfig(source=str(source), channels=2)


def test_pinned_checksums_catch_a_flipped_bit_inside_an_image_before_decoding(tmp_path: Path):
    from distill.manifest import source_checksums

    folder = tmp_path / "src"
    images = make_images(6, seed=3)
    write_raw_parquet(folder / "train.parquet", [jpeg_bytes(im) for im in images], [0, 1, 2, 0, 1, 2])
    write_raw_parquet(folder / "test.parquet", [jpeg_bytes(im) for im in images[:3]], [0, 1, 2])
    pinned = DataConfig(source=str(folder), image_size=None, checksums=source_checksums(str(folder)))
    before = pinned.load("train").images
    assert pinned.check()  # the intact source passes

    # One flipped bit inside one JPEG's entropy-coded data: the Parquet stays valid and the JPEG
    # decodes, to other pixels, without any error (JPEG carries no checksum)
    rows = pq.read_table(folder / "train.parquet").to_pylist()
    encoded = [r["image"]["bytes"] for r in rows]
    encoded[1] = _silently_corrupt(encoded[1])
    write_raw_parquet(folder / "train.parquet", encoded, [r["label"] for r in rows])
    unpinned = DataConfig(source=str(folder), image_size=None)
    assert not torch.equal(unpinned.load("train").images, before)  # the old behaviour: garbage, silently
    with pytest.raises(DataError, match=r"does not match data.checksums \(train.parquet: sha256 .*, expected"):
        pinned.check()
    with pytest.raises(DataError, match="train.parquet: sha256"):
        pinned.load("train")

    (folder / "extra.txt").write_text("x")
    names = source_checksums(str(folder))
    gone = {k: v for k, v in names.items() if k != "test.parquet"}
    with pytest.raises(DataError, match="test.parquet: in the source but not in checksums"):
        DataConfig(source=str(folder), checksums=gone).check()
    with pytest.raises(DataError, match="missing.parquet: listed in checksums but not in the source"):
        DataConfig(source=str(folder), checksums={**names, "missing.parquet": "0" * 64}).check()
    with pytest.raises(DataError, match="checksums pin local files"):
        DataConfig(source="hub:cifar10", checksums=names).verify_source()
    assert "checksums" not in unpinned.model_dump()  # unpinned configs keep their keys


def _silently_corrupt(jpeg: bytes) -> bytes:
    """The first single-bit flip past the headers that Pillow still decodes, to different pixels."""
    original = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    for pos in range(len(jpeg) // 2, len(jpeg) - 2):
        flipped = bytearray(jpeg)
        flipped[pos] ^= 0x04
        try:
            pixels = np.asarray(Image.open(io.BytesIO(bytes(flipped))).convert("RGB"))
        except OSError:
            continue
        if pixels.shape == original.shape and (pixels != original).any():
            return bytes(flipped)
    raise AssertionError("no silently decodable flip found")


def test_checksums_cli_prints_a_block_that_pins_the_source(tmp_path: Path):
    import subprocess
    import sys

    import yaml

    write_raw_parquet(tmp_path / "d" / "train.parquet", [png_bytes(im) for im in make_images(3)], [0, 1, 2])
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "checksums", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    block = yaml.safe_load(out)["checksums"]
    assert list(block) == ["train.parquet"]
    DataConfig(source=str(tmp_path / "d"), test_split="valid", checksums=block).verify_source()
