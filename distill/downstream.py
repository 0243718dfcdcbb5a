"""Downstream use of distilled and pruned datasets: load one and train on it the way it was made for.

A published distilled dataset is only useful with what travels with its images: the
learned learning rate, the normalization or ZCA transform the pixels live in, soft labels
or regression targets, and the evaluation recipe. `load_distilled` reads all of it from one
folder (or a Hugging Face hub dataset repository) and returns a torch dataset that knows
its own recipe:

    from distill.downstream import load_distilled
    ds = load_distilled("artifacts/distill-tm/<key>")   # or "user/repo" on the hub
    x, y = ds[0]                 # pixels in the model's input space, label / soft label / target
    ds.train_config()            # TrainConfig with the learned lr and the right loss
    test = ds.test_set("../shared/data/cifar10")   # real test images, same transform, same label ids

Three layouts are understood, all written by this project:
- distilled format (`data/train-*.parquet` + `preprocessor.safetensors` + card), including
  random-real subsets and KRR-ST sets (a `target` column);
- image-dataset format (`train.parquet` [+ `test.parquet`] + `preprocessor.safetensors`),
  e.g. a materialized pruned source: images are decoded and transformed with the stored
  preprocessor (a plain normalization fitted on the images when none is stored).

`python -m distill.train_on ARTIFACT` trains networks on any of them (see distill/train_on.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from distill.data import DataConfig, DataError
from distill.formats import DISTILLED_DATA_FILE, PREPROCESSOR_FILE, FormatError, read_distilled, read_image_dataset
from distill.krr import KRR_PRETRAIN
from distill.manifest import IntegrityError, verify_folder
from distill.train import TrainConfig
from distill.transforms import Preprocessor

Kind = Literal["labels", "soft_labels", "targets"]
# owner/name, as the hub spells dataset repositories
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A set without its own recipe: regression targets are pretrained like KRR-ST (its pretrain
# default), images trained like the shared evaluation (SGD, DSA).
_DEFAULT_TRAIN = TrainConfig(epochs=300, batch_size=256, lr=0.01, momentum=0.9, augment="dsa")


@dataclass
class DistilledDataset(Dataset):
    """A (distilled or pruned) training set with everything needed to train on it correctly."""

    pixels: torch.Tensor  # float32 [N, C, H, W], already in the model's input space
    labels: torch.Tensor  # int64 [N]
    class_names: list[str]
    preprocessor: Preprocessor  # how real uint8 images map into that input space
    recipe: dict[str, Any] = field(default_factory=dict)  # {"net", "net_kwargs", "train", ...}
    learned_lr: float | None = None
    soft_labels: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    method: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def kind(self) -> Kind:
        """What a network regresses on: regression targets (KRR-ST), soft labels, or hard labels."""
        if self.targets is not None:
            return "targets"
        if self.soft_labels is not None:
            return "soft_labels"
        return "labels"

    @property
    def y(self) -> torch.Tensor:
        return {"targets": self.targets, "soft_labels": self.soft_labels, "labels": self.labels}[self.kind]

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixels[i], self.y[i]

    @property
    def net(self) -> tuple[str, dict[str, Any]]:
        """The architecture the set was made for (name, constructor kwargs); ConvNet-3 when unrecorded."""
        return self.recipe.get("net", "convnet"), dict(self.recipe.get("net_kwargs", {}))

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The stored training recipe with the learned lr and the loss the labels call for."""
        default = KRR_PRETRAIN if self.kind == "targets" else _DEFAULT_TRAIN
        cfg = TrainConfig(**self.recipe["train"]) if "train" in self.recipe else default
        update: dict[str, Any] = {}
        if self.learned_lr is not None and self.recipe.get("use_learned_lr", True):
            update["lr"] = float(self.learned_lr)
        update["loss"] = {"targets": "mse", "soft_labels": "soft_ce"}.get(self.kind, "ce")
        return cfg.model_copy(update=update | overrides)

    def data_config(self, source: str | None = None) -> DataConfig:
        """The real dataset this set was evaluated on: the recorded DataConfig (its source replaced
        by `source` when given), or all of `source`'s classes at this set's image size."""
        recorded = self.provenance.get("data")
        if recorded:
            return DataConfig(**(dict(recorded) | ({"source": source} if source else {})))
        if not source:
            raise DataError(
                f"{self.path or 'this dataset'} does not record the dataset it was made from; "
                "pass the real data's location (e.g. --data ../shared/data/cifar10)"
            )
        return DataConfig(source=source, image_size=int(self.pixels.shape[-1]))

    def real_split(self, split: str, source: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Real images of `split` ("train", "test" or a split name) in this set's input space.

        A labelled set gets its own classes only, matched by name and labelled with its own
        class ids, so a set made from a class subset (or with renumbered labels) is tested on
        exactly its classes. A regression-target set (pretraining data) gets every class of
        the real data with the real data's labels: that data is the transfer target.
        """
        cfg = self.data_config(source)
        name = {"train": cfg.train_split, "test": cfg.test_split}.get(split, split)
        real = cfg.load(name)
        x = self.preprocessor(real.images)
        if self.kind == "targets":
            return x, real.labels
        ids = {n: i for i, n in enumerate(self.class_names)}
        y = torch.tensor([ids.get(n, -1) for n in real.class_names], dtype=torch.long)[real.labels]
        keep = y >= 0
        if not keep.any():
            raise DataError(
                f"{cfg.source} [{name}] shares no class name with this dataset; its classes are "
                f"{real.class_names[:5]}..., this dataset's {self.class_names[:5]}..."
            )
        return x[keep], y[keep]

    def test_set(self, source: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.real_split("test", source)


def _hub_snapshot(repo: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - datasets depends on it
        raise DataError("loading from the hub needs `huggingface_hub` (pip install huggingface_hub)") from e
    try:
        return Path(snapshot_download(repo_id=repo, repo_type="dataset", revision=revision))
    except Exception as e:  # offline, unknown repo, auth: one clear message
        raise DataError(
            f"could not fetch hub dataset {repo!r} ({type(e).__name__}: {e}); "
            "check the name and your network, or pass a local folder"
        ) from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _from_image_folder(root: Path) -> DistilledDataset:
    images, labels, class_names = read_image_dataset(str(root / "train.parquet"))
    pre_file = root / PREPROCESSOR_FILE
    pre = Preprocessor.load(pre_file) if pre_file.exists() else Preprocessor.fit(images)
    manifest = _read_json(root / "manifest.json")
    data = (manifest.get("config") or {}).get("data")
    return DistilledDataset(
        pixels=pre(images),
        labels=labels.long(),
        class_names=list(class_names),
        preprocessor=pre,
        recipe=manifest.get("recipe", {}),
        method=manifest.get("stage", "image-dataset"),
        provenance={"data": data} if data else {},
        path=str(root),
    )


def load_distilled(
    path_or_repo: str | os.PathLike[str], *, revision: str | None = None, verify: bool = True
) -> DistilledDataset:
    """Load a distilled or pruned dataset from a folder, or from a hub dataset repository `owner/name`.

    With `verify` (the default) the folder must carry the `manifest.json` it was published
    with, sealed by its digest, and every file it lists must match its size and sha256: a
    flipped bit or a missing manifest is an error, not a silently different training set.
    `verify=False` loads whatever is there, for users who know why.
    """
    ref = str(path_or_repo)
    root = Path(ref).expanduser()
    if not root.exists():
        if _HUB_REPO.match(ref) and not ref.startswith((".", "/")):
            root = _hub_snapshot(ref, revision)
        else:
            raise DataError(f"{ref}: no such folder (and not a hub dataset name of the form owner/name)")
    if root.is_file():
        root = root.parent
    if verify:
        try:
            verify_folder(str(root), "hash")
        except IntegrityError as e:
            raise DataError(f"{e} (to load it anyway: verify=False, or --no-verify)") from e
    if (root / DISTILLED_DATA_FILE).exists():
        try:
            s = read_distilled(str(root))
        except FormatError as e:
            raise DataError(str(e)) from e
        return DistilledDataset(
            pixels=s.pixels,
            labels=s.labels,
            class_names=s.class_names,
            preprocessor=Preprocessor.from_state(s.preprocessor_config, s.preprocessor_tensors),
            recipe=dict(s.recipe),
            learned_lr=s.learned_lr,
            soft_labels=s.soft_labels,
            targets=s.targets,
            method=s.method,
            provenance=dict(s.provenance),
            path=str(root),
        )
    if (root / "train.parquet").exists():
        return _from_image_folder(root)
    raise DataError(
        f"{root} holds neither a distilled dataset ({DISTILLED_DATA_FILE}) nor an image dataset "
        "(train.parquet); point at an artifact folder written by distillery"
    )
