"""Tests for distill.trajectory: the per-expert Parquet trajectory format, its reader and sets."""

import json
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distill.nets import create_net, param_layout
from distill.trajectory import (
    Snapshot,
    TrajectoryError,
    TrajectoryReader,
    TrajectorySet,
    expert_file,
    write_trajectory,
)

NET_KWARGS = {"width": 8, "depth": 2}


def _net(width: int = 8) -> torch.nn.Module:
    return create_net("convnet", num_classes=3, image_size=16, width=width, depth=2)


LAYOUT = param_layout(_net())
NUM_PARAMS = sum(p.numel() for p in _net().parameters())


def _meta(**changes) -> dict:
    meta = {
        "net": "convnet",
        "net_kwargs": NET_KWARGS,
        "num_classes": 3,
        "channels": 3,
        "image_size": 16,
        "recipe": {"recipe": "mtt", "lr": 0.01},
        "dataset_fingerprint": "data-1",
        "preprocessor_fingerprint": "prep-1",
        "seed": 0,
        "complete": True,
        "epochs_planned": 4,
    }
    return {**meta, **changes}


def _snapshots(epochs: int, seed: int = 0, num_params: int = NUM_PARAMS) -> list[Snapshot]:
    g = torch.Generator().manual_seed(seed)
    snaps = [Snapshot(0, torch.randn(num_params, generator=g), test_acc=0.3, test_loss=1.1)]
    for e in range(1, epochs + 1):
        snaps.append(
            Snapshot(
                e,
                torch.randn(num_params, generator=g),
                train_acc=0.5 + e / 100,
                train_loss=1.0 / e,
                loss=0.9 / e,
                grad_penalty=0.0,
                test_acc=0.4 + e / 100,
                test_loss=1.2 / e,
                lr=0.01,
            )
        )
    return snaps


def _write(path, epochs: int = 4, seed: int = 0, **meta_changes) -> list[Snapshot]:
    snaps = _snapshots(epochs, seed)
    write_trajectory(path, snaps, LAYOUT, _meta(**{"epochs_planned": epochs, **meta_changes}))
    return snaps


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / expert_file(7)
    snaps = _write(path)
    assert path.name == "expert-00007.parquet"
    with TrajectoryReader(path, layout=_net()) as reader:
        assert reader.num_snapshots == 5 and reader.epochs == [0, 1, 2, 3, 4] and reader.complete
        assert reader.layout == LAYOUT and reader.num_params == NUM_PARAMS
        assert reader.meta["format"] == "trajectory" and reader.meta["format_version"] == 1
        assert reader.meta["recipe"] == {"recipe": "mtt", "lr": 0.01} and reader.meta["net_kwargs"] == NET_KWARGS
        for snap in snaps:
            stored = reader.snapshot(snap.epoch)
            assert stored.dtype == torch.float32 and torch.equal(stored, snap.params)
        metrics = reader.metrics()
        assert metrics[0]["train_acc"] is None and metrics[0]["param_change"] is None
        assert metrics[0]["test_acc"] == 0.3
        assert metrics[2]["train_loss"] == 0.5 and metrics[2]["lr"] == 0.01
        expected_change = torch.linalg.vector_norm(snaps[2].params.double() - snaps[1].params.double()).item()
        assert metrics[2]["param_change"] == pytest.approx(expected_change, rel=1e-12)
        assert [s.epoch for s in reader.iter_snapshots()] == [0, 1, 2, 3, 4]


def test_schema_metadata_and_one_row_group_per_snapshot(tmp_path):
    path = tmp_path / "t.parquet"
    _write(path)
    file = pq.ParquetFile(path)
    assert file.num_row_groups == 5
    meta = json.loads(file.schema_arrow.metadata[b"distillery"])
    assert meta["layout"][0] == [LAYOUT[0][0], list(LAYOUT[0][1])] and meta["num_params"] == NUM_PARAMS
    features = json.loads(file.schema_arrow.metadata[b"huggingface"])["info"]["features"]
    assert features["params"]["length"] == NUM_PARAMS and features["epoch"]["dtype"] == "int32"
    column = file.metadata.row_group(0).column(1)
    assert column.path_in_schema.startswith("params") and column.compression == "UNCOMPRESSED"


def test_layout_mismatch_names_file_and_parameter(tmp_path):
    path = tmp_path / expert_file(1)
    _write(path)
    expected = (
        r"expert-00001\.parquet: .* at parameter 0: "
        r"file has 'features\.0\.weight' \[8, 3, 3, 3\], the net has 'features\.0\.weight' \[16, 3, 3, 3\]"
    )
    with pytest.raises(TrajectoryError, match=expected):
        TrajectoryReader(path, layout=_net(width=16))
    deeper = create_net("convnet", num_classes=3, image_size=16, width=8, depth=3)
    with pytest.raises(TrajectoryError, match=r"expert-00001\.parquet.*parameter"):
        TrajectoryReader(path, layout=deeper)


def test_truncated_or_foreign_file_is_a_trajectory_error(tmp_path):
    path = tmp_path / expert_file(2)
    _write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrajectoryError, match=r"expert-00002\.parquet.*truncated or corrupt"):
        TrajectoryReader(path)
    with pytest.raises(TrajectoryError, match="no such trajectory file"):
        TrajectoryReader(tmp_path / "missing.parquet")
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), other)
    with pytest.raises(TrajectoryError, match=r"other\.parquet.*not a trajectory"):
        TrajectoryReader(other)
    assert isinstance(TrajectoryError("x"), ValueError)


def test_wrong_format_version_is_refused(tmp_path):
    path = tmp_path / "t.parquet"
    _write(path)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"distillery"])
    meta["format_version"] = 99
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"distillery": json.dumps(meta)}), path)
    with pytest.raises(TrajectoryError, match="unsupported trajectory format version 99"):
        TrajectoryReader(path)


def test_incomplete_trajectory_is_refused_unless_allowed(tmp_path):
    path = tmp_path / expert_file(3)
    snaps = _write(path, complete=False, epochs_planned=10)
    reader = TrajectoryReader(path)
    assert not reader.complete and len(reader.metrics()) == 5  # metrics stay readable
    with pytest.raises(TrajectoryError, match=r"expert-00003\.parquet: incomplete trajectory \(4 of 10 epochs\)"):
        reader.snapshot(1)
    assert torch.equal(TrajectoryReader(path, allow_incomplete=True).snapshot(1), snaps[1].params)
    with pytest.raises(TrajectoryError, match="no snapshot for epoch 9"):
        TrajectoryReader(path, allow_incomplete=True).snapshot(9)


def test_one_snapshot_reads_one_row_group_of_one_column(tmp_path, monkeypatch):
    path = tmp_path / "long.parquet"
    snaps = _snapshots(49, num_params=NUM_PARAMS)
    write_trajectory(path, snaps, LAYOUT, _meta(epochs_planned=49))
    reader = TrajectoryReader(path)
    calls = []

    def spy(name, original):
        def read(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return original(self, *args, **kwargs)

        return read

    for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, spy(name, getattr(pq.ParquetFile, name)))
    stored = reader.snapshot(37)
    assert torch.equal(stored, snaps[37].params)
    assert calls == [("read_row_group", (37,), {"columns": ["params"]})]
    assert reader.num_snapshots == 50 and pq.ParquetFile(path).num_row_groups == 50


def test_write_failure_leaves_nothing_under_the_final_name(tmp_path):
    path = tmp_path / expert_file(4)

    def broken():
        yield from _snapshots(2)
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash while writing"):
        write_trajectory(path, broken(), LAYOUT, _meta())
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="epochs must increase"):
        write_trajectory(path, list(reversed(_snapshots(2))), LAYOUT, _meta())
    with pytest.raises(ValueError, match=r"missing \['seed'\]"):
        write_trajectory(path, _snapshots(1), LAYOUT, {k: v for k, v in _meta().items() if k != "seed"})
    with pytest.raises(ValueError, match="has 5 parameters; the layout has"):
        write_trajectory(path, [Snapshot(0, torch.zeros(5))], LAYOUT, _meta())
    assert os.listdir(tmp_path) == []


def test_trajectory_set_and_random_segment(tmp_path):
    written = {i: _write(tmp_path / expert_file(i), seed=i) for i in (0, 1, 5)}
    (tmp_path / ".expert-00009.parquet.tmp-1-abc").write_bytes(b"partial")  # temp files are ignored
    experts = TrajectorySet(tmp_path, layout=_net())
    assert len(experts) == 3 and experts.expert_ids == [0, 1, 5] and experts.last_epoch == 4
    assert experts.reader(2).path.endswith("expert-00005.parquet")
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        start_params, target_params, expert_id, start = experts.random_segment(g, max_start_epoch=2, expert_epochs=2)
        assert 0 <= start <= 2
        assert torch.equal(start_params, written[expert_id][start].params)
        assert torch.equal(target_params, written[expert_id][start + 2].params)
        seen.add((expert_id, start))
    assert {e for e, _ in seen} == {0, 1, 5} and {s for _, s in seen} == {0, 1, 2}
    with pytest.raises(ValueError, match=r"3 \+ 2 = 5 exceeds the last stored epoch 4"):
        experts.random_segment(g, max_start_epoch=3, expert_epochs=2)
    with pytest.raises(ValueError, match="expert_epochs >= 1"):
        experts.random_segment(g, max_start_epoch=0, expert_epochs=0)


def test_trajectory_set_refuses_mixed_or_incomplete_experts(tmp_path):
    _write(tmp_path / expert_file(0))
    _write(tmp_path / expert_file(1), recipe={"recipe": "ast", "lr": 0.003})
    with pytest.raises(TrajectoryError, match=r"expert-00001\.parquet: recipe differs from expert-00000\.parquet"):
        TrajectorySet(tmp_path)
    _write(tmp_path / expert_file(1), dataset_fingerprint="other-data")
    with pytest.raises(TrajectoryError, match=r"expert-00001\.parquet: dataset_fingerprint differs"):
        TrajectorySet(tmp_path)
    _write(tmp_path / expert_file(1), complete=False, epochs_planned=9)
    with pytest.raises(TrajectoryError, match=r"expert-00001\.parquet: incomplete trajectory"):
        TrajectorySet(tmp_path)
    with pytest.raises(TrajectoryError, match="no expert trajectory files"):
        TrajectorySet(tmp_path / "empty")


def test_datasets_reads_a_trajectory(tmp_path):
    path = tmp_path / expert_file(0)
    snaps = _write(path)
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 5 and ds.features["params"].length == NUM_PARAMS
    torch_ds = ds.with_format("torch")
    assert torch.equal(torch_ds[3]["params"], snaps[3].params) and int(torch_ds[3]["epoch"]) == 3
    assert ds[0]["train_acc"] is None and ds[4]["test_loss"] == pytest.approx(0.3)
