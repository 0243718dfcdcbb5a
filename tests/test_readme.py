"""The README's Python snippets run as written, on a set published the way the pipeline publishes.

Snippets name `artifacts/random-real/<key>` and `../shared/data/cifar10`; the test makes a small
random-real-style set under a temporary `artifacts/` and substitutes only those two strings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from distill.data import DataConfig
from distill.formats import write_distilled
from distill.manifest import write_folder_manifest
from distill.transforms import Preprocessor
from tests.conftest import data_path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_snippets():
    assert len(_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_snippet_runs(tmp_path, monkeypatch, hf_datasets, index):
    cifar = data_path("cifar10")
    data = {"source": str(cifar), "classes": [0, 1], "train_per_class": 4, "test_per_class": 5}
    real = DataConfig(**data).load("train")
    pre = Preprocessor.fit(real.images)
    folder = tmp_path / "artifacts" / "random-real" / "0123456789abcdef"
    write_distilled(
        str(folder),
        pixels=pre(real.images),
        labels=real.labels,
        class_names=real.class_names,
        preprocessor_config=pre.config(),
        preprocessor_tensors=pre.state_dict(),
        recipe={"net": "convnet", "net_kwargs": {"width": 8, "depth": 2}},
        method="random-real",
        provenance={"data": data},
        learned_lr=0.01,
    )
    write_folder_manifest(str(folder), stage="random-real")
    _, cache = hf_datasets
    monkeypatch.setenv("HF_DATASETS_CACHE", cache)
    monkeypatch.chdir(tmp_path)
    code = _python_blocks()[index].replace("<key>", folder.name).replace("../shared/data/cifar10", str(cifar))
    namespace: dict = {}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if "batch" in namespace:
        assert tuple(namespace["batch"]["pixels"].shape) == (8, 3, 32, 32)
    if "test_x" in namespace:
        assert namespace["test_x"].shape[0] == namespace["test_y"].shape[0] == 10
        assert isinstance(namespace["x"], torch.Tensor)
