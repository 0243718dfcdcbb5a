"""Downstream use: load_distilled reads everything a set needs; train_on reproduces the pipeline's accuracy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.data import DataError
from distill.downstream import load_distilled
from distill.formats import read_metrics, write_distilled, write_image_dataset
from distill.manifest import write_folder_manifest
from distill.train_on import run
from distill.transforms import Preprocessor
from tests.conftest import data_path

ROOT = Path(__file__).resolve().parents[2]


def _write_set(path: Path, *, soft: bool = False, targets: bool = False, lr: float | None = 0.02) -> Preprocessor:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    pre = Preprocessor.fit(images)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    write_distilled(
        str(path),
        pixels=pre(images),
        labels=labels,
        class_names=["a", "b", "c"],
        preprocessor_config=pre.config(),
        preprocessor_tensors=pre.state_dict(),
        recipe={
            "net": "convnet",
            "net_kwargs": {"width": 8, "depth": 1},
            "train": {"epochs": 7, "lr": 0.5, "augment": "none", "loss": "ce"},
        },
        method="test",
        provenance={"data": {"source": "somewhere", "image_size": 8, "classes": [3, 4, 5]}},
        soft_labels=torch.softmax(torch.randn(6, 3, generator=g), 1) if soft else None,
        targets=torch.randn(6, 4, generator=g) if targets else None,
        learned_lr=lr,
    )
    write_folder_manifest(str(path), stage="test")
    return pre


@pytest.mark.parametrize(
    ("soft", "targets", "kind", "loss", "ydim"),
    [(False, False, "labels", "ce", 0), (True, False, "soft_labels", "soft_ce", 3), (False, True, "targets", "mse", 4)],
)
def test_load_distilled_carries_kind_loss_lr_and_transform(tmp_path, soft, targets, kind, loss, ydim):
    pre = _write_set(tmp_path / "set", soft=soft, targets=targets)
    ds = load_distilled(tmp_path / "set")
    assert ds.kind == kind and len(ds) == 6
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and (y.shape == (ydim,) if ydim else y.ndim == 0)
    cfg = ds.train_config()
    assert cfg.loss == loss and cfg.lr == 0.02 and cfg.epochs == 7  # learned lr beats the recipe's 0.5
    assert ds.preprocessor.fingerprint() == pre.fingerprint()
    assert ds.net == ("convnet", {"width": 8, "depth": 1})
    # the recorded DataConfig comes back, with the source replaced where the user's copy lives
    assert ds.data_config("/elsewhere").classes == [3, 4, 5] and ds.data_config("/elsewhere").source == "/elsewhere"


def test_recipe_lr_is_used_when_no_lr_was_learned(tmp_path):
    _write_set(tmp_path / "set", lr=None)
    assert load_distilled(tmp_path / "set").train_config().lr == 0.5


def test_image_dataset_folder_loads_with_its_preprocessor(tmp_path):
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    write_image_dataset(str(tmp_path / "train.parquet"), images, torch.tensor([0, 1, 0, 1]), ["x", "y"])
    pre = Preprocessor.standard([0.5] * 3, [0.25] * 3)
    pre.save(tmp_path / "preprocessor.safetensors")
    write_folder_manifest(str(tmp_path))
    ds = load_distilled(tmp_path)
    assert ds.kind == "labels" and ds.class_names == ["x", "y"]
    torch.testing.assert_close(ds.pixels, pre(images))


def test_not_a_dataset_and_unknown_paths_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="neither a distilled dataset"):
        load_distilled(tmp_path, verify=False)
    with pytest.raises(DataError, match="no manifest.json"):
        load_distilled(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        load_distilled(tmp_path / "missing")


def test_hub_name_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match="could not fetch hub dataset 'nobody/no-such-set'"):
        load_distilled("nobody/no-such-set")
    assert time.perf_counter() - start < 10


def test_a_set_without_recorded_data_needs_data(tmp_path):
    _write_set(tmp_path / "set")
    meta_free = load_distilled(tmp_path / "set")
    meta_free.provenance = {}
    with pytest.raises(DataError, match="pass the real data's location"):
        meta_free.data_config()


def test_train_on_refuses_unknown_arch_listing_valid_ones(tmp_path):
    _write_set(tmp_path / "set")
    proc = subprocess.run(
        [sys.executable, "-m", "distill.train_on", str(tmp_path / "set"), "--arch", "vgg11"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "unknown architecture 'vgg11'; valid: convnet" in proc.stderr


def _cat_dog_set(name: str, epochs: int) -> Path:
    """4 real cats and 4 dogs of CIFAR-10 as a verified distilled-format set, labels renumbered 0/1
    (so the test split must be relabelled by name, not by id), with a tiny ConvNet recipe."""
    from distill.data import DataConfig

    data = {"source": str(data_path("cifar10")), "classes": [3, 5], "train_per_class": 4, "test_per_class": 10}
    real = DataConfig(**data).load("train")
    pre = Preprocessor.fit(real.images)
    out = ROOT / ".pytest_cache" / name
    shutil.rmtree(out, ignore_errors=True)
    write_distilled(
        str(out),
        pixels=pre(real.images),
        labels=real.labels,
        class_names=real.class_names,
        preprocessor_config=pre.config(),
        preprocessor_tensors=pre.state_dict(),
        recipe={
            "net": "convnet",
            "net_kwargs": {"width": 8, "depth": 2},
            "train": {"epochs": epochs, "batch_size": 8, "augment": "none"},
        },
        method="test",
        provenance={"data": data},
    )
    write_folder_manifest(str(out))
    return out


def test_train_on_matches_classes_by_name_and_trains_another_arch():
    out = _cat_dog_set("train_on_set", epochs=2)
    result = run(str(out), arch="resnet18", seeds=[0, 1])
    assert result["summary"]["net"] == "resnet18" and len(result["rows"]) == 2
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["train_images"] == 8 for r in result["rows"])


def test_train_on_pretrains_a_target_set_and_transfers_to_the_real_data():
    cifar = data_path("cifar10")
    from distill.data import DataConfig

    data = {"source": str(cifar), "classes": [3, 5], "train_per_class": 8, "test_per_class": 10}
    real = DataConfig(**data).load("train")
    pre = Preprocessor.fit(real.images)
    out = ROOT / ".pytest_cache" / "train_on_targets"
    shutil.rmtree(out, ignore_errors=True)
    quick = {"epochs": 1, "batch_size": 8, "augment": "none"}
    write_distilled(
        str(out),
        pixels=pre(real.images[:6]),
        labels=real.labels[:6],
        class_names=real.class_names,
        preprocessor_config=pre.config(),
        preprocessor_tensors=pre.state_dict(),
        targets=torch.randn(6, 5, generator=torch.Generator().manual_seed(0)),
        recipe={
            "net": "convnet_bn",
            "net_kwargs": {"widths": [4, 8]},
            "train": {**quick, "loss": "mse"},
            "transfer": {"linear_probe": quick, "fine_tune": quick},
        },
        method="krr-st",
        provenance={"data": data},
    )
    write_folder_manifest(str(out))
    result = run(str(out), seeds=[0])
    (row,) = result["rows"]
    assert result["summary"]["kind"] == "targets" and row["pretrain_images"] == 6
    assert 0.0 <= row["linear_probe_acc"] <= 1.0 and 0.0 <= row["fine_tune_acc"] <= 1.0
    assert "linear_probe_acc_mean" in result["summary"] and "fine_tune_acc_mean" in result["summary"]


@pytest.mark.integration
def test_a_copied_artifact_alone_reproduces_the_reported_accuracy(prefect_server, tmp_path):
    """The baseline flow reports per-seed accuracies; its artifact folder, copied elsewhere with
    nothing else, trains to the same accuracies through `python -m distill.train_on`."""
    cifar = data_path("cifar10")
    from flows.baseline import BaselineConfig, baseline
    from flows.presets import load_preset

    params = load_preset("baseline", "tiny")
    params["data"]["source"] = str(cifar)
    result = baseline(BaselineConfig(**{**params, "store": str(tmp_path / "store")}))
    reported = {r["seed"]: r["test_acc"] for r in read_metrics(result["metrics_uri"] + "/metrics.parquet")}
    copy = tmp_path / "elsewhere" / "my-set"
    shutil.copytree(result["subset_uri"], copy)
    shutil.rmtree(tmp_path / "store")  # nothing of the pipeline is left but the copy
    proc = subprocess.run(
        [sys.executable, "-m", "distill.train_on", str(copy), "--json", "--seeds", *map(str, sorted(reported))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "DISTILLERY_DEVICE": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][:-1]
    assert sorted(r["seed"] for r in rows) == sorted(reported)
    for row in rows:
        # measured: identical on CPU; the margin is for thread-count float noise on other machines
        assert abs(row["test_acc"] - reported[row["seed"]]) <= 0.05, (row, reported)


# ---------------------------------------------------------------- integrity and bad arguments (issue 12)


def test_a_flipped_bit_or_a_missing_manifest_is_refused_unless_asked(tmp_path):
    """Old behaviour: load_distilled ignored the manifest, so a flipped pixel bit trained silently."""
    _write_set(tmp_path / "set")
    data = next((tmp_path / "set").rglob("train-*.parquet"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256 does not match"):
        load_distilled(tmp_path / "set")
    (tmp_path / "set" / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        load_distilled(tmp_path / "set")


def test_no_verify_loads_a_folder_without_manifest(tmp_path):
    _write_set(tmp_path / "set")
    (tmp_path / "set" / "manifest.json").unlink()
    assert len(load_distilled(tmp_path / "set", verify=False)) == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--net-kwargs", '{"width": "x"}'], "width"),
        (["--net-kwargs", '{"width": 0}'], "width"),
        (["--net-kwargs", "[1]"], "must be a JSON object"),
        (["--net-kwargs", "{bad"], "not valid JSON"),
        (["--epochs", "-1"], "must be >= 1"),
        (["--epochs", "0"], "must be >= 1"),
        (["--test-split", "train"], "is the training split"),
    ],
)
def test_train_on_bad_arguments_are_one_line_and_exit_2(tmp_path, args, message):
    _write_set(tmp_path / "set")
    proc = subprocess.run(
        [sys.executable, "-m", "distill.train_on", str(tmp_path / "set"), "--data", str(tmp_path), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]  # one line says it (argparse prints usage above)


def test_train_on_prints_progress_and_a_table_or_json(capsys):
    from distill.train_on import main

    out = _cat_dog_set("train_on_table", epochs=3)
    assert main([str(out), "--seeds", "0", "1"]) == 0
    captured = capsys.readouterr()
    assert "seed 1: epoch 3/3" in captured.err and "100%" in captured.err
    table = captured.out.splitlines()
    assert "test accuracy" in table[1] and table[-1].lstrip().startswith("mean") and "+-" in table[-1]
    assert main([str(out), "--seeds", "0", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[-1])["seeds"] == [0] and json.loads(lines[0])["seed"] == 0
