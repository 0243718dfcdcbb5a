"""Faster and leaner paths give the same results: the budgeted memory modes of trajectory matching
(float64, to 1e-9 of unrolled), the graph-memory meter, batched evaluation, precision options."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import distill.matching as matching
from distill.augment import DSAConfig, sample_params
from distill.graph_memory import GraphMemoryMeter
from distill.matching import MatchConfig, Segment, Student, matching_grad, step_graph_mb
from distill.nets import create_net, flatten_params
from distill.trajectory import net_meta

STEPS = 5


def _problem(norm: str = "instance", momentum: float = 0.5, soft: bool = False, steps: int = STEPS):
    """A float64 student (ConvNet w6 d2, 4 classes of 3x16x16) and one iteration's segment."""
    torch.manual_seed(0)
    kwargs = {"width": 6, "depth": 2, "norm": norm}
    net = create_net("convnet", num_classes=4, image_size=16, **kwargs)
    student = Student(
        net_meta(net, "convnet", kwargs, num_classes=4, image_size=16), torch.device("cpu"), torch.float64
    )
    start = flatten_params(net).double()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.randn(8, 4, generator=g, dtype=torch.float64) if soft else torch.arange(4).repeat_interleave(2)
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    middle = start + 0.02 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    plan = [(torch.randperm(8, generator=g)[:6], sample_params(6, DSAConfig(), g)) for _ in range(steps)]
    seg = Segment(start, [(2, middle, 0.5), (steps, target, 1.0)], plan, momentum=momentum)
    return student, images, labels, torch.tensor(0.05, dtype=torch.float64), seg


def _segmented(problem, keep: int, learn_labels: bool = False) -> tuple:
    """matching._segmented on leaves prepared as matching_grad prepares them."""
    student, images, labels, lr, seg = problem
    return matching._segmented(
        student,
        images.detach().requires_grad_(True),
        labels.detach().requires_grad_(learn_labels),
        lr.detach().requires_grad_(True),
        seg,
        keep=keep,
    )


def _assert_same(got: tuple, want: tuple) -> None:
    assert len(got) == len(want)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * max(1.0, float(b.abs().max())))
        assert float(b.abs().max()) > 0


@pytest.mark.parametrize("keep", [1, 2, 3, STEPS, STEPS + 4])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_segmented_gradient_equals_unrolled_in_float64(keep, momentum):
    problem = _problem(momentum=momentum)
    _assert_same(_segmented(problem, keep), matching_grad("unrolled", *problem))


def test_segmented_learns_soft_labels_like_unrolled():
    problem = _problem(soft=True)
    want = matching_grad("unrolled", *problem, learn_labels=True)
    _assert_same(_segmented(problem, 2, learn_labels=True), want)


@pytest.mark.parametrize("mode", ["budget", "auto"])
@pytest.mark.parametrize("budget_steps", [0.5, 1.5, 3.2, STEPS + 1])
def test_budgeted_modes_equal_unrolled(mode, budget_steps):
    problem = _problem()
    per_step = step_graph_mb(*problem)
    got = matching_grad(mode, *problem, memory_budget_mb=budget_steps * per_step)
    _assert_same(got, matching_grad("unrolled", *problem))


def test_budget_keeps_as_many_step_graphs_as_fit(monkeypatch):
    """Graph memory: unrolled > budget (2 steps) > constant, and budget near 2 step graphs."""
    problem = _problem(steps=8)
    per_step = step_graph_mb(*problem)
    peaks = {}
    for mode in ("unrolled", "constant", "budget"):
        with GraphMemoryMeter() as meter:
            matching_grad(mode, *problem, memory_budget_mb=2.5 * per_step if mode == "budget" else None)
        peaks[mode] = meter.peak_mb
    assert peaks["unrolled"] > 3 * peaks["budget"] > 3 * 1.5 * per_step
    assert peaks["constant"] < peaks["budget"] <= 2.5 * per_step
    assert peaks["unrolled"] == pytest.approx(8 * per_step, rel=0.25)  # later steps add momentum terms
    # which keep the modes choose
    chosen = []
    monkeypatch.setattr(matching, "_segmented", lambda *a, keep: chosen.append(keep) or (0.0,))
    monkeypatch.setattr(matching, "_constant", lambda *a: chosen.append("constant") or (0.0,))
    monkeypatch.setattr(matching, "_unrolled", lambda *a: chosen.append("unrolled") or (0.0,))
    for mode, steps in [("budget", 0.5), ("budget", 2.5), ("auto", 0.5), ("auto", 2.5), ("auto", 8.0)]:
        matching_grad(mode, *problem, memory_budget_mb=steps * per_step)
    assert chosen == [1, 2, "constant", 2, "unrolled"]


def test_step_graph_mb_is_measured_once_per_layout():
    problem = _problem()
    first = step_graph_mb(*problem)
    assert first > 0
    assert step_graph_mb(*problem) == first
    assert len(matching._STEP_MB[problem[0]]) == 1


def test_budget_config_is_checked_up_front():
    assert "memory_budget_mb" not in MatchConfig().identity()  # old keys and checkpoints stay valid
    assert "fast_layers" not in MatchConfig().identity()
    assert MatchConfig(fast_layers=False).identity()["fast_layers"] is False
    assert MatchConfig(memory="budget", memory_budget_mb=500).identity()["memory_budget_mb"] == 500
    with pytest.raises(ValidationError, match="memory='budget' needs memory_budget_mb"):
        MatchConfig(memory="budget")
    with pytest.raises(ValidationError, match="memory_budget_mb applies to memory in 'budget', 'auto', not 'constant'"):
        MatchConfig(memory="constant", memory_budget_mb=100)
    with pytest.raises(ValidationError):
        MatchConfig(memory="auto", memory_budget_mb=0)
    with pytest.raises(ValueError, match="needs a positive memory_budget_mb"):
        matching_grad("budget", *_problem())


def test_graph_memory_meter_counts_shared_storage_once_and_tracks_release():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    with GraphMemoryMeter() as meter:
        y = x.exp()  # saves its output (8000 bytes)
        z = (y * y).sum()  # saves y twice: no new storage
        assert meter.current_bytes == 8000
        z.backward()
        assert meter.current_bytes == 0
    assert meter.peak_bytes == 8000


# ---------------------------------------------------------------- evaluation nets trained together


def _eval_data():
    g = torch.Generator().manual_seed(5)
    patterns = torch.randn(3, 3, 16, 16, generator=g)
    y = torch.arange(3).repeat_interleave(8)
    x = patterns[y] + 0.7 * torch.randn(len(y), 3, 16, 16, generator=g)
    ty = torch.arange(3).repeat_interleave(20)
    tx = patterns[ty] + 0.7 * torch.randn(len(ty), 3, 16, 16, generator=g)
    return x, y, tx, ty


@pytest.mark.parametrize("augment", ["dsa", "flip_crop"])
def test_batched_evaluation_equals_one_by_one(augment):
    from distill.evaluate import EvalConfig, evaluate_seeds
    from distill.train import TrainConfig

    x, y, tx, ty = _eval_data()
    cfg = EvalConfig(
        net_kwargs={"width": 8, "depth": 2, "norm": "instance"},
        train=TrainConfig(epochs=6, batch_size=10, lr=0.05, momentum=0.9, augment=augment),
        num_models=3,
    )
    one = evaluate_seeds(x, y, tx, ty, cfg, num_classes=3, seeds=[0, 1, 2], batched=False, device="cpu")
    together = evaluate_seeds(x, y, tx, ty, cfg, num_classes=3, seeds=[0, 1, 2], batched=True, device="cpu")
    assert [r["seed"] for r in together] == [0, 1, 2]
    for a, b in zip(one, together):
        assert a["test_acc"] == b["test_acc"]
        assert a["train_acc"] == b["train_acc"]
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
    assert len({r["test_loss"] for r in one}) == 3  # the seeds differ


def test_batched_training_follows_each_nets_own_trajectory():
    from distill.batched import train_batched
    from distill.train import TrainConfig, train
    from distill.utils import seed_everything

    x, y, _, _ = _eval_data()
    cfg = TrainConfig(epochs=4, batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4, augment="dsa")

    def fresh(seed):
        seed_everything(seed)
        return create_net("convnet", num_classes=3, image_size=16, width=6, depth=2)

    alone = [fresh(s) for s in (3, 4)]
    histories = [train(net, x, y, cfg, seed=s, device="cpu").history for net, s in zip(alone, (3, 4))]
    together = [fresh(s) for s in (3, 4)]
    results = train_batched(together, x, y, cfg, seeds=[3, 4], device="cpu")
    for a, b, h, r in zip(alone, together, histories, results):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=name)
        assert [e["train_acc"] for e in r.history] == [e["train_acc"] for e in h]
        assert [e["loss"] for e in r.history] == pytest.approx([e["loss"] for e in h], rel=1e-5)


def test_unbatchable_nets_are_refused_and_evaluation_falls_back():
    from distill.batched import check_batchable, train_batched
    from distill.evaluate import EvalConfig, evaluate_seeds
    from distill.train import TrainConfig

    bn = [create_net("convnet", num_classes=3, image_size=16, width=4, depth=1, norm="batch") for _ in range(2)]
    with pytest.raises(ValueError, match="buffers"):
        check_batchable(bn)
    fused = [create_net("convnet", num_classes=3, image_size=16, width=4, depth=1, norm="instance_fused")]
    with pytest.raises(ValueError, match="no vmap rule"):
        check_batchable(fused)
    mixed = [create_net("convnet", num_classes=3, image_size=16, width=w, depth=1) for w in (4, 5)]
    with pytest.raises(ValueError, match="share one architecture"):
        check_batchable(mixed)
    x, y, tx, ty = _eval_data()
    with pytest.raises(ValueError, match="one seed per net"):
        train_batched(mixed[:1], x, y, TrainConfig(epochs=1), seeds=[0, 1])
    cfg = EvalConfig(net_kwargs={"width": 4, "depth": 1, "norm": "batch"}, train=TrainConfig(epochs=1, augment="none"))
    rows = evaluate_seeds(x, y, tx, ty, cfg, num_classes=3, seeds=[0, 1], batched=True, device="cpu")
    assert [r["seed"] for r in rows] == [0, 1]


# ---------------------------------------------------------------- precision options


def test_precision_fields_keep_old_json_and_refuse_unknown_names():
    from distill.evaluate import EvalConfig
    from distill.experts import ExpertConfig
    from distill.precision import precision_context

    assert "precision" not in EvalConfig().model_dump(mode="json")  # cache keys of fp32 configs unchanged
    assert "precision" not in ExpertConfig().model_dump(mode="json")
    assert "precision" not in MatchConfig().identity()
    assert EvalConfig(precision="bf16").model_dump(mode="json")["precision"] == "bf16"
    assert ExpertConfig.model_validate(ExpertConfig(precision="tf32").model_dump()).precision == "tf32"
    assert MatchConfig(precision="bf16").identity()["precision"] == "bf16"
    for make in (EvalConfig, ExpertConfig, MatchConfig):
        with pytest.raises(ValidationError):
            make(precision="fp16")
    with pytest.raises(ValueError, match="unknown precision 'fp8'; valid: fp32, tf32, bf16"):
        with precision_context("fp8", "cpu"):
            pass


def _float32_problem():
    student, images, labels, lr, seg = _problem()
    seg = Segment(seg.start.float(), [(s, t.float(), w) for s, t, w in seg.targets], seg.plan, momentum=seg.momentum)
    student.net.float()
    return student, images.float(), labels, lr.float(), seg


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_matching_runs_on_cpu_close_to_fp32(fast):
    """bf16 autocast (8-bit mantissa convolutions): loss within 2% and image gradient at cosine
    >= 0.98 of the float32 one, on 5 unrolled steps; tf32 on CPU is float32 exactly."""
    from distill.precision import precision_context

    student, images, labels, lr, seg = _float32_problem()
    if not fast:
        kwargs = {"width": 6, "depth": 2, "norm": "instance"}
        meta = net_meta(student.net, "convnet", kwargs, num_classes=4, image_size=16)
        student = Student(meta, torch.device("cpu"), torch.float32, fast=False)
    want = matching_grad("unrolled", student, images, labels, lr, seg)
    with precision_context("tf32", "cpu"):
        assert torch.equal(matching_grad("unrolled", student, images, labels, lr, seg)[1], want[1])
    with precision_context("bf16", "cpu"):
        got = matching_grad("unrolled", student, images, labels, lr, seg)
    assert got[1].dtype == torch.float32 and torch.isfinite(got[1]).all()
    assert got[0] == pytest.approx(want[0], rel=0.02)
    assert float(torch.nn.functional.cosine_similarity(got[1].flatten(), want[1].flatten(), dim=0)) >= 0.98
    assert not torch.equal(got[1], want[1])  # bf16 really ran


def test_bf16_evaluation_and_experts_run_on_cpu_close_to_fp32(tmp_path):
    from distill.evaluate import EvalConfig, evaluate_set
    from distill.experts import ExpertConfig, train_expert
    from distill.train import TrainConfig

    x, y, tx, ty = _eval_data()
    rows = {}
    for precision in ("fp32", "bf16"):
        cfg = EvalConfig(
            net_kwargs={"width": 8, "depth": 2},
            precision=precision,
            train=TrainConfig(epochs=8, batch_size=12, lr=0.05, augment="none"),
        )
        rows[precision] = evaluate_set(x, y, tx, ty, cfg, num_classes=3, seed=0, device="cpu")
    assert rows["bf16"]["test_loss"] != rows["fp32"]["test_loss"]
    assert rows["bf16"]["test_acc"] == pytest.approx(rows["fp32"]["test_acc"], abs=0.1)
    assert rows["bf16"]["test_loss"] == pytest.approx(rows["fp32"]["test_loss"], rel=0.15)
    finals = {}
    for precision in ("fp32", "bf16"):
        cfg = ExpertConfig(
            net_kwargs={"width": 4, "depth": 2},
            epochs=3,
            batch_size=12,
            lr=0.05,
            num_experts=1,
            augment="none",
            precision=precision,
        )
        out = train_expert(
            cfg, x, y, tx, ty, num_classes=3, expert_id=0, out_path=tmp_path / precision / "e.parquet", device="cpu"
        )
        finals[precision] = out
    assert finals["bf16"]["test_acc"] == pytest.approx(finals["fp32"]["test_acc"], abs=0.15)


def test_keep_freed_memory_applies_once_and_can_be_opted_out(monkeypatch):
    import distill.allocator as allocator

    if allocator._glibc() is None:
        pytest.skip("not glibc")
    allocator.restore_default_malloc()
    monkeypatch.setenv("DISTILLERY_MALLOC", "default")
    assert allocator.keep_freed_memory() is False
    monkeypatch.delenv("DISTILLERY_MALLOC")
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True  # idempotent
    big = torch.ones(64, 2**20)  # 256 MB: from the heap now, and correct
    assert float(big.sum()) == 64 * 2**20


def test_precision_context_sets_true_fp32_or_tf32_on_cuda_and_restores_the_exact_flags():
    """On CUDA, fp32 turns TF32 off for matmuls and cuDNN convolutions (torch's default runs cuDNN
    convolutions on TF32) and tf32 turns it on; the flags as set before come back afterwards, also
    when the new fp32_precision API was used first (reading the legacy flags would then raise).
    The flags exist in every CUDA build, so this runs without a GPU."""
    from distill.precision import cuda_fp32_precision, precision_context, set_cuda_fp32_precision

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    try:
        conv.fp32_precision = "tf32"  # the new API, as gpu_check or a user may have used it
        matmul.fp32_precision = "none"
        with precision_context("fp32", "cuda"):
            assert cuda_fp32_precision() == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("none", "tf32")
        with precision_context("tf32", torch.device("cuda")):
            assert cuda_fp32_precision() == ("tf32", "tf32")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("none", "tf32")
        with pytest.raises(RuntimeError, match="inside"):
            with precision_context("tf32", "cuda"):
                raise RuntimeError("inside")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("none", "tf32")
        with precision_context("fp32", "cpu"):  # CPU kernels ignore the flags: left alone
            assert (matmul.fp32_precision, conv.fp32_precision) == ("none", "tf32")
        with pytest.raises(ValueError, match="unknown float32 mode 'high'; valid: ieee, tf32"):
            set_cuda_fp32_precision("high", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
