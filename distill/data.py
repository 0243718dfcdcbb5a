"""Image datasets in, uint8 tensors out: the data layer of distillery.

`load_images` reads a labelled image dataset from Parquet (the layout Hugging Face `datasets`
writes and the hub serves), an ImageFolder tree, an `.npz` file or the Hugging Face hub, and
returns an `ImageSet`: uint8 images [N, C, H, W], int64 labels and the dataset's class names.
Images are RGB (C = 3; grey images replicated) unless `channels=1` asks for one channel (grey
kept exactly; colour converted to luma as Pillow's "L" mode does), as MTT trains on MNIST.

Selection happens before decoding: the label column is read first, the class subset and the
seeded per-class sample are chosen from it, and only the chosen images are decoded, row group
by row group, in worker processes that write into one preallocated output tensor. So taking
50 images per class from Tiny-ImageNet decodes 10,000 JPEGs, not 100,000.

Pure Python/PyTorch: never imports prefect or ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from distill.manifest import source_checksums
from distill.registry import Registry
from distill.utils import derive_seed

# name -> what the source is; a DataConfig field or load_images(format=) takes one of these names.
SOURCE_FORMATS: Registry[str] = Registry(
    "dataset format",
    {
        "auto": "detect from the path (hub: prefix, .parquet/.npz suffix, Parquet files or split folders)",
        "parquet": "Parquet files in the Hugging Face layout (a file, or a folder of <split>*.parquet)",
        "imagefolder": "a folder of <split>/<class>/<image> files",
        "hub": "a Hugging Face hub dataset, hub:<owner>/<name>",
        "npz": "a NumPy .npz with x_<split> images and y_<split> labels",
    },
)
SourceFormat = SOURCE_FORMATS.name_type()
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
HUB_PREFIX = "hub:"

# Rows decoded per worker task: large enough that process overhead is noise (a 64x64 JPEG
# decodes in ~0.1 ms), small enough that 2 workers get several tasks each to balance.
_TASK_ROWS = 2048
# Seconds to wait for the hub before reporting it unreachable; huggingface_hub itself
# retries for ~25 s on a machine without network.
_HUB_CONNECT_TIMEOUT_S = 3.0


class DataError(ValueError):
    """A bad input to the data layer; the message names the problem, the value and the valid choices."""


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Labelled uint8 images: `images` [N, C, H, W] (C = 3 RGB or 1 grey), `labels` int64 [N] indexing `class_names`.

    `class_names` always lists every class of the source dataset, so labels keep the ids the
    dataset gave them even after a class subset was taken (unless it was remapped on load).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    source: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise DataError(
                f"images must be uint8 [N, C, H, W] with C = 3 (RGB) or 1 (grey); "
                f"got {self.images.dtype} {list(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"labels must be int64 [N] with N = {self.images.shape[0]} images; "
                f"got {self.labels.dtype} {list(self.labels.shape)}"
            )
        _check_label_range(self.labels, len(self.class_names), self.source)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """Short sha256 of labels, pixels and class names; hashes tensor memory, no per-image loop."""
        h = hashlib.sha256()
        h.update(json.dumps({"shape": list(self.images.shape), "class_names": self.class_names}).encode())
        h.update(self.labels.detach().cpu().contiguous().numpy().data)
        h.update(self.images.detach().cpu().contiguous().numpy().data)
        return h.hexdigest()[:16]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageSet:
        """The rows at `indices` (ids, or a boolean mask over all rows), same class names."""
        idx = torch.as_tensor(indices)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.to(torch.int64)
        return ImageSet(self.images[idx], self.labels[idx], list(self.class_names), self.source)

    def class_counts(self) -> torch.Tensor:
        """Images per class, int64 [num_classes]."""
        return torch.bincount(self.labels, minlength=self.num_classes)


def check_ipc(
    class_counts: Sequence[int],
    ipc: int,
    class_names: Sequence[str] | None = None,
    *,
    where: str = "",
    hint: str = "",
    name: str = "ipc",
    error: type[Exception] = DataError,
) -> None:
    """The one rule for k images per class (random subsets, distillation, capped loading): k >= 1
    and no class smaller than k. class_counts: the images of every class that will be drawn from
    (a caller that skips empty classes leaves them out). `name`: the caller's name for k, in the
    message. Raises `error` naming the short classes."""
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(class_counts))]
    if ipc < 1:
        raise error(f"{name}={ipc} images per class is not possible; use {name} >= 1")
    of = f" of {where}" if where else ""
    if not len(class_counts):
        raise error(f"{name}={ipc} images per class: no class{of} has images")
    short = [(name, int(n)) for name, n in zip(names, class_counts) if n < ipc]
    if short:
        detail = ", ".join(f"{name!r} has {n}" for name, n in short[:5]) + (", ..." if len(short) > 5 else "")
        raise error(
            f"{name}={ipc} images per class is larger than a class{of}: {detail}; "
            f"use {name} <= {min(map(int, class_counts))}{hint}"
        )


def sample_per_class(labels: torch.Tensor, k: int, seed: int, classes: Sequence[int] | None = None) -> torch.Tensor:
    """Indices of `k` random images from each class, grouped by class (ascending), random order within.

    Each class draws from its own generator seeded by (seed, class), so a class's sample does not
    depend on which other classes were asked for, and the first k of a k+1 sample are the k sample.
    `classes=None` means every class present in `labels`.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    wanted = sorted(set(int(c) for c in classes)) if classes is not None else torch.unique(labels).tolist()
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    bounds = [torch.searchsorted(sorted_labels, torch.tensor([c, c + 1])).tolist() for c in wanted]
    check_ipc([hi - lo for lo, hi in bounds], k, [str(c) for c in wanted], name="per_class")
    picked = []
    for c, (lo, hi) in zip(wanted, bounds):
        g = torch.Generator().manual_seed(derive_seed(seed, c, sep=":"))  # ":" keeps earlier samples
        picked.append(order[lo:hi][torch.randperm(hi - lo, generator=g)[:k]])
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.int64)


def dataset_splits(source: str | os.PathLike[str], format: str = "auto") -> list[str]:
    """The split names a local source holds (a single Parquet file is one split named by its stem)."""
    fmt = _resolve_format(str(source), format)
    if fmt == "hub":
        raise DataError(f"dataset_splits lists local sources only; got hub source {str(source)!r}")
    path = Path(source)
    if fmt == "parquet":
        if path.is_file():
            return [_split_of(path)]
        return sorted({_split_of(p) for p in _parquet_files(path)})
    if fmt == "imagefolder":
        return sorted(p.name for p in path.iterdir() if p.is_dir() and any(c.is_dir() for c in p.iterdir()))
    with np.load(path, allow_pickle=False) as npz:
        return sorted(k[2:] for k in npz.files if k.startswith("x_"))


def load_images(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    format: str = "auto",
    image_size: int | None = None,
    classes: Sequence[int] | None = None,
    per_class: int | None = None,
    seed: int = 0,
    num_workers: int | None = None,
    remap_labels: bool = False,
    channels: Literal[1, 3] = 3,
) -> ImageSet:
    """Load one split of a labelled image dataset as uint8 [N, channels, H, W], rows in dataset order.

    source: a `.parquet` file (the file is the split; `split` is not consulted), a folder of `<split>.parquet`,
        `<split>-*.parquet` or `data/<split>-*.parquet`, an ImageFolder `root/<split>/<class>/`,
        an `.npz` with `x_<split>`/`y_<split>` (optional `class_names`), or `hub:<name>`.
    image_size: resize to image_size x image_size (bilinear, antialiased); None keeps the
        size and refuses mixed sizes.
    classes: keep only these class ids; with remap_labels=True they become 0..k-1 in the order
        given and class_names shrinks to them.
    per_class: seeded random sample of this many images per kept class (see sample_per_class);
        the same seed gives the same images whatever num_workers is.
    num_workers: decoding processes; default: the CPUs this process may use.
    channels: 3 = RGB (grey images replicated to 3 channels); 1 = one channel (see `to_grey`).
    """
    src = str(source)
    if channels not in (1, 3):
        raise DataError(f"channels must be 3 (RGB) or 1 (grey); got {channels!r}")
    fmt = _resolve_format(src, format)
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels or None; got {image_size}")
    workers = num_workers if num_workers is not None else _available_cpus()
    classes = [int(c) for c in classes] if classes is not None else None
    if workers < 1:
        raise DataError(f"num_workers must be >= 1 or None; got {num_workers}")

    reader: _Reader = _READERS[fmt](src, split)

    labels = reader.labels
    class_names = reader.class_names
    _check_label_range(labels, len(class_names), reader.where)
    rows = _select_rows(labels, class_names, classes, per_class, seed)
    images = reader.read(rows, image_size, workers)
    if channels == 1:
        images = to_grey(images)
    kept_labels = labels[rows]
    if remap_labels and classes is not None:
        mapping = torch.full((len(class_names),), -1, dtype=torch.int64)
        mapping[torch.tensor(classes)] = torch.arange(len(classes))
        kept_labels = mapping[kept_labels]
        class_names = [class_names[c] for c in classes]
    return ImageSet(images, kept_labels, list(class_names), reader.where)


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [N, 3, H, W] -> uint8 luma [N, 1, H, W] with Pillow's "L" formula (ITU-R 601-2, in
    16-bit fixed point), so a grey image replicated to RGB comes back exactly: 19595 + 38470 + 7471 = 2^16."""
    x = images.to(torch.int32)
    luma = (x[:, 0] * 19595 + x[:, 1] * 38470 + x[:, 2] * 7471 + 0x8000) >> 16
    return luma.to(torch.uint8).unsqueeze(1)


def _select_rows(
    labels: torch.Tensor,
    class_names: list[str],
    classes: list[int] | None,
    per_class: int | None,
    seed: int,
) -> torch.Tensor:
    """Row ids to decode, ascending so that reading stays sequential."""
    n_classes = len(class_names)
    counts = torch.bincount(labels, minlength=n_classes)
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < n_classes]
        if bad:
            raise DataError(f"class ids {bad} out of range; valid ids: 0..{n_classes - 1}")
        if len(set(classes)) != len(classes):
            raise DataError(f"classes lists an id twice: {classes}")
    # Without a class list, per_class asks for every class of the dataset.
    wanted = classes if classes is not None else (list(range(n_classes)) if per_class is not None else [])
    empty = [c for c in wanted if counts[c] == 0]
    if empty:
        named = ", ".join(f"{c} ({class_names[c]!r})" for c in empty[:10])
        raise DataError(
            f"{len(empty)} requested classes have no images in this split: {named}"
            f"{', ...' if len(empty) > 10 else ''}; pass classes= with classes that have images"
        )
    if per_class is not None:
        check_ipc([int(counts[c]) for c in wanted], per_class, [class_names[c] for c in wanted], name="per_class")
        rows = sample_per_class(labels, per_class, seed, wanted)
    elif classes is not None:
        rows = torch.nonzero(torch.isin(labels, torch.tensor(classes)), as_tuple=True)[0]
    else:
        rows = torch.arange(len(labels))
    if len(rows) == 0:
        raise DataError("no images to load: the split is empty")
    return torch.sort(rows).values


def _check_label_range(labels: torch.Tensor, n_classes: int, where: str) -> None:
    if len(labels) == 0:
        return
    bad = (labels < 0) | (labels >= n_classes)
    if bool(bad.any()):
        raise DataError(
            f"{int(bad.sum())} labels out of range in {where} (e.g. {int(labels[bad][0])}); "
            f"valid labels: 0..{n_classes - 1} for {n_classes} class names"
        )


def _resolve_format(source: str, format: str) -> str:
    if format not in SOURCE_FORMATS:
        raise DataError(SOURCE_FORMATS.unknown(format))
    if format != "auto":
        return format
    if source.startswith(HUB_PREFIX):
        return "hub"
    path = Path(source)
    if not path.exists():
        raise DataError(
            f"dataset source {source!r} does not exist; pass a local path, or {HUB_PREFIX}<name> for the hub"
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".npz"):
            return suffix[1:]
        raise DataError(
            f"cannot tell the dataset format of {source!r} from its suffix {suffix!r}; "
            f"pass format= one of {', '.join(SOURCE_FORMATS)}"
        )
    if _parquet_files(path):
        return "parquet"
    if any(p.is_dir() for p in path.iterdir()):
        return "imagefolder"
    raise DataError(
        f"{source!r} holds neither Parquet files nor ImageFolder split folders; "
        f"valid formats: {', '.join(SOURCE_FORMATS)}"
    )


def _available_cpus() -> int:
    # sched_getaffinity honours container and taskset limits that os.cpu_count() ignores.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --- decoding (runs in worker processes) -------------------------------------------------------


def _decode_one(data: bytes | str, image_size: int | None) -> np.ndarray:
    """One encoded image (bytes or a file path) -> uint8 HWC RGB."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        if image_size is not None and im.format == "JPEG":
            # DCT-domain downscaling by 1/2, 1/4 or 1/8 while decoding, never below the requested
            # size: 64x64 -> 32x32 costs ~65 us instead of ~130 us for decode + resize.
            im.draft("RGB", (image_size, image_size))
        im.load()
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        if image_size is not None and rgb.size != (image_size, image_size):
            # Pillow's resize widens the filter support when downscaling, i.e. it antialiases.
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(rgb)


def _decode_many(
    items: Sequence[bytes | str | None],
    image_size: int | None,
    where: str,
    row_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Encoded images -> uint8 NCHW, refusing mixed sizes when no image_size is given.

    `where` and `row_ids` (the items' rows in their file) only make error messages precise.
    """
    out: np.ndarray | None = None
    for i, item in enumerate(items):
        what = item if isinstance(item, str) else f"row {row_ids[i] if row_ids is not None else i}"
        if item is None:
            raise DataError(f"{where}: {what} has no image (null bytes and null path)")
        try:
            pixels = _decode_one(item, image_size)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"{where}: cannot decode {what}: {e}") from e
        if out is None:
            out = np.empty((len(items), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != out.shape[1:]:
            raise DataError(
                f"{where}: images have mixed sizes ({_hw(out.shape[1:])} and {_hw(pixels.shape)} at {what}); "
                "pass image_size to resize them to one size"
            )
        out[i] = pixels
    assert out is not None
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _decode_parquet_rows(
    path: str, image_column: str, groups: list[tuple[int, np.ndarray]], image_size: int | None
) -> np.ndarray:
    """Decode the given rows of some row groups of one Parquet file, reading only the image column."""
    pf = _open_parquet(Path(path))
    parts = []
    for group, rows in groups:
        try:
            column = pf.read_row_group(group, columns=[image_column], use_threads=False).column(0)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read row group {group} of Parquet file {path}: {e}") from e
        chosen = column.take(pa.array(rows)).combine_chunks()
        del column  # the row group's bytes are not needed once the chosen rows are copied out
        where = f"{path} row group {group}"
        parts.append(_decode_many(_encoded_items(chosen), image_size, where, rows.tolist()))
        if parts[-1].shape[1:] != parts[0].shape[1:]:
            raise DataError(
                f"{where}: images have mixed sizes ({_hw(parts[0].shape[2:])} and "
                f"{_hw(parts[-1].shape[2:])}); pass image_size to resize them to one size"
            )
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _encoded_items(column: pa.Array) -> list[bytes | str | None]:
    """An image column (struct<bytes, path> or plain binary) -> bytes, else path, per row."""
    if pa.types.is_struct(column.type):
        fields = {f.name: a for f, a in zip(column.type, column.flatten())}
        data = fields["bytes"].to_pylist() if "bytes" in fields else [None] * len(column)
        paths = fields["path"].to_pylist() if "path" in fields else [None] * len(column)
        return [d if d is not None else p for d, p in zip(data, paths)]
    return column.to_pylist()


# --- running decode tasks ----------------------------------------------------------------------

_Task = tuple[Callable[..., np.ndarray], tuple[Any, ...]]


def _run_tasks(tasks: Iterator[_Task], n_tasks: int, total: int, workers: int) -> torch.Tensor:
    """Run decode tasks (in order) and copy their NCHW results into one preallocated tensor."""
    out: torch.Tensor | None = None
    pos = 0

    def place(pixels: np.ndarray) -> None:
        nonlocal out, pos
        if out is None:
            out = torch.empty((total, *pixels.shape[1:]), dtype=torch.uint8)
        elif pixels.shape[1:] != tuple(out.shape[1:]):
            raise DataError(
                f"images have mixed sizes ({_hw(tuple(out.shape[2:]))} and {_hw(pixels.shape[2:])}); "
                "pass image_size to resize them to one size"
            )
        out[pos : pos + len(pixels)] = torch.from_numpy(pixels)
        pos += len(pixels)

    if workers == 1 or n_tasks == 1:
        for fn, args in tasks:
            place(fn(*args))
    else:
        # fork: workers start in milliseconds and inherit the imported modules; spawn would pay
        # the ~3 s torch import per worker. Workers touch only PIL, numpy and pyarrow.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(min(workers, n_tasks), mp_context=context) as pool:
            pending: deque[Future[np.ndarray]] = deque()
            try:
                for fn, args in tasks:
                    pending.append(pool.submit(fn, *args))
                    # Bounded look-ahead keeps at most ~2 finished chunks per worker in memory.
                    if len(pending) >= 2 * workers:
                        place(pending.popleft().result())
                while pending:
                    place(pending.popleft().result())
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    assert out is not None and pos == total
    return out


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# --- readers: labels first, then decode only the chosen rows -----------------------------------


class _Reader(Protocol):
    """A split of one source: labels and class names up front, pixels of chosen rows on demand."""

    labels: torch.Tensor
    class_names: list[str]
    where: str

    def read(self, rows: torch.Tensor, image_size: int | None, workers: int) -> torch.Tensor: ...


def _split_of(path: Path) -> str:
    # Hub and `datasets` shard names are <split>-00000-of-00004.parquet; split names have no '-'.
    return path.name.removesuffix(".parquet").split("-", 1)[0]


def _parquet_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.parquet")) + sorted(root.glob("data/*.parquet"))


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read Parquet file {path} (corrupt or truncated?): {e}") from e


def _hf_features(schema: pa.Schema) -> dict[str, Any]:
    meta = schema.metadata or {}
    if b"huggingface" not in meta:
        return {}
    try:
        return json.loads(meta[b"huggingface"]).get("info", {}).get("features", {}) or {}
    except (json.JSONDecodeError, AttributeError):
        return {}


def _pick_columns(
    features: dict[str, Any], columns: list[str], is_image: Callable[[str], bool], where: str
) -> tuple[str, str]:
    """(image column, label column) from `datasets` feature types, else conventional names."""
    image = next((k for k, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"), None)
    label = next((k for k, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"), None)
    image = image or next((c for c in ("image", "img", "pixel_values") if c in columns and is_image(c)), None)
    image = image or next((c for c in columns if is_image(c)), None)
    label = label or next((c for c in ("label", "labels", "fine_label", "target") if c in columns), None)
    if image is None or label is None:
        missing = "an image column" if image is None else "a label column"
        raise DataError(f"{where}: cannot find {missing} among columns {columns}")
    return image, label


def _class_names(features: dict[str, Any], label_column: str, labels: torch.Tensor) -> list[str]:
    feature = features.get(label_column)
    names = feature.get("names") if isinstance(feature, dict) else None
    if names:
        return [str(n) for n in names]
    n = int(labels.max()) + 1 if len(labels) else 0
    return [str(i) for i in range(n)]


class _ParquetReader:
    def __init__(self, source: Path, split: str) -> None:
        if source.is_file():
            self.files = [source]
        else:
            all_files = _parquet_files(source)
            self.files = [p for p in all_files if _split_of(p) == split]
            if not self.files:
                found = sorted({_split_of(p) for p in all_files})
                raise DataError(f"split {split!r} not found in {source}; splits there: {', '.join(found)}")
        self.where = str(source) if source.is_file() else f"{source} [{split}]"
        handles = [_open_parquet(p) for p in self.files]
        schema = handles[0].schema_arrow
        features = _hf_features(schema)
        self.image_column, label_column = _pick_columns(
            features,
            schema.names,
            lambda c: _is_image_type(schema.field(c).type),
            str(self.files[0]),
        )
        label_parts = []
        for path, pf in zip(self.files, handles):
            try:
                column = pf.read(columns=[label_column]).column(0)
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"cannot read labels of Parquet file {path} (corrupt or truncated?): {e}") from e
            if not pa.types.is_integer(column.type):
                raise DataError(f"label column {label_column!r} of {path} is {column.type}, not integer")
            if column.null_count:
                raise DataError(f"label column {label_column!r} of {path} has {column.null_count} missing labels")
            label_parts.append(column.to_numpy().astype(np.int64))
        self.labels = torch.from_numpy(np.concatenate(label_parts))
        self.class_names = _class_names(features, label_column, self.labels)
        self.row_groups = [
            np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]) for pf in handles
        ]
        self.file_offsets = np.cumsum([0] + [int(b[-1]) for b in self.row_groups])

    def _tasks(self, rows: np.ndarray, image_size: int | None) -> list[_Task]:
        tasks: list[_Task] = []
        for f, path in enumerate(self.files):
            lo, hi = self.file_offsets[f], self.file_offsets[f + 1]
            local = rows[(rows >= lo) & (rows < hi)] - lo
            bounds = self.row_groups[f]
            group_of = np.searchsorted(bounds, local, side="right") - 1
            batch: list[tuple[int, np.ndarray]] = []
            batch_rows = 0
            for g in np.unique(group_of):
                in_group = local[group_of == g] - bounds[g]
                batch.append((int(g), in_group))
                batch_rows += len(in_group)
                if batch_rows >= _TASK_ROWS:
                    tasks.append((_decode_parquet_rows, (str(path), self.image_column, batch, image_size)))
                    batch, batch_rows = [], 0
            if batch:
                tasks.append((_decode_parquet_rows, (str(path), self.image_column, batch, image_size)))
        return tasks

    def read(self, rows: torch.Tensor, image_size: int | None, workers: int) -> torch.Tensor:
        tasks = self._tasks(rows.numpy(), image_size)
        return _run_tasks(iter(tasks), len(tasks), len(rows), workers)


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


class _FolderReader:
    def __init__(self, root: Path, split: str) -> None:
        split_dir = root / split
        if not split_dir.is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(f"split {split!r} not found in {root}; splits there: {', '.join(found)}")
        self.where = str(split_dir)
        self.class_names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not self.class_names:
            raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class_name>/<image>")
        self.paths: list[str] = []
        labels: list[int] = []
        for c, name in enumerate(self.class_names):
            files = sorted(str(p) for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.paths += files
            labels += [c] * len(files)
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def read(self, rows: torch.Tensor, image_size: int | None, workers: int) -> torch.Tensor:
        chosen = [self.paths[i] for i in rows.tolist()]
        tasks: list[_Task] = [
            (_decode_many, (chosen[s], image_size, self.where)) for s in _chunks(len(chosen), _TASK_ROWS)
        ]
        return _run_tasks(iter(tasks), len(tasks), len(chosen), workers)


class _NpzReader:
    def __init__(self, path: Path, split: str) -> None:
        self.where = f"{path} [{split}]"
        try:
            self.npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read npz file {path}: {e}") from e
        splits = sorted(k[2:] for k in self.npz.files if k.startswith("x_"))
        if f"x_{split}" not in self.npz.files or f"y_{split}" not in self.npz.files:
            raise DataError(
                f"split {split!r} not found in {path} (needs arrays x_{split} and y_{split}); "
                f"splits there: {', '.join(splits)}"
            )
        self.x_key = f"x_{split}"
        self.labels = torch.from_numpy(self.npz[f"y_{split}"].astype(np.int64).reshape(-1))
        if "class_names" in self.npz.files:
            self.class_names = [str(n) for n in self.npz["class_names"].tolist()]
        else:
            self.class_names = [str(i) for i in range(int(self.labels.max()) + 1 if len(self.labels) else 0)]

    def read(self, rows: torch.Tensor, image_size: int | None, workers: int) -> torch.Tensor:
        x = self.npz[self.x_key]
        if x.shape[0] != len(self.labels):
            raise DataError(f"{self.where}: {x.shape[0]} images but {len(self.labels)} labels")
        x = x[rows.numpy()]
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
            raise DataError(
                f"{self.where}: images have shape {list(x.shape)}; "
                "expected [N,H,W], [N,H,W,C] or [N,C,H,W] with C in 1, 3"
            )
        images = torch.from_numpy(np.ascontiguousarray(_to_uint8(x, self.where)))
        if images.shape[1] == 4:
            images = images[:, :3]  # alpha does not belong in a classifier's input
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
            return resize_uint8(images, image_size)
        return images.contiguous()


def _to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{where}: float images must lie in [0, 1]; found values in [{lo:.3g}, {hi:.3g}]")
        return np.rint(x * 255.0).astype(np.uint8)
    raise DataError(f"{where}: images are {x.dtype}; expected uint8, or float in [0, 1]")


def resize_uint8(images: torch.Tensor, size: int, batch_size: int = 4096) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] to size x size, bilinear with antialiasing, in batches."""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for s in _chunks(images.shape[0], batch_size):
        resized = F.interpolate(images[s].float(), size=(size, size), mode="bilinear", antialias=True)
        out[s] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


class _HubReader:
    def __init__(self, name: str, split: str) -> None:
        import datasets  # imported here: loading it costs ~1 s and only the hub path needs it

        self.where = f"{HUB_PREFIX}{name} [{split}]"
        _check_hub_reachable(name)
        try:
            ds = datasets.load_dataset(name, split=split)
        except ConnectionError as e:
            raise DataError(_hub_unreachable(name, str(e))) from e
        except Exception as e:
            # datasets reports missing splits, unknown repos and bad configs with many exception
            # types; all of them are a bad `source`/`split` from the caller's point of view.
            raise DataError(f"cannot load {name!r} split {split!r} from the hub: {e}") from e
        features = {
            k: {"_type": type(v).__name__, **({"names": v.names} if hasattr(v, "names") else {})}
            for k, v in ds.features.items()
        }
        image_column, label_column = _pick_columns(features, list(ds.column_names), lambda c: False, self.where)
        # Arrow format with decode=False: rows come back as encoded bytes, decoded by our workers.
        self.ds = ds.cast_column(image_column, datasets.Image(decode=False)).with_format("arrow")
        self.image_column = image_column
        self.labels = torch.as_tensor(np.asarray(ds.with_format("numpy")[label_column]), dtype=torch.int64)
        self.class_names = _class_names(features, label_column, self.labels)

    def read(self, rows: torch.Tensor, image_size: int | None, workers: int) -> torch.Tensor:
        ids = rows.tolist()
        slices = _chunks(len(ids), _TASK_ROWS)

        def tasks() -> Iterator[_Task]:
            # Lazily, so only the in-flight chunks' encoded bytes are held at once.
            for s in slices:
                column = self.ds[ids[s]].column(self.image_column).combine_chunks()
                yield _decode_many, (_encoded_items(column), image_size, self.where, ids[s])

        return _run_tasks(tasks(), len(slices), len(ids), workers)


def _hub_unreachable(name: str, reason: str) -> str:
    return (
        f"the Hugging Face hub is unreachable, so {name!r} cannot be loaded ({reason}); "
        "pass a local Parquet file or folder, an ImageFolder tree or an .npz path instead"
    )


def _check_hub_reachable(name: str) -> None:
    """Fail in seconds rather than after huggingface_hub's ~25 s of retries."""
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return  # datasets honours offline mode itself and may serve the dataset from its cache
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        # Set after datasets was imported, so datasets itself would still try the network.
        raise DataError(_hub_unreachable(name, "HF_HUB_OFFLINE is set"))
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=_HUB_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise DataError(_hub_unreachable(name, f"{endpoint.hostname}:{port}: {e}")) from e


def read_labels(
    source: str | os.PathLike[str], split: str = "train", *, format: str = "auto"
) -> tuple[torch.Tensor, list[str]]:
    """The label column and class names of a split, without decoding any image."""
    src = str(source)
    reader = _READERS[_resolve_format(src, format)](src, split)
    return reader.labels, list(reader.class_names)


_READERS: dict[str, Callable[[str, str], _Reader]] = {
    "parquet": lambda src, split: _ParquetReader(Path(src), split),
    "imagefolder": lambda src, split: _FolderReader(Path(src), split),
    "npz": lambda src, split: _NpzReader(Path(src), split),
    "hub": lambda src, split: _HubReader(src.removeprefix(HUB_PREFIX), split),
}


class DataConfig(BaseModel):
    """Which labelled dataset a stage reads and how: the `data` block of every flow.

    Loading is `load_images` on each split with these settings; the preprocessing
    (normalization, optional ZCA) is fitted on the selected train images.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(
        description="Parquet file or folder (Hugging Face layout), ImageFolder root, .npz file, or hub:<name>."
    )
    format: SourceFormat = Field("auto", description=f"One of {', '.join(SOURCE_FORMATS)}; auto detects from the path.")
    train_split: str = Field("train", description="Split the methods learn from.")
    test_split: str = Field("test", description="Held-out split for evaluation (e.g. 'valid' for Tiny-ImageNet).")
    image_size: int | None = Field(32, ge=1, description="Resize to this square size; None keeps the native size.")
    classes: list[int] | None = Field(None, description="Keep only these class ids.")
    remap_labels: bool = Field(
        True, description="With `classes`: renumber them 0..k-1 in the order given (a k-way task)."
    )
    train_per_class: int | None = Field(
        None, ge=1, description="Seeded per-class cap on train images, to fit a small machine; None = all."
    )
    test_per_class: int | None = Field(None, ge=1, description="Seeded per-class cap on test images; None = all.")
    seed: int = Field(0, description="Seed of the per-class caps.")
    zca: bool | Literal["pixels"] = Field(
        False,
        description="ZCA-whiten (eps 0.1), fitted on train: true = after per-channel normalization; "
        "'pixels' = on [0, 1] pixels, exactly as MTT's kornia ZCAWhitening.",
    )
    channels: Literal[3, 1] = Field(
        3,
        description="3 = RGB, grey images replicated to 3 channels (what ImageNet-style nets expect); "
        "1 = one channel: grey images kept exactly, colour converted to luma (Pillow's 'L'). Nets adapt "
        "their first layer, as MTT does for MNIST.",
    )

    checksums: dict[str, str] | None = Field(
        None,
        description="sha256 of every file of a local source, by name relative to `source` (print them with "
        "`python -m flows.cli checksums SOURCE`): checked before any image is decoded, so a corrupted or "
        "swapped file stops the run. Image bytes carry no checksum of their own (JPEG has none, nor do the "
        "hub layout's Parquet pages), so this pin is what catches a flipped bit inside an image.",
    )

    @field_validator("checksums")
    @classmethod
    def _hex_digests(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        bad = sorted(name for name, digest in v.items() if not re.fullmatch(r"[0-9a-fA-F]{64}", digest))
        if bad:
            raise ValueError(f"checksums must be 64-hex-digit sha256 digests; not one for {', '.join(bad)}")
        return {name: digest.lower() for name, digest in v.items()}

    @model_serializer(mode="wrap")
    def _drop_fields_at_their_old_defaults(self, handler: Any) -> dict[str, Any]:
        # `channels` and `checksums` joined the config after stores were filled: at their defaults they
        # are left out of the dump, so every artifact keyed by an older config keeps its key.
        out = handler(self)
        if self.channels == 3:
            out.pop("channels", None)
        if self.checksums is None:
            out.pop("checksums", None)
        return out

    def verify_source(self) -> None:
        """Refuse a source whose files differ from `checksums` (a no-op without them)."""
        if self.checksums is None:
            return
        if self.source.startswith(HUB_PREFIX) or "://" in self.source or not os.path.exists(self.source):
            raise DataError(f"checksums pin local files, but {self.source!r} is not a local file or folder")
        got = source_checksums(self.source)
        problems = [
            f"{name}: sha256 {got[name][:16]}..., expected {digest[:16]}..."
            for name, digest in self.checksums.items()
            if name in got and got[name] != digest
        ]
        problems += [f"{name}: listed in checksums but not in the source" for name in self.checksums if name not in got]
        problems += [f"{name}: in the source but not in checksums" for name in got if name not in self.checksums]
        if problems:
            raise DataError(
                f"{self.source} does not match data.checksums ({'; '.join(problems)}): a file is corrupt, "
                "missing or was replaced; fetch it again, or print the current digests with "
                "`python -m flows.cli checksums SOURCE` if the change is intended"
            )

    @model_validator(mode="after")
    def _distinct_splits(self) -> "DataConfig":
        if self.train_split == self.test_split:
            raise ValueError(
                f"train_split and test_split are both {self.train_split!r}: testing on the training images "
                "measures memorization, not accuracy; name a held-out split (e.g. 'test', or 'valid' for Tiny-ImageNet)"
            )
        return self

    @property
    def name(self) -> str:
        """A short name for reports and artifact keys in the UI: the source's last path part."""
        return self.source.removeprefix(HUB_PREFIX).rstrip("/").split("/")[-1].removesuffix(".parquet") or "data"

    def check(self, *, min_train_per_class: int | None = None) -> dict[str, Any]:
        """Validate source, splits, classes and caps from the label columns alone (no decoding).

        Runs in well under a second on Tiny-ImageNet, so flows call it before any long stage.
        `min_train_per_class` is what a later stage will draw per class (e.g. k images per
        class of a subset); a class with fewer selected train images is refused here.
        Returns the selected images per class of each split.
        """
        self.verify_source()
        counts: dict[str, list[int]] = {}
        for split, cap in ((self.train_split, self.train_per_class), (self.test_split, self.test_per_class)):
            labels, names = read_labels(self.source, split, format=self.format)
            _check_label_range(labels, len(names), f"{self.source} [{split}]")
            rows = _select_rows(labels, names, self.classes, cap, self.seed)
            kept = self.classes if self.classes is not None else list(range(len(names)))
            per_class = torch.bincount(labels[rows], minlength=len(names))[kept].tolist()
            counts[split] = per_class
            if split == self.train_split:
                train_names = [names[c] for c in kept]
        if min_train_per_class is not None:
            present = [(n, name) for n, name in zip(counts[self.train_split], train_names) if n > 0]
            check_ipc(
                [n for n, _ in present],
                min_train_per_class,
                [name for _, name in present],
                where=f"{self.source} [{self.train_split}]",
                hint=" or raise train_per_class",
            )
        return counts

    def load(self, split: str) -> ImageSet:
        """One split with this config's size, classes and per-class cap."""
        self.verify_source()
        cap = self.train_per_class if split == self.train_split else self.test_per_class
        return load_images(
            self.source,
            split,
            format=self.format,
            image_size=self.image_size,
            classes=self.classes,
            per_class=cap,
            seed=self.seed,
            remap_labels=self.remap_labels,
            channels=self.channels,
        )
