"""Stored snapshots are the live model, and an expert killed with SIGKILL resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from torch.func import functional_call

from distill.experts import checkpoint_dir
from distill.nets import create_net, flatten_params, param_layout, unflatten_params
from distill.train import evaluate
from distill.trajectory import Snapshot, TrajectoryReader, expert_file, write_trajectory
from tests.conftest import REPO
from tests.distill.test_experts import NUM_CLASSES, TEST, _all_snapshots, _cfg, _train


def test_a_loaded_snapshot_gives_the_live_models_outputs(tmp_path):
    torch.manual_seed(0)
    net = create_net("convnet", num_classes=NUM_CLASSES, image_size=16, width=8, depth=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = TEST
    live_outputs, snapshots = [], []
    for epoch in range(3):
        if epoch:
            for _ in range(2):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            live_outputs.append(net(x))
        net.train()
        snapshots.append(Snapshot(epoch=epoch, params=flatten_params(net)))
    path = tmp_path / expert_file(0)
    meta = {
        "net": "convnet",
        "net_kwargs": {"width": 8, "depth": 2},
        "num_classes": NUM_CLASSES,
        "channels": 3,
        "image_size": 16,
        "recipe": {"recipe": "manual"},
        "dataset_fingerprint": "",
        "preprocessor_fingerprint": "",
        "seed": 0,
        "complete": True,
        "epochs_planned": 2,
    }
    write_trajectory(path, snapshots, param_layout(net), meta)

    fresh = create_net("convnet", num_classes=NUM_CLASSES, image_size=16, width=8, depth=2).eval()
    with TrajectoryReader(path, layout=fresh) as reader:
        for epoch, live in enumerate(live_outputs):
            params = unflatten_params(reader.snapshot(epoch), reader.layout)
            with torch.no_grad():
                assert torch.equal(functional_call(fresh, params, (x,)), live), f"epoch {epoch}"


def test_a_trained_experts_final_snapshot_reproduces_its_recorded_test_accuracy(tmp_path):
    path = tmp_path / expert_file(0)
    summary = _train(_cfg("mtt", lr=0.05, augment="none"), path)
    net = create_net("convnet", num_classes=NUM_CLASSES, image_size=16, width=8, depth=2)
    with TrajectoryReader(path, layout=net) as reader:
        final = reader.snapshot(reader.last_epoch)
        recorded = reader.metrics()[-1]
    torch.nn.utils.vector_to_parameters(final, net.parameters())
    again = evaluate(net, *TEST)
    assert again["acc"] == recorded["test_acc"] == summary["test_acc"]
    assert abs(again["loss"] - recorded["test_loss"]) < 1e-6


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.distill.test_experts import _cfg, _train
def slow(epoch, total, **_):
    time.sleep(0.5)  # leaves the parent time to kill us between checkpoints
_train(_cfg("ast", batch_size=32, epochs=6), {path!r}, expert_id=3, progress=slow)
"""


def test_an_expert_killed_mid_training_resumes_to_the_same_trajectory(tmp_path):
    cfg = _cfg("ast", batch_size=32, epochs=6)
    whole = tmp_path / "whole" / expert_file(3)
    _train(cfg, whole, expert_id=3)

    killed = tmp_path / "killed" / expert_file(3)
    killed.parent.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(repo=str(REPO), path=str(killed))], cwd=REPO, start_new_session=True
    )
    state = checkpoint_dir(killed) / "state.json"
    deadline = time.monotonic() + 120
    while not (state.exists() and json.loads(state.read_text()).get("step", 0) >= 2):
        assert child.poll() is None, "the expert finished or died before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint of epoch 2 within 120 s"
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not killed.exists(), "a killed expert must not leave a final trajectory"

    result = _train(cfg, killed, expert_id=3)
    assert result["resumed_from"] >= 2
    assert all(torch.equal(a, b) for a, b in zip(_all_snapshots(whole), _all_snapshots(killed), strict=True))
