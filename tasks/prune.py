"""Stages `surrogate`, `selection` and `pruned`: DP4TL source pruning as cached Prefect tasks.

- `surrogate`: the surrogate net trained on the full source dataset artifact (key: source key +
  SurrogateConfig), or a user's safetensors weights (key: their sha256), head checked against the
  source classes. `surrogate.safetensors` plus fingerprint, classes and input shape in the manifest.
- `selection`: one pruning method at one seed: `selection.parquet` (per source class or cluster:
  name, score, votes, rank; absent for data-wise methods) and `kept.parquet` (one row per ratio),
  with the surrogate fingerprint, the feature settings and a digest of every kept row in the
  manifest.
- `pruned`: a selection row made concrete, on demand: the kept rows of the source's
  `train.parquet` (encoded bytes copied, no re-encoding), the source test rows of the classes
  still present, the source's `preprocessor.safetensors`, and a manifest with the same keys as
  stage `dataset` (class_counts, class_names, image_shape, ...). So `tasks.datasets.load_split`,
  `preprocessed` and every later stage consume a pruned source unchanged. Labels keep their
  source ids and every class name stays (DP4TL's reference code, OPTML-Group/DP4TL, keeps the 1000-way head); pruned
  classes count 0. Its key is the digest of the kept indices, so methods or seeds that keep the
  same samples (LM at every seed) share one pruned dataset.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from typing import Any

import pyarrow.parquet as pq
import torch
from prefect import task

from distill.data import DataError, read_labels, resize_uint8
from distill.formats import PREPROCESSOR_FILE
from distill.fsio import read_bytes
from distill.train import extract_features
from dp4tl.formats import read_kept, read_selection, write_kept, write_selection
from dp4tl.methods import SelectionConfig, check_target_shape, get_method, kept_samples
from dp4tl.selection import SelectionInputs, select_classes
from dp4tl.surrogate import SurrogateConfig, load_surrogate, save_surrogate, train_surrogate
from tasks import reports
from tasks.artifacts import ArtifactRef
from tasks.datasets import DatasetInfo, load_preprocessor, load_split, preprocessed
from tasks.runtime import task_device
from tasks.stage import Key, Publish, StageInfo, StageRun, stage
from tasks.store import Staging

SURROGATE_STAGE = "surrogate"
SELECTION_STAGE = "selection"
PRUNED_STAGE = "pruned"
SURROGATE_FILE = "surrogate.safetensors"
# DP4TL ("Selectivity Drives Productivity", reference code OPTML-Group/DP4TL) reads penultimate features and
# logits without augmentation at the training resolution; recorded with every selection so a reader knows
# what the scores depend on.
FEATURE_SETTINGS = {"layer": "penultimate (net.embed)", "augmentation": "none", "mode": "eval"}


class SurrogateInfo(StageInfo):
    """Manifest fields of a surrogate: what it was made from and its weights' fingerprint."""

    fingerprint: str
    num_classes: int
    image_shape: list[int]
    weights: str | None = None  # the user's file it was adopted from, or
    trained_on: str | None = None  # the source it was trained on, with
    train_images: int | None = None
    train_seconds: float | None = None


class SelectionInfo(StageInfo):
    """Manifest fields of one method's selection at one seed: its kept samples per ratio, by digest."""

    method: str
    selector: str
    surrogate_fingerprint: str
    features: dict[str, Any]  # what the scores depend on: layer, augmentation, resolution, resize
    num_source_samples: int
    kept: list[dict[str, Any]]  # per ratio: ratio, seed, num_kept_samples, digest, num_kept_classes
    rows: dict[str, int]


class PrunedInfo(DatasetInfo):
    """Manifest fields of a pruned source: the `dataset` stage's fields, and where it was pruned from."""

    kept_classes: list[int] | None
    kept_fraction: dict[str, float]
    pruned_from: str
    selection: str
    method: str
    ratio: float


# ---------------------------------------------------------------- surrogate


def surrogate_key(source: ArtifactRef, cfg: SurrogateConfig, weights: str | None) -> Key:
    """Trained: (config, source). User weights: their bytes' sha256 (any path holding them is the same surrogate)."""
    if weights is None:
        return Key({"surrogate": cfg}, [source.key])
    digest = hashlib.sha256(read_bytes(None, weights)).hexdigest()
    return Key({"surrogate": cfg, "weights_sha256": digest}, [source.key])


@stage(SURROGATE_STAGE, key=surrogate_key)
def surrogate(
    source: ArtifactRef, cfg: SurrogateConfig, store: str, run: StageRun, weights: str | None = None
) -> Publish:
    """Train the surrogate on the full source (or check and adopt a user's weights) and store it."""
    info = DatasetInfo.of(source)
    names, shape = info.class_names, info.image_shape
    if weights is not None:
        # Head check (and a clear error) before anything else reads the weights.
        net = load_surrogate(weights, cfg, len(names), shape[0], shape[-1])
        origin: dict[str, Any] = {"weights": weights}
    else:
        device = task_device()
        x, y, _ = preprocessed(source, "train")
        start = time.perf_counter()
        net = train_surrogate(
            cfg, x, y, len(names), device=device, progress=reports.progress("surrogate", "surrogate", run.key)
        )
        origin = {
            "trained_on": source.uri,
            "train_images": int(len(y)),
            "train_seconds": round(time.perf_counter() - start, 3),
        }
    reports.run_logger().info("surrogate %s: %s", run.key, origin)

    def write(staging: Staging) -> SurrogateInfo:
        meta = {"num_classes": len(names), "image_shape": shape, "config": cfg.model_dump(mode="json"), **origin}
        # Serialized locally, then streamed: the staging directory may be on an object store.
        with tempfile.TemporaryDirectory() as tmp:
            fingerprint = save_surrogate(net.cpu(), f"{tmp}/{SURROGATE_FILE}", meta)
            with staging.fs.open_output_stream(staging.file(SURROGATE_FILE)) as f:
                f.write(read_bytes(None, f"{tmp}/{SURROGATE_FILE}"))
        return SurrogateInfo(fingerprint=fingerprint, **{k: v for k, v in meta.items() if k != "config"})

    return Publish(write, seeds={"init": cfg.seed})


def load_surrogate_net(ref: ArtifactRef) -> torch.nn.Module:
    """The stored surrogate, rebuilt from its manifest (eval mode, CPU)."""
    info = SurrogateInfo.of(ref)
    cfg = SurrogateConfig(**ref.open(verify=False).manifest["config"]["surrogate"])
    shape = info.image_shape
    return load_surrogate(str(ref.local_dir() / SURROGATE_FILE), cfg, info.num_classes, shape[0], shape[-1])


# ---------------------------------------------------------------- selection


def selection_key(
    source: ArtifactRef, target: ArtifactRef, surrogate_ref: ArtifactRef, method: str, seed: int, cfg: SelectionConfig
) -> Key:
    # Only the settings that change this method's output: methods and seeds lists do not.
    settings = {
        "method": method,
        "seed": seed,
        "ratios": cfg.ratios,
        "k_clusters": cfg.k_clusters,
        "resize_target": cfg.resize_target,
    }
    return Key(settings, [source.key, target.key, surrogate_ref.key])


def target_inputs(target: ArtifactRef, source: ArtifactRef, resize: bool) -> torch.Tensor:
    """The target's training images as the surrogate sees them: source size, source preprocessing."""
    images = load_split(target, "train").images
    if images.shape[0] == 0:
        raise DataError(f"the target's train split is empty ({target.uri}); selection needs target images")
    shape = tuple(DatasetInfo.of(source).image_shape)
    if tuple(images.shape[1:]) != shape and resize and images.shape[1] == shape[0]:
        images = resize_uint8(images, shape[-1])
    check_target_shape(tuple(images.shape[1:]), shape)
    return load_preprocessor(source)(images)


def kept_digest(kept: list[int]) -> str:
    return hashlib.sha256(json.dumps(sorted(kept)).encode()).hexdigest()[:16]


@stage(SELECTION_STAGE, key=selection_key, task_name="select", task_run_name="select-{method}-seed{seed}")
def select(
    source: ArtifactRef,
    target: ArtifactRef,
    surrogate_ref: ArtifactRef,
    method: str,
    seed: int,
    cfg: SelectionConfig,
    store: str,
    run: StageRun,
) -> Publish:
    """Rank the source classes for one method and seed; publish the ranking and its kept samples per ratio."""
    spec = get_method(method)
    device = task_device()
    info = DatasetInfo.of(source)
    names = info.class_names
    labels, _ = read_labels(str(source.local_dir()), "train")
    net = load_surrogate_net(surrogate_ref)
    fingerprint = SurrogateInfo.of(surrogate_ref).fingerprint
    needs_source = spec.needs_source_images
    source_x = None
    if needs_source:
        source_x, _, _ = preprocessed(source, "train")
    selection, features = None, None
    if spec.data_wise:
        features = extract_features(net, source_x, device=device, batch_size=cfg.batch_size)
    else:
        inputs = SelectionInputs(
            num_classes=len(names),
            surrogate=net,
            target_x=target_inputs(target, source, cfg.resize_target),
            source_x=source_x,
            source_y=labels if needs_source else None,
            k_clusters=cfg.k_clusters,
            seed=seed,
            batch_size=cfg.batch_size,
            device=device,
        )
        selection = select_classes(spec.selector, inputs)
    rows = [kept_samples(method, selection, r, seed, labels, features) for r in cfg.ratios]
    clustered = selection is not None and "cluster_of_sample" in selection.details
    features_meta = {**FEATURE_SETTINGS, "resolution": info.image_shape[-1], "resize_target": cfg.resize_target}
    reports.run_logger().info("%s seed %d: kept %s samples", method, seed, [len(r.kept) for r in rows])

    def write(staging: Staging) -> SelectionInfo:
        if selection is not None:
            write_selection(
                staging.file("selection.parquet"),
                selection,
                class_names=None if clustered else names,
                surrogate_fingerprint=fingerprint,
                feature_settings=features_meta,
                extra_metadata={"pruning_method": method, "source": source.uri, "target": target.uri},
                filesystem=staging.fs,
            )
        write_kept(
            staging.file("kept.parquet"),
            rows,
            num_source_samples=len(labels),
            extra_metadata={"surrogate_fingerprint": fingerprint},
            filesystem=staging.fs,
        )
        kept = [
            {
                "ratio": r.ratio,
                "seed": r.seed,
                "num_kept_samples": len(r.kept),
                "digest": kept_digest(r.kept),
                "num_kept_classes": len(set(labels[r.kept].tolist())),
            }
            for r in rows
        ]
        return SelectionInfo(
            method=method,
            selector=spec.selector,
            surrogate_fingerprint=fingerprint,
            features=features_meta,
            num_source_samples=int(len(labels)),
            kept=kept,
            rows={"selection": selection.num_classes if selection is not None else 0, "kept": len(rows)},
        )

    return Publish(write, seeds={"selection": seed})


# ---------------------------------------------------------------- pruned source view


def _kept_row(selection_ref: ArtifactRef, ratio: float) -> dict[str, Any]:
    kept = SelectionInfo.of(selection_ref).kept
    for row in kept:
        if abs(row["ratio"] - ratio) < 1e-9:
            return row
    raise ValueError(f"selection {selection_ref.uri} has no ratio {ratio}; it has {[r['ratio'] for r in kept]}")


def pruned_key(source: ArtifactRef, selection_ref: ArtifactRef, ratio: float) -> Key:
    return Key({"kept_digest": _kept_row(selection_ref, ratio)["digest"]}, [source.key])


@stage(PRUNED_STAGE, key=pruned_key, task_name="materialize-pruned")
def materialize_pruned(
    source: ArtifactRef, selection_ref: ArtifactRef, ratio: float, store: str, run: StageRun
) -> Publish:
    """The pruned source at `ratio` in the `dataset` stage's format (rows copied, not re-encoded)."""
    sel = selection_ref.open()  # the kept indices are read here: verified
    row = next(r for r in read_kept(sel.file("kept.parquet"), filesystem=sel.fs) if abs(r.ratio - ratio) < 1e-9)
    # The source rows are copied, not decoded, often in the flow process and once per pruned view: sizes
    # only (a full hash of a large source per view would dominate); every decoding reader hashes them.
    src = source.open(verify="size")
    info = DatasetInfo.of(src)
    kept = torch.tensor(row.kept, dtype=torch.int64)

    def write(staging: Staging) -> PrunedInfo:
        train = pq.read_table(src.file("train.parquet"), filesystem=src.fs).take(kept.numpy())
        train_labels = torch.tensor(train.column("label").to_numpy())
        present = torch.unique(train_labels)
        test = pq.read_table(src.file("test.parquet"), filesystem=src.fs)
        test_labels = torch.tensor(test.column("label").to_numpy())
        test = test.take(torch.isin(test_labels, present).nonzero().flatten().numpy())
        provenance = {"pruned_from": source.uri, "selection": selection_ref.uri, "method": row.method, "ratio": ratio}
        counts = {}
        for name, table in (("train", train), ("test", test)):
            meta = dict(table.schema.metadata or {})
            ours = json.loads(meta.get(b"distillery", b"{}"))
            meta[b"distillery"] = json.dumps({**ours, **provenance}).encode()
            pq.write_table(table.replace_schema_metadata(meta), staging.file(f"{name}.parquet"), filesystem=staging.fs)
            lab = torch.tensor(table.column("label").to_numpy())
            counts[name] = torch.bincount(lab, minlength=len(info.class_names)).tolist()
        with staging.fs.open_output_stream(staging.file(PREPROCESSOR_FILE)) as f:
            f.write(read_bytes(src.fs, src.file(PREPROCESSOR_FILE)))
        digest = kept_digest(row.kept)
        present_before = sum(c > 0 for c in info.class_counts["train"])
        return PrunedInfo(
            rows={"train": train.num_rows, "test": test.num_rows},
            class_counts=counts,
            class_names=info.class_names,
            image_shape=info.image_shape,
            # Derived, not re-hashed pixels: the source's fingerprint plus the kept indices name them exactly.
            fingerprints={
                s: hashlib.sha256(f"{info.fingerprints[s]}:{digest}".encode()).hexdigest()[:16]
                for s in ("train", "test")
            },
            preprocessor=info.preprocessor,
            kept_classes=row.kept_classes,
            kept_fraction={
                "classes": sum(c > 0 for c in counts["train"]) / max(1, present_before),
                "images": train.num_rows / max(1, info.rows["train"]),
            },
            **provenance,
        )

    return Publish(write)


# ---------------------------------------------------------------- report


def class_table(selection_ref: ArtifactRef, top: int) -> list[dict[str, Any]]:
    """The `top` best and worst source classes (or clusters) of one selection's ranking, with names and votes."""
    art = selection_ref.open()
    if "selection.parquet" not in art.manifest["files"]:
        return []
    selection, names, _ = read_selection(art.file("selection.parquet"), filesystem=art.fs)
    method = SelectionInfo.of(art).selector
    rows = []
    n = selection.num_classes
    for end, ids in (("top", selection.ranking[:top]), ("bottom", selection.ranking.flip(0)[:top])):
        for c in ids.tolist():
            rank = int(selection.rank[c])
            rows.append(
                {
                    "method": method,
                    "end": end,
                    "rank": rank,
                    "class": c,
                    "name": names[c],
                    "votes": int(selection.votes[c]),
                    "score": float(selection.scores[c]),
                }
            )
    return [r for r in rows if r["end"] == "top" or r["rank"] >= min(top, n)]


@task(name="report-selection", result_serializer="json")
def report_selection(selections: list[ArtifactRef], name: str, top: int = 10) -> list[dict[str, Any]]:
    """Table artifact: the top and bottom source classes of each selector's ranking, names and votes."""
    seen, rows = set(), []
    for ref in selections:
        selector = SelectionInfo.of(ref).selector
        # One ranking per selector: lm_bottom reads lm's, and seeds of a deterministic selector repeat it.
        if selector in seen:
            continue
        seen.add(selector)
        rows += class_table(ref, top)
    if rows:
        reports.table(
            rows,
            key=reports.ui_key(name, "classes"),
            description=f"{name}: top and bottom {top} source classes per method (votes of target images)",
        )
    return rows
