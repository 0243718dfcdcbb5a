"""`python -m flows.cli results`: the newest result table of the store, whichever stage wrote it."""

from __future__ import annotations

import time

from distill.formats import write_metrics
from flows.cli import results
from tasks.store import ArtifactStore


def _publish(store: ArtifactStore, stage: str, file: str, rows: list[dict], name: str, **extra) -> None:
    def write(staging):
        write_metrics(staging.file(file), rows, filesystem=staging.fs)
        return {"rows": len(rows), **extra}

    store.publish(stage, store.key(stage, {"name": name}, []), write, config={"name": name})


def test_results_shows_the_newest_table_with_its_notes(tmp_path):
    store = ArtifactStore(str(tmp_path))
    assert "no results yet" in results(store_uri=str(tmp_path))
    _publish(store, "eval-metrics", "summary.parquet", [{"method": "random-real", "test_acc_mean": 0.3}], "baseline-x")
    assert "baseline-x" in results(store_uri=str(tmp_path))
    time.sleep(1.1)  # created_at has one-second resolution
    _publish(store, "transfer-metrics", "summary.parquet", [{"method": "lm", "linear_probe_acc_mean": 0.4}], "prune-x")
    assert "prune-x" in results(store_uri=str(tmp_path)) and "baseline-x" not in results(store_uri=str(tmp_path))
    time.sleep(1.1)  # created_at has one-second resolution
    _publish(
        store,
        "pipeline-report",
        "report.parquet",
        [{"path": "prune -> KRR-ST", "method": "krr-st"}],
        "pipeline-x",
        notes=["lm kept 5 of 10 source classes"],
    )
    newest = results(store_uri=str(tmp_path))
    assert "pipeline-x" in newest and "- lm kept 5 of 10" in newest and "| krr-st |" in newest
    assert "baseline-x" not in newest and "baseline-x" in results(True, str(tmp_path))
    assert "prune-x" in results(True, str(tmp_path))


def test_datasets_lists_each_published_set_with_a_train_on_command(tmp_path):
    from flows.cli import datasets

    store = ArtifactStore(str(tmp_path))
    assert "no published datasets" in datasets(str(tmp_path))
    before = time.time()

    def publish(stage: str, config: dict) -> str:
        key = store.key(stage, config, [])
        store.publish(stage, key, lambda st: st.fs.open_output_stream(st.file("x")).close(), config=config)
        return key

    tm = publish("distill-tm", {"ipc": 1})
    pruned = publish("pruned", {"source": {"source": "tiny", "test_split": "valid"}})
    text = datasets(str(tmp_path))
    assert f"distilled by trajectory matching: {tmp_path}/distill-tm/{tm}" in text
    assert f"-m distill.train_on {tmp_path}/pruned/{pruned} --test-split valid --seeds 0 1 2" in text
    assert datasets(str(tmp_path), since=before + 3600) == f"no published datasets in {tmp_path}"
