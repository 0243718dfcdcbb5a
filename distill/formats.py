"""Parquet formats of the datasets that flow between stages (ARCHITECTURE.md, section 4).

Every file is plain Parquet that `pyarrow.parquet.read_table` reads, and carries the
`huggingface` schema metadata exactly as `datasets.Dataset.to_parquet` writes it, so
`datasets.load_dataset("parquet", data_files=...)` recovers the features (ClassLabel
names, Image, Array3D). What `datasets` cannot express (format kind and version, recipe,
provenance) goes in a second schema metadata key, `distillery`, as JSON.

- image dataset: `image` struct<bytes, path> (encoded PNG), `label` ClassLabel; the
  layout of ../shared/data, so real inputs and pruned sources read alike.
- distilled dataset: a directory with `data/train-00000-of-00001.parquet` (`pixels`
  Array3D float32 bit-exact, `image` 8-bit preview, `label`, optional `soft_label` and
  `target`), `preprocessor.safetensors` and a dataset card `README.md`.
- metrics: one row per (method, setting, seed), columns inferred from the rows.

Readers raise `FormatError` naming the file and the problem instead of pyarrow's errors.
Pure: imports neither prefect nor ray.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import safetensors.torch
import torch
import yaml
from PIL import Image

from distill.fsio import FORMAT_VERSION, fs_path, read_bytes, write_bytes
from distill.transforms import Preprocessor, safetensors_bytes

# Like datasets' Parquet builder: row groups of at most 10,000 rows, and fewer when rows
# are big, so a reader can stream one group at a time in bounded memory.
ROW_GROUP_MAX_ROWS = 10_000
ROW_GROUP_MAX_BYTES = 64 << 20

DISTILLED_DATA_FILE = "data/train-00000-of-00001.parquet"
PREPROCESSOR_FILE = "preprocessor.safetensors"
# The extension type datasets registers for Array3D: with this field metadata a process
# that imported datasets reads `pixels` back as Array3D; plain pyarrow sees nested lists.
_ARRAY3D_EXTENSION = "datasets.features.features.Array3DExtensionType"
PIXEL_SPACE = (
    "model input space: float32 images after the preprocessor (normalization, and ZCA "
    "whitening when the preprocessor has one); feed them to the network as they are, "
    "without normalizing again. `image` is only an 8-bit preview for viewers."
)


class FormatError(ValueError):
    """A dataset file that is unreadable, corrupt, of the wrong kind or version."""


# ---------------------------------------------------------------- parquet plumbing


def schema_metadata(features: dict, kind: str, extra: dict | None) -> dict[str, str]:
    """The `huggingface` features and the `distillery` kind/version (+ extra) of a file we write."""
    meta = {"format": kind, "format_version": FORMAT_VERSION}
    clash = set(meta) & set(extra or {})
    if clash:
        raise ValueError(f"extra_metadata may not set the reserved keys {sorted(clash)}")
    return {
        "huggingface": json.dumps({"info": {"features": features}}),
        "distillery": json.dumps({**meta, **(extra or {})}),
    }


def write_table(table: pa.Table, path: str, filesystem: pafs.FileSystem | None) -> int:
    """Write with bounded row groups (<= 10k rows, <= 64 MiB), creating the parent directory."""
    fs, path = fs_path(path, filesystem)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    rows = max(1, min(ROW_GROUP_MAX_ROWS, ROW_GROUP_MAX_BYTES // row_bytes))
    pq.write_table(table, path, filesystem=fs, row_group_size=rows)
    return table.num_rows


def read_table(
    path: str, filesystem: pafs.FileSystem | None, kind: str, columns: tuple[str, ...]
) -> tuple[pa.Table, dict, dict]:
    """Read and validate a file: (table, huggingface features, distillery metadata)."""
    fs, full = fs_path(path, filesystem)
    try:
        table = pq.read_table(full, filesystem=fs)
    except FileNotFoundError as e:
        raise FormatError(f"{path}: no such file") from e
    except (pa.ArrowException, OSError) as e:
        raise FormatError(f"{path}: not a readable Parquet file, truncated or corrupt? ({e})") from e
    meta = table.schema.metadata or {}
    try:
        features = json.loads(meta.get(b"huggingface", b"{}")).get("info", {}).get("features") or {}
        ours = json.loads(meta.get(b"distillery", b"{}"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: schema metadata is not valid JSON ({e})") from e
    if ours:
        if ours.get("format") != kind:
            raise FormatError(f"{path}: is a {ours.get('format')!r} file, expected {kind!r}")
        if ours.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                f"{path}: unsupported format version {ours.get('format_version')!r} "
                f"(this distillery reads version {FORMAT_VERSION})"
            )
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise FormatError(f"{path}: missing column(s) {missing} for the {kind} format; it has {table.column_names}")
    return table, features, ours


def _labels(path: str, table: pa.Table) -> np.ndarray:
    column = table.column("label")
    if column.null_count or not pa.types.is_integer(column.type):
        raise FormatError(f"{path}: `label` must be non-null integers, got {column.type} ({column.null_count} nulls)")
    return column.to_numpy()


def _class_names(features: dict, labels: np.ndarray) -> list[str]:
    label = features.get("label", {})
    if label.get("_type") == "ClassLabel":
        return list(label["names"])
    # Plain int labels (a Parquet export without ClassLabel): name the classes by index.
    return [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]


def _lists_to_numpy(path: str, table: pa.Table, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Nested (fixed-size or regular) lists of numbers -> one [N, *shape] array, no per-row Python."""
    arr = table.column(name).combine_chunks()
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    n = len(arr)
    for size in shape:
        if arr.null_count:
            raise FormatError(f"{path}: column {name!r} has null entries")
        if pa.types.is_fixed_size_list(arr.type):
            ok = arr.type.list_size == size
        elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            lengths = pc.list_value_length(arr)
            ok = len(arr) == 0 or pc.all(pc.equal(lengths, size)).as_py()
        else:
            raise FormatError(f"{path}: column {name!r} has type {arr.type}, expected lists")
        if not ok:
            raise FormatError(f"{path}: column {name!r} does not have shape {list(shape)}")
        arr = arr.flatten()
    if arr.null_count:
        raise FormatError(f"{path}: column {name!r} has null entries")
    return arr.to_numpy(zero_copy_only=False).reshape(n, *shape)


def _as_tensor(values: np.ndarray) -> torch.Tensor:
    # Arrow buffers are read-only; one contiguous copy gives torch a writable tensor.
    return torch.from_numpy(np.array(values, copy=True))


def _float_list_column(x: torch.Tensor) -> pa.Array:
    flat = pa.array(x.detach().cpu().float().contiguous().reshape(-1).numpy())
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])


def _float_list_feature(length: int) -> dict:
    return {"feature": {"dtype": "float32", "_type": "Value"}, "length": length, "_type": "List"}


# ---------------------------------------------------------------- images


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _encode_images(images: torch.Tensor, image_format: str) -> list[bytes]:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in _PIL_MODES:
        raise ValueError(
            f"images must be uint8 [N, C, H, W] with C in {sorted(_PIL_MODES)}, got {images.dtype} {list(images.shape)}"
        )
    hwc = images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
    mode = _PIL_MODES[images.shape[1]]
    out = []
    for img in hwc:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode).save(buf, format=image_format)
        out.append(buf.getvalue())
    return out


def _image_column(encoded: list[bytes]) -> pa.StructArray:
    return pa.StructArray.from_arrays(
        [pa.array(encoded, pa.binary()), pa.nulls(len(encoded), pa.string())], names=["bytes", "path"]
    )


def _check_labels(labels: torch.Tensor, n: int, class_names: list[str]) -> torch.Tensor:
    labels = labels.detach().cpu().to(torch.int64).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"got {n} images but {len(labels)} labels")
    if n and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(
            f"labels must lie in [0, {len(class_names)}) for {len(class_names)} class names, "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def write_image_dataset(
    path: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    *,
    filesystem: pafs.FileSystem | None = None,
    image_format: str = "PNG",
    extra_metadata: dict | None = None,
) -> int:
    """Write uint8 images [N, C, H, W] and labels in the `datasets` image layout; returns rows."""
    labels = _check_labels(labels, len(images), class_names)
    features = {"image": {"_type": "Image"}, "label": {"names": list(class_names), "_type": "ClassLabel"}}
    table = pa.table(
        {"image": _image_column(_encode_images(images, image_format)), "label": pa.array(labels.numpy())}
    ).replace_schema_metadata(schema_metadata(features, "image", extra_metadata))
    return write_table(table, path, filesystem)


def _decode_images(path: str, column: pa.ChunkedArray) -> torch.Tensor:
    images = []
    for i, data in enumerate(column.combine_chunks().field("bytes").to_pylist()):
        if data is None:
            raise FormatError(f"{path}: row {i} has no image bytes")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now, so a broken image is reported here with its row
            images.append(image)
        except OSError as e:
            raise FormatError(f"{path}: row {i} is not a decodable image ({e})") from e
    # Mixed greyscale and colour (Tiny-ImageNet has both) decode to colour.
    mode = "L" if all(im.mode == "L" for im in images) else "RGB"
    arrays = [np.asarray(im.convert(mode)) for im in images]
    if len({a.shape for a in arrays}) > 1:
        raise FormatError(f"{path}: images have different sizes {sorted({a.shape for a in arrays})}")
    if not arrays:
        return torch.empty(0, 1 if mode == "L" else 3, 0, 0, dtype=torch.uint8)
    stacked = np.stack(arrays)
    stacked = stacked[..., None] if mode == "L" else stacked
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def read_image_dataset(
    path: str, *, filesystem: pafs.FileSystem | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a (small) image dataset: uint8 images [N, C, H, W], int64 labels, class names."""
    table, features, _ = read_table(path, filesystem, "image", ("image", "label"))
    labels = _labels(path, table)
    images = _decode_images(path, table.column("image"))
    return images, _as_tensor(labels).long(), _class_names(features, labels)


# ---------------------------------------------------------------- distilled datasets


@dataclass
class DistilledSet:
    """A distilled dataset and everything needed to train on it correctly."""

    pixels: torch.Tensor  # float32 [N, C, H, W], model input space
    labels: torch.Tensor  # int64 [N]
    class_names: list[str]
    soft_labels: torch.Tensor | None
    targets: torch.Tensor | None
    learned_lr: float | None
    recipe: dict
    method: str
    preprocessor_config: dict
    preprocessor_tensors: dict[str, torch.Tensor]
    provenance: dict
    metadata: dict = field(default_factory=dict)  # the whole `distillery` schema metadata


def minmax_preview(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit previews [N, C, H, W], each image stretched to its own min..max."""
    x = pixels.detach().cpu().float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
    return ((x - lo) / span * 255).round().clamp(0, 255).to(torch.uint8)


def _check_rows(name: str, x: torch.Tensor | None, n: int) -> None:
    if x is not None and (x.ndim != 2 or len(x) != n):
        raise ValueError(f"{name} must be [N={n}, K], got {list(x.shape)}")


def _yaml_feature(name: str, feature: dict) -> dict:
    """One feature in the dataset card's `dataset_info` form (what datasets' YAML expects)."""
    kind = feature["_type"]
    if kind == "Array3D":
        return {"name": name, "dtype": {"array3_d": {"shape": feature["shape"], "dtype": feature["dtype"]}}}
    if kind == "Image":
        return {"name": name, "dtype": "image"}
    if kind == "ClassLabel":
        names = {str(i): n for i, n in enumerate(feature["names"])}
        return {"name": name, "dtype": {"class_label": {"names": names}}}
    if kind == "List":
        return {"name": name, "list": feature["feature"]["dtype"], "length": feature["length"]}
    return {"name": name, "dtype": feature["dtype"]}


def _dataset_card(features: dict, meta: dict, rows: int, nbytes: int) -> str:
    front = {
        "license": "other",
        "tags": ["dataset-distillation", "distillery", meta["method"]],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        "dataset_info": {
            "features": [_yaml_feature(k, v) for k, v in features.items()],
            "splits": [{"name": "train", "num_bytes": nbytes, "num_examples": rows}],
        },
    }
    if "soft_label" in features:
        loss = "cross-entropy against the soft labels in `soft_label` (not the hard `label`)"
    elif "target" in features:
        loss = "mean squared error between the network's representation and `target` (KRR-ST)"
    else:
        loss = "cross-entropy against `label`"
    lr = meta["learned_lr"]
    lr_text = "not learned; use the recipe's" if lr is None else f"{lr!r} (learned during distillation; use it)"
    body = f"""
# Distilled dataset ({meta["method"]})

{rows} synthetic images of {len(meta["class_names"])} classes, written by distillery.

## Training on it correctly

- **Pixels:** use the float32 `pixels` column, not the `image` previews. Space: {PIXEL_SPACE}
- **Preprocessing of test data:** apply the same preprocessor to real images
  (config below, tensors in `{PREPROCESSOR_FILE}`), then evaluate.
- **Learning rate:** {lr_text}.
- **Loss:** {loss}.

Preprocessor:
```yaml
{yaml.safe_dump(meta["preprocessor"], sort_keys=False).strip()}
```

Evaluation recipe:
```yaml
{yaml.safe_dump(meta["recipe"], sort_keys=False).strip()}
```

## Loading

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_files="{DISTILLED_DATA_FILE}", split="train").with_format("torch")
pixels, labels = ds[:]["pixels"], ds[:]["label"]
```

```python
import json, pyarrow.parquet as pq
t = pq.read_table("{DISTILLED_DATA_FILE}")
meta = json.loads(t.schema.metadata[b"distillery"])   # recipe, learned_lr, preprocessor, provenance
```

or `distill.formats.read_distilled(path)`.
"""
    return f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n{body}"


class PublishError(ValueError):
    """A distilled set that must not be published: non-finite, exploded or degenerate values."""


# How far synthetic pixels may leave the real data's own range (in the model's input space)
# before the set counts as diverged. Trajectory matching legitimately pushes pixels beyond
# the real range (MTT's images are unconstrained), typically by a small factor; values 50x
# outside it come from an exploded image learning rate, not from learning.
MAX_PIXEL_RANGE_FACTOR = 50.0


def check_publishable(
    pixels: torch.Tensor,
    preprocessor_config: dict,
    preprocessor_tensors: dict[str, torch.Tensor],
    *,
    soft_labels: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    learned_lr: float | None = None,
    max_range_factor: float = MAX_PIXEL_RANGE_FACTOR,
) -> None:
    """Refuse a distilled set that would train badly or not at all; raises `PublishError`.

    Checked: every value finite (pixels, soft labels, targets); the learned lr finite and > 0;
    pixels within `max_range_factor` times the largest magnitude that real images reach in
    the same input space; no image constant (a flat image carries no signal).
    """
    for name, x in (("pixels", pixels), ("soft labels", soft_labels), ("targets", targets)):
        if x is not None and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise PublishError(
                f"{name}: {bad} of {x.numel()} values are NaN or infinite; the run diverged "
                "(lower the image learning rate, or enable rollback on divergence)"
            )
    if learned_lr is not None and not (math.isfinite(learned_lr) and learned_lr > 0):
        raise PublishError(
            f"learned lr {learned_lr!r} is not a positive finite number; "
            "lower lr_lr (the learning rate of the learned lr) or fix it with learn_lr off"
        )
    c, h, w = pixels.shape[1:]
    probe = torch.stack(
        [
            torch.zeros(c, h, w),
            torch.full((c, h, w), 255.0),
            torch.randint(0, 256, (c, h, w), generator=torch.Generator().manual_seed(0)).float(),
        ]
    )
    pre = Preprocessor.from_state(preprocessor_config, preprocessor_tensors)
    scale = float(pre(probe.to(torch.uint8)).abs().max())
    peak = float(pixels.abs().max()) if pixels.numel() else 0.0
    if peak > max_range_factor * scale:
        raise PublishError(
            f"pixels reach {peak:.3g}, over {max_range_factor:g}x the largest value real images take in "
            f"this input space ({scale:.3g}): the images exploded; lower the image learning rate (lr_img)"
        )
    flat = pixels.detach().reshape(len(pixels), -1).double()
    spread = flat.max(1).values - flat.min(1).values
    if len(pixels) and bool((spread <= 1e-6 * max(scale, 1e-12)).any()):
        idx = torch.nonzero(spread <= 1e-6 * max(scale, 1e-12)).flatten().tolist()
        raise PublishError(
            f"image(s) {idx[:10]} are constant: a flat image carries no signal "
            "(check the initialization and the image learning rate)"
        )


def write_distilled(
    path_dir: str,
    *,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    preprocessor_config: dict,
    preprocessor_tensors: dict[str, torch.Tensor],
    recipe: dict,
    method: str,
    provenance: dict,
    previews: torch.Tensor | None = None,
    soft_labels: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    learned_lr: float | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> dict:
    """Write a distilled dataset directory (Parquet data, preprocessor, dataset card)."""
    if pixels.dtype != torch.float32 or pixels.ndim != 4:
        raise ValueError(f"pixels must be float32 [N, C, H, W], got {pixels.dtype} {list(pixels.shape)}")
    n, shape = len(pixels), list(pixels.shape[1:])
    labels = _check_labels(labels, n, class_names)
    previews = minmax_preview(pixels) if previews is None else previews
    if list(previews.shape) != list(pixels.shape):
        raise ValueError(f"previews must have the pixels' shape {list(pixels.shape)}, got {list(previews.shape)}")
    _check_rows("soft_labels", soft_labels, n)
    _check_rows("targets", targets, n)
    check_publishable(
        pixels,
        preprocessor_config,
        preprocessor_tensors,
        soft_labels=soft_labels,
        targets=targets,
        learned_lr=learned_lr,
    )

    flat = pa.array(pixels.detach().cpu().contiguous().reshape(-1).numpy())
    for size in reversed(shape):
        # Regular lists, as datasets stores Array3D (fixed-size lists would not match its type).
        flat = pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, size, dtype=np.int32)), flat)
    columns = {
        "pixels": flat,
        "image": _image_column(_encode_images(previews, "PNG")),
        "label": pa.array(labels.numpy()),
    }
    features = {
        "pixels": {"shape": shape, "dtype": "float32", "_type": "Array3D"},
        "image": {"_type": "Image"},
        "label": {"names": list(class_names), "_type": "ClassLabel"},
    }
    for name, x in (("soft_label", soft_labels), ("target", targets)):
        if x is not None:
            columns[name] = _float_list_column(x)
            features[name] = _float_list_feature(x.shape[1])
    meta = {
        "method": method,
        "recipe": recipe,
        "learned_lr": learned_lr,
        "preprocessor": preprocessor_config,
        "class_names": list(class_names),
        "provenance": provenance,
        "pixel_space": PIXEL_SPACE,
    }
    # Through JSON once: tuples become lists and a non-JSON value fails here, before writing.
    meta = json.loads(json.dumps(meta))
    pixels_field = pa.field(
        "pixels",
        flat.type,
        metadata={
            "ARROW:extension:name": _ARRAY3D_EXTENSION,
            "ARROW:extension:metadata": json.dumps([shape, "float32"]),
        },
    )
    schema = pa.schema(
        [pixels_field] + [pa.field(k, v.type) for k, v in columns.items() if k != "pixels"],
        metadata=schema_metadata(features, "distilled", meta),
    )
    table = pa.Table.from_arrays(list(columns.values()), schema=schema)
    write_table(table, posixpath.join(path_dir, DISTILLED_DATA_FILE), filesystem)
    write_bytes(
        filesystem,
        posixpath.join(path_dir, PREPROCESSOR_FILE),
        safetensors_bytes(preprocessor_config, preprocessor_tensors),
    )
    card = _dataset_card(features, meta, n, table.nbytes)
    write_bytes(filesystem, posixpath.join(path_dir, "README.md"), card.encode())
    return {"rows": n, "classes": len(class_names), "shape": shape}


def read_distilled(path_dir: str, *, filesystem: pafs.FileSystem | None = None) -> DistilledSet:
    """Read a directory written by `write_distilled`."""
    path = posixpath.join(path_dir, DISTILLED_DATA_FILE)
    table, features, meta = read_table(path, filesystem, "distilled", ("pixels", "label"))
    if not meta:
        raise FormatError(f"{path}: no `distillery` schema metadata; not a distilled dataset")
    shape = features.get("pixels", {}).get("shape")
    if not shape or len(shape) != 3:
        raise FormatError(f"{path}: `huggingface` metadata lacks the Array3D shape of `pixels`")
    optional = {}
    for name in ("soft_label", "target"):
        if name in table.column_names:
            optional[name] = _as_tensor(_lists_to_numpy(path, table, name, (features[name]["length"],)))
    try:
        tensors = safetensors.torch.load(read_bytes(filesystem, posixpath.join(path_dir, PREPROCESSOR_FILE)))
    except (OSError, safetensors.SafetensorError) as e:
        raise FormatError(f"{posixpath.join(path_dir, PREPROCESSOR_FILE)}: unreadable ({e})") from e
    pixels = _as_tensor(_lists_to_numpy(path, table, "pixels", tuple(shape)))
    for name, x in (("pixels", pixels), *optional.items()):
        if not bool(torch.isfinite(x).all()):
            raise FormatError(f"{path}: column {name!r} holds NaN or infinite values; refusing to load it")
    return DistilledSet(
        pixels=pixels,
        labels=_as_tensor(_labels(path, table)).long(),
        class_names=list(meta["class_names"]),
        soft_labels=optional.get("soft_label"),
        targets=optional.get("target"),
        learned_lr=meta.get("learned_lr"),
        recipe=meta.get("recipe", {}),
        method=meta.get("method", ""),
        preprocessor_config=meta.get("preprocessor", {}),
        preprocessor_tensors=tensors,
        provenance=meta.get("provenance", {}),
        metadata=meta,
    )


# ---------------------------------------------------------------- metrics


def _kind(value: Any) -> str:
    # numbers.* also admits numpy scalars (np.int64, np.float32) that metrics often are.
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    return "str" if isinstance(value, str) else type(value).__name__


def _value_type(column: str, values: list) -> tuple[pa.DataType, str]:
    kinds = {_kind(v) for v in values if v is not None}
    if kinds <= {"str"}:
        return pa.string(), "string"
    if kinds == {"bool"}:
        return pa.bool_(), "bool"
    if kinds == {"int"}:
        return pa.int64(), "int64"
    if kinds <= {"int", "float"}:
        return pa.float64(), "float64"
    raise ValueError(f"metrics column {column!r} mixes or holds unsupported types {sorted(kinds)}")


def write_metrics(
    path: str,
    rows: list[dict],
    *,
    filesystem: pafs.FileSystem | None = None,
    extra_metadata: dict | None = None,
) -> int:
    """Write metric rows (str/int/float/bool values, None for missing); returns rows."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    arrays, features = {}, {}
    for name in names:
        values = [row.get(name) for row in rows]
        arrow_type, dtype = _value_type(name, values)
        arrays[name] = pa.array(values, arrow_type)
        features[name] = {"dtype": dtype, "_type": "Value"}
    table = pa.table(arrays).replace_schema_metadata(schema_metadata(features, "metrics", extra_metadata))
    return write_table(table, path, filesystem)


def read_metrics(path: str, *, filesystem: pafs.FileSystem | None = None) -> list[dict]:
    """Read metric rows back as dicts."""
    table, _, _ = read_table(path, filesystem, "metrics", ())
    return table.to_pylist()
