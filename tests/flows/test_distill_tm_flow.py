"""The `distill-tm` flow in-process against the session's Prefect server and local Ray (tiny preset).

Checks the published distilled set opens with `datasets.load_dataset("parquet", ...)` and that
its evaluation is reproduced from the artifact alone (pixels, labels, learned lr, recipe and
preprocessor all read from the artifact's files), and that mismatched expert sets are refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from distill.data import load_images
from distill.evaluate import EvalConfig, evaluate_set
from distill.formats import read_distilled
from distill.matching import MatchingError
from distill.transforms import Preprocessor
from flows.distill_tm import DistillTMConfig, distill_tm_flow
from flows.presets import load_preset, presets
from tasks.artifacts import ArtifactRef
from tasks.datasets import materialize_dataset
from tasks.matching import check_expert_set
from tests.conftest import DATA, data_path


@pytest.mark.parametrize("preset", sorted(presets("distill-tm")))
def test_every_preset_is_a_valid_config(preset):
    cfg = DistillTMConfig(**load_preset("distill-tm", preset))
    assert cfg.distill and cfg.eval


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"distill": []}, "at least 1 item"),
        ({"distill": [{"ipc": 1, "syn_steps": 0}]}, "greater than or equal to 1"),
        ({"distill": [{"ipc": 1, "max_start_epoch": 2, "expert_epochs": 2}]}, "exceeds the experts' 3 epochs"),
        ({"distill": [{"ipc": 1, "expert_epochs": 1, "max_start_epoch": 1}] * 2}, "its own"),
        ({"distill": [{"ipc": 1, "memory": "tesla"}]}, "valid: unrolled, constant"),
    ],
)
def test_bad_parameters_are_refused(change, message):
    with pytest.raises(ValidationError, match=message):
        DistillTMConfig(**{**load_preset("distill-tm", "tiny"), **change})


@pytest.mark.integration
def test_distill_tm_tiny_end_to_end(prefect_server, hf_datasets, tmp_path):
    data_path("cifar10", "train.parquet")
    preset = load_preset("distill-tm", "tiny")
    # a second entry learns soft labels (DATM): it is trained on them and on its hard labels
    soft_entry = {**preset["distill"][0], "soft_labels": True, "lr_labels": 2.0}
    cfg = DistillTMConfig(**{**preset, "distill": [*preset["distill"], soft_entry], "store": str(tmp_path)})
    result = distill_tm_flow(cfg)

    summary = {(r["method"], r["setting"], r["labels"]): r for r in result["summary"]}
    assert set(summary) == {
        ("tm-mtt", "ipc1/convnet", "hard"),
        ("tm-mtt+soft", "ipc1/convnet", "hard"),
        ("tm-mtt+soft", "ipc1/convnet", "soft"),
        ("random-real", "ipc1/convnet", "hard"),
        ("random-real", "ipc1/convnet", "soft"),  # the experts' logits on the same random images
        ("full-real", "full/convnet", "hard"),  # all 60 training images, same recipe
    }
    assert all(r["seeds"] == 2 and 0 <= r["test_acc_mean"] <= 1 for r in summary.values())

    # DD-Ranking scores per distilled set, from the mean accuracies, against the same kind of labels
    ranking = {r["method"]: r for r in result["ranking"]}
    assert set(ranking) == {"tm-mtt", "tm-mtt+soft"} and ranking["tm-mtt+soft"]["own_labels"] == "soft"
    acc = {k: v["test_acc_mean"] for k, v in summary.items()}
    for method, own in (("tm-mtt", "hard"), ("tm-mtt+soft", "soft")):
        r = ranking[method]
        hlr = acc[("full-real", "full/convnet", "hard")] - acc[(method, "ipc1/convnet", "hard")]
        ior = acc[(method, "ipc1/convnet", own)] - acc[("random-real", "ipc1/convnet", own)]
        assert r["hlr"] == pytest.approx(hlr) and r["ior"] == pytest.approx(ior) and 0 < r["lrs"] < 1
    # the soft-label baseline keeps its random subset's provenance (which images) beside the experts'
    (soft_random,) = (tmp_path / "random-real-soft").iterdir()
    provenance = read_distilled(str(soft_random)).provenance
    assert len(provenance["indices"]) == 3 and provenance["experts"] == result["experts_uri"]
    soft_uri = result["distilled"]["mtt+soft-ipc1"]
    soft_set = read_distilled(soft_uri)
    assert soft_set.soft_labels is not None and soft_set.soft_labels.shape == (3, 3)

    uri = result["distilled"]["mtt-ipc1"]
    datasets, cache = hf_datasets
    ds = datasets.load_dataset("parquet", data_files=f"{uri}/data/*.parquet", split="train", cache_dir=cache)
    assert ds.features["label"].names == ["airplane", "automobile", "bird"]
    ds = ds.with_format("torch")
    pixels, labels = ds[:]["pixels"], ds[:]["label"]
    assert pixels.shape == (3, 3, 32, 32) and labels.tolist() == [0, 1, 2]

    # Re-evaluate seed 0 from the artifact alone: recipe, learned lr and preprocessor from its files.
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(f"{uri}/data/train-00000-of-00001.parquet").metadata[b"distillery"])
    assert meta["learned_lr"] > 0 and meta["provenance"]["experts_key"] and meta["method"] == "tm-mtt"
    pre = Preprocessor.from_bytes(open(f"{uri}/preprocessor.safetensors", "rb").read())
    test = load_images(str(DATA / "cifar10"), "test", classes=[0, 1, 2], per_class=10, seed=0)
    recipe = meta["recipe"]
    eval_cfg = EvalConfig(
        net=recipe["net"], net_kwargs=recipe["net_kwargs"], train=recipe["train"], num_models=1, use_learned_lr=False
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray task had (num_cpus 1): same float reduction order, same bits
    try:
        again = evaluate_set(
            pixels.float(), labels.long(), pre(test.images), test.labels, eval_cfg, num_classes=3, seed=0, device="cpu"
        )
    finally:
        torch.set_num_threads(threads)
    from distill.formats import read_metrics

    rows = read_metrics(result["metrics_uri"] + "/metrics.parquet")
    flow_row = next(r for r in rows if r["method"] == "tm-mtt" and r["seed"] == 0 and r["labels"] == "hard")
    assert again["lr"] == pytest.approx(meta["learned_lr"]) == pytest.approx(flow_row["lr"])
    assert again["test_acc"] == flow_row["test_acc"]

    loss = pq.read_table(f"{uri}/loss.parquet").to_pylist()
    assert [r["iteration"] for r in loss] == list(range(1, 7)) and all(r["loss"] > 0 for r in loss)

    # Mismatched expert sets are refused before any distillation (the flow runs this check on
    # every entry before submitting work): another preprocessing (ZCA), another model.
    experts = ArtifactRef(store=str(tmp_path), stage="experts", key=result["experts_uri"].rstrip("/").split("/")[-1])
    dataset = ArtifactRef(store=str(tmp_path), stage="dataset", key=result["dataset_uri"].rstrip("/").split("/")[-1])
    zca = materialize_dataset.fn(cfg.data.model_copy(update={"zca": True}), str(tmp_path))
    with pytest.raises(MatchingError, match="another preprocessing, e.g. the other ZCA setting"):
        check_expert_set(cfg.distill[0], experts, zca, net="convnet", net_kwargs=cfg.experts.net_kwargs)
    with pytest.raises(MatchingError, match="is for model 'convnet'"):
        check_expert_set(cfg.distill[0], experts, dataset, net="convnet", net_kwargs={"width": 16, "depth": 2})
    with pytest.raises(MatchingError, match="larger than a class"):
        check_expert_set(cfg.distill[0].model_copy(update={"ipc": 21}), experts, dataset)
    check_expert_set(cfg.distill[0], experts, dataset, net="convnet", net_kwargs=cfg.experts.net_kwargs)
