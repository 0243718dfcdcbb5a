"""Tests for distill.checkpoint and distill.utils.derive_seed: round trips, atomic commits, refusals, seeds."""

import hashlib
import json

import pytest
import torch
import torch.nn as nn

import distill.checkpoint as ckpt_module
from distill.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_module_tensors,
    load_optimizer_tensors,
    module_tensors,
    optimizer_tensors,
)
from distill.utils import derive_seed

IDENTITY = {"config": {"lr": 0.1, "widths": [8, 16]}, "data": "abc"}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _step(net: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    x = torch.randn(16, 4, generator=g)
    loss = net(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _save(ckpt: Checkpoint, step: int, net, opt, g, **record) -> None:
    optim, rest = optimizer_tensors("optim", opt)
    ckpt.save(step, {**module_tensors("model", net), **optim, "rng": g.get_state()}, {"optimizer": rest, **record})


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_resuming_from_a_commit_continues_bit_identically(tmp_path, make_opt):
    net, g = _net(), torch.Generator().manual_seed(1)
    opt = make_opt(net.parameters())
    for _ in range(3):
        _step(net, opt, g)
    ckpt = Checkpoint(tmp_path / "ckpt", IDENTITY, kind="test")
    _save(ckpt, 3, net, opt, g, history=[1.5, 0.25])
    for _ in range(4):
        _step(net, opt, g)
    whole = [p.detach().clone() for p in net.state_dict().values()]

    fresh, g2 = _net(), torch.Generator()
    opt2 = make_opt(fresh.parameters())
    saved = Checkpoint(tmp_path / "ckpt", IDENTITY, kind="test").load()
    assert saved.step == 3 and saved.record["history"] == [1.5, 0.25]
    load_module_tensors("model", fresh, saved.tensors)
    load_optimizer_tensors("optim", opt2, saved.tensors, saved.record["optimizer"])
    g2.set_state(saved.tensors["rng"])
    for _ in range(4):
        _step(fresh, opt2, g2)
    assert all(torch.equal(a, b) for a, b in zip(whole, fresh.state_dict().values(), strict=True))


def test_generator_state_round_trips(tmp_path):
    g = torch.Generator().manual_seed(123)
    torch.rand(5, generator=g)
    ckpt = Checkpoint(tmp_path, IDENTITY, kind="test")
    ckpt.save(0, {"rng": g.get_state()})
    expected = torch.rand(7, generator=g)
    restored = torch.Generator()
    restored.set_state(ckpt.load().tensors["rng"])
    assert torch.equal(torch.rand(7, generator=restored), expected)


def test_no_record_means_a_fresh_start(tmp_path):
    assert Checkpoint(tmp_path / "none", IDENTITY, kind="test").load() is None


def _crash_on_write(monkeypatch, nth: int):
    """atomic_file whose `nth` use (1-based) writes half its bytes and then dies, like a killed process."""
    real, calls = ckpt_module.atomic_file, [0]

    class Dying:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt("killed mid-write")

    from contextlib import contextmanager

    @contextmanager
    def flaky(path):
        calls[0] += 1
        with real(path) as f:
            yield Dying(f) if calls[0] == nth else f

    monkeypatch.setattr(ckpt_module, "atomic_file", flaky)


@pytest.mark.parametrize("nth", [1, 2], ids=["in-the-state-file", "in-the-record"])
def test_a_crash_mid_write_leaves_the_previous_commit_loadable(tmp_path, monkeypatch, nth):
    ckpt = Checkpoint(tmp_path, IDENTITY, kind="test")
    ckpt.save(4, {"x": torch.arange(6.0)}, {"n": 4})
    _crash_on_write(monkeypatch, nth)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(5, {"x": torch.full((6,), 9.0)}, {"n": 5})
    saved = Checkpoint(tmp_path, IDENTITY, kind="test").load()
    assert saved.step == 4 and saved.record == {"n": 4} and torch.equal(saved.tensors["x"], torch.arange(6.0))
    assert not list(tmp_path.glob(".*.tmp-*")), "a failed write leaves no temp file"

    monkeypatch.undo()
    ckpt.save(5, {"x": torch.full((6,), 9.0)}, {"n": 5})
    assert ckpt.load().step == 5
    assert len(list(tmp_path.glob("state-*.safetensors"))) == 1, "orphans of the crashed save are cleaned up"


def test_saving_a_step_again_never_touches_the_committed_file(tmp_path):
    ckpt = Checkpoint(tmp_path, IDENTITY, kind="test")
    ckpt.save(2, {"x": torch.zeros(3)})
    committed = json.loads((tmp_path / "state.json").read_text())["state_file"]
    ckpt.save(2, {"x": torch.ones(3)})
    assert json.loads((tmp_path / "state.json").read_text())["state_file"] != committed
    assert torch.equal(ckpt.load().tensors["x"], torch.ones(3))


def test_leftover_temp_files_of_a_killed_writer_are_ignored_and_removed(tmp_path):
    ckpt = Checkpoint(tmp_path, IDENTITY, kind="test")
    ckpt.save(1, {"x": torch.zeros(2)})
    (tmp_path / ".state-0000002-0123abcd.safetensors.tmp-99-deadbeef").write_bytes(b"half a file")
    assert ckpt.load().step == 1
    ckpt.save(2, {"x": torch.zeros(2)})
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_a_checkpoint_of_another_configuration_is_refused_naming_the_difference(tmp_path):
    Checkpoint(tmp_path, IDENTITY, kind="test").save(3, {"x": torch.zeros(1)})
    other = {**IDENTITY, "config": {"lr": 0.2, "widths": [8, 16]}}
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint .* was made with a different configuration \(config: "
        r"stored .*0\.1.*requested .*0\.2.*\), so it belongs to another run",
    ):
        Checkpoint(tmp_path, other, kind="test").load()
    with pytest.raises(CheckpointError, match='data: stored "abc", requested "xyz"'):
        Checkpoint(tmp_path, {**IDENTITY, "data": "xyz"}, kind="test").load()


def test_another_kind_or_an_old_format_is_refused(tmp_path):
    Checkpoint(tmp_path, IDENTITY, kind="expert").save(0, {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"not a matching checkpoint.*delete .* to start over"):
        Checkpoint(tmp_path, IDENTITY, kind="matching").load()
    (tmp_path / "state.json").write_text(json.dumps({"format": "expert-checkpoint", "format_version": 1, "epoch": 3}))
    with pytest.raises(CheckpointError, match="not a expert checkpoint of distillery.checkpoint version 2"):
        Checkpoint(tmp_path, IDENTITY, kind="expert").load()
    (tmp_path / "state.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint(tmp_path, IDENTITY, kind="expert").load()


def test_a_damaged_or_missing_state_file_is_refused(tmp_path):
    ckpt = Checkpoint(tmp_path, IDENTITY, kind="test")
    ckpt.save(1, {"x": torch.arange(100.0)})
    (state,) = tmp_path.glob("state-*.safetensors")
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        ckpt.load()
    state.unlink()
    with pytest.raises(CheckpointError, match="which is missing"):
        ckpt.load()


def test_a_state_file_name_outside_the_directory_is_refused(tmp_path):
    ckpt = Checkpoint(tmp_path, IDENTITY, kind="test")
    ckpt.save(1, {"x": torch.zeros(1)})
    record = json.loads((tmp_path / "state.json").read_text())
    record["state_file"] = "../elsewhere.safetensors"
    (tmp_path / "state.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="invalid state file"):
        ckpt.load()


def test_non_finite_tensors_are_never_loaded(tmp_path):
    ckpt = Checkpoint(tmp_path, IDENTITY, kind="test")
    ckpt.save(1, {"fine": torch.zeros(2), "images": torch.tensor([1.0, float("nan")])})
    with pytest.raises(CheckpointError, match="non-finite values in images"):
        ckpt.load()


def test_derived_seeds_keep_the_values_of_the_formulas_they_replace():
    # The per-expert seeds (seed/expert/purpose) and the per-class sample seeds (seed:class) of
    # earlier releases: cached experts and samples must stay reproducible.
    def old(text: str) -> int:
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1

    assert derive_seed(0, 5, "init") == old("0/5/init") == 2876517180121384876
    assert derive_seed(3, 7, sep=":") == old("3:7") == 7680313942894211686
    assert derive_seed(0, "pool", 1, 0) == old("0/pool/1/0")
    seeds = {derive_seed(0, i, p) for i in range(50) for p in ("init", "data")}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
