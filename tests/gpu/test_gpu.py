"""Tests that need CUDA (marker `gpu`; skipped without it): Ray's GPU assignment, DSA and resume on CUDA.

Run on a GPU machine by scripts/gpu_check.sh (check `gpu_tests`), or alone:
    .venv/bin/python -m pytest tests/gpu -m gpu -q
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

# cuBLAS is deterministic only with a fixed workspace; it reads this when CUDA first starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU visible to torch)"),
]


# ---------------------------------------------------------------- device from Ray's assignment

# Checked before the fixtures start a Prefect server and Ray (a GPU image may lack both).
_NO_RAY = not all(importlib.util.find_spec(m) for m in ("ray", "prefect", "prefect_ray"))


@pytest.mark.skipif(_NO_RAY, reason="Ray, Prefect and prefect-ray are not installed here")
@pytest.mark.parametrize(
    ("num_gpus", "tasks", "num_cpus", "together", "device"),
    [
        (1.0, 2, 1.0, 1, "cuda"),  # a whole GPU each: one at a time
        (0.25, 4, 0.5, 4, "cuda"),  # four share the GPU, all at once
        (0.0, 2, 1.0, 2, "cpu"),  # no GPU granted: CPU even though CUDA is visible to the driver
    ],
)
def test_task_device_follows_rays_gpu_assignment(
    prefect_server, ray_logical_gpu, num_gpus, tasks, num_cpus, together, device
):
    """Prefect tasks on the RayTaskRunner under heavy(Resources(...), stage), the path every stage takes."""
    import ray
    from prefect import flow, task

    from tasks.runtime import Resources, heavy, ray_task_runner, task_device
    from tests.tasks.test_runtime import Gate

    @task
    def placed(gate, peers: int) -> dict:
        ray.get(gate.enter.remote())
        deadline = time.monotonic() + 60
        while ray.get(gate.count.remote()) < peers and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # long enough for a wrongly admitted peer to show up in the peak
        dev = task_device()
        x = torch.arange(4.0, device=dev) * 2
        info = {
            "device": dev,
            "tensor_device": str(x.device),
            "sum": float(x.sum()),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "assigned_gpu": ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0),
        }
        ray.get(gate.leave.remote())
        return info

    @flow(task_runner=ray_task_runner())
    def run() -> tuple[list[dict], int]:
        gate = Gate.remote()
        with heavy(Resources(num_gpus=num_gpus, num_cpus=num_cpus), "experts"):
            futures = [placed.submit(gate, together) for _ in range(tasks)]
        return [f.result() for f in futures], ray.get(gate.peak.remote())

    results, peak = run()
    assert peak == together
    for info in results:
        assert info["device"] == device and info["tensor_device"].startswith(device)
        assert info["sum"] == 12.0
        assert info["assigned_gpu"] == pytest.approx(num_gpus)
        assert info["gpu_ids"] == (["0"] if num_gpus else [])


# ---------------------------------------------------------------- DSA on CUDA


@pytest.mark.parametrize("mode", ["single", "all"])
def test_dsa_same_seed_same_augmentation_on_cuda(mode):
    """Parameters come from a seeded CPU generator: the same seed augments identically on CUDA, and as on CPU."""
    from distill.augment import DSAConfig, dsa

    cfg = DSAConfig(mode=mode)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gpu = x.cuda()
    runs = [dsa(gpu, cfg, generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert runs[0].is_cuda and torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    on_cpu = dsa(x, cfg, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(runs[0].cpu(), on_cpu, atol=1e-4, rtol=1e-4)


def test_dsa_replayed_params_give_the_same_gradient_on_cuda():
    """Constant-memory matching replays a DSA draw to rebuild a step's graph: the replay must agree on CUDA."""
    from distill.augment import DSAConfig, apply_params, sample_params

    x = torch.randn(32, 3, 32, 32, device="cuda", requires_grad=True)
    params = sample_params(32, DSAConfig(mode="all"), torch.Generator().manual_seed(3))
    grads = []
    for _ in range(2):
        (g,) = torch.autograd.grad(apply_params(x, params).pow(2).sum(), x)
        grads.append(g)
    # grid_sample's CUDA backward accumulates with atomics: equal up to float32 summation order
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- resume on CUDA


@pytest.fixture
def deterministic_cuda():
    """cuDNN/cuBLAS in deterministic mode: without it two uninterrupted GPU runs may already differ."""
    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def test_expert_resume_on_cuda_is_bit_identical(tmp_path, deterministic_cuda):
    from distill.experts import checkpoint_dir, train_expert
    from distill.trajectory import expert_file
    from tests.distill.test_experts import NUM_CLASSES, TEST, TRAIN, _all_snapshots, _cfg, _Crash, _crash_after

    cfg = _cfg("ast", batch_size=32)  # momentum, gradient penalty, DSA and shuffling state all matter

    def train(path, **kwargs) -> dict:
        return train_expert(
            cfg, *TRAIN, *TEST, num_classes=NUM_CLASSES, expert_id=5, out_path=path, device="cuda", **kwargs
        )

    whole = tmp_path / "whole" / expert_file(5)
    train(whole)
    resumed = tmp_path / "resumed" / expert_file(5)
    with pytest.raises(_Crash):
        train(resumed, progress=_crash_after(2))
    assert checkpoint_dir(resumed).is_dir()
    assert train(resumed)["resumed_from"] == 2
    assert all(torch.equal(a, b) for a, b in zip(_all_snapshots(whole), _all_snapshots(resumed), strict=True))
