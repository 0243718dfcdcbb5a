"""Trajectory matching (distill.matching): each AST switch, both memory modes (exact gradient
check), bad input refused up front, checkpoint/resume after a crash, divergence handling.

Everything runs on a tiny synthetic problem: 3 classes of 3x8x8 images (a class-specific
pattern plus noise), a width-4 depth-2 ConvNet, 2 experts x 4 epochs trained once per session.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import distill.matching as matching
from distill.experts import ExpertConfig, train_expert
from distill.matching import (
    MatchConfig,
    MatchingDiverged,
    MatchingError,
    Student,
    balance_scale,
    match_trajectories,
    matching_grad,
    sample_segment,
)
from distill.trajectory import TrajectorySet, expert_file

NUM_CLASSES = 3
NET_KWARGS = {"width": 4, "depth": 2}


def _data(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(NUM_CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(99))
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    x = patterns[y] + 0.8 * torch.randn(len(y), 3, 8, 8, generator=g)
    return x, y


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(TrajectorySet, train_x, train_y): 2 experts x 4 epochs on 3 x 12 images."""
    directory = tmp_path_factory.mktemp("experts")
    x, y = _data(12, 0)
    tx, ty = _data(4, 1)
    cfg = ExpertConfig(net="convnet", net_kwargs=NET_KWARGS, epochs=4, batch_size=12, lr=0.05, num_experts=2)
    for i in range(2):
        train_expert(
            cfg,
            x,
            y,
            tx,
            ty,
            num_classes=NUM_CLASSES,
            expert_id=i,
            out_path=directory / expert_file(i),
            dataset_fingerprint="data-a",
            preprocessor_fingerprint="pre-a",
            device="cpu",
        )
    return TrajectorySet(directory), x, y


def _cfg(**kw) -> MatchConfig:
    base = dict(
        ipc=1,
        iterations=3,
        syn_steps=4,
        expert_epochs=2,
        max_start_epoch=2,
        lr_img=10.0,
        lr_lr=1e-5,
        lr_init=0.01,
        checkpoint_every=2,
    )
    return MatchConfig(**{**base, **kw})


# ---------------------------------------------------------------- config and bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"syn_steps": 0}, "greater than or equal to 1"),
        ({"init": "gan"}, "valid: real, noise, representative"),
        ({"memory": "tesla"}, "valid: unrolled, constant"),
        ({"intermediate_loss": "constant", "syn_steps": 1, "expert_epochs": 2}, "needs syn_steps >= expert_epochs"),
        ({"ipc": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_config_is_refused(change, message):
    with pytest.raises(ValidationError, match=message):
        _cfg(**change)


def test_bad_inputs_are_refused_before_distilling(setup):
    experts, x, y = setup
    with pytest.raises(MatchingError, match="ipc=13 images per class is larger than a class"):
        match_trajectories(_cfg(ipc=13), experts, x, y, num_classes=NUM_CLASSES)
    with pytest.raises(MatchingError, match=r"beyond the stored trajectories \(last epoch 4\)"):
        match_trajectories(_cfg(max_start_epoch=3), experts, x, y, num_classes=NUM_CLASSES)
    with pytest.raises(MatchingError, match="another dataset"):
        match_trajectories(_cfg(), experts, x, y, num_classes=NUM_CLASSES, dataset_fingerprint="data-b")
    with pytest.raises(MatchingError, match="another preprocessing, e.g. the other ZCA setting"):
        match_trajectories(_cfg(), experts, x, y, num_classes=NUM_CLASSES, preprocessor_fingerprint="pre-zca")
    with pytest.raises(MatchingError, match="is for model 'convnet'"):
        matching.check_experts(
            experts.meta, experts.last_epoch, _cfg(), num_classes=NUM_CLASSES, image_shape=(3, 8, 8), net="resnet18"
        )
    with pytest.raises(MatchingError, match="is for 3 classes of 3x8 px images, the data has 3 classes of 3x16"):
        match_trajectories(_cfg(), experts, torch.nn.functional.interpolate(x, 16), y, num_classes=NUM_CLASSES)


# ---------------------------------------------------------------- the two memory modes


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"student_momentum": 0.9},
        {"intermediate_loss": "adaptive", "syn_steps": 5, "balance_loss": True},
        {"weight_perturb": 1.0, "batch_syn": 2, "student_momentum": 0.5, "intermediate_loss": "constant"},
    ],
    ids=["plain", "momentum", "intermediate+balance", "perturb+minibatch+momentum+intermediate"],
)
def test_constant_memory_gives_the_unrolled_gradient_exactly(setup, switches):
    """float64, no augmentation: the adjoint equals backprop through the unrolled loop to rounding."""
    experts, x, y = setup
    cfg = _cfg(ipc=2, dsa=None, **switches)
    student = Student(experts.meta, torch.device("cpu"), torch.float64)
    images = x[[0, 1, 12, 13, 24, 25]].double()
    labels = torch.arange(NUM_CLASSES).repeat_interleave(2)
    seg = sample_segment(
        cfg, experts, len(images), torch.Generator().manual_seed(3), torch.device("cpu"), torch.float64
    )
    lr = torch.tensor(0.02, dtype=torch.float64)
    loss_u, gi_u, gl_u = matching_grad("unrolled", student, images, labels, lr, seg)
    loss_c, gi_c, gl_c = matching_grad("constant", student, images, labels, lr, seg)
    assert loss_u == pytest.approx(loss_c, rel=1e-12)
    assert gi_u.abs().max() > 0 and gl_u.abs() > 0
    torch.testing.assert_close(gi_c, gi_u, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gl_c, gl_u, rtol=1e-9, atol=1e-12)


def test_constant_memory_matches_with_dsa_in_float32(setup):
    experts, x, y = setup
    cfg = _cfg(ipc=2, student_momentum=0.9)
    student = Student(experts.meta, torch.device("cpu"))
    images = x[[0, 1, 12, 13, 24, 25]]
    labels = torch.arange(NUM_CLASSES).repeat_interleave(2)
    seg = sample_segment(cfg, experts, len(images), torch.Generator().manual_seed(5), torch.device("cpu"))
    assert all(aug is not None for _, aug in seg.plan)
    lr = torch.tensor(0.02)
    _, gi_u, gl_u = matching_grad("unrolled", student, images, labels, lr, seg)
    _, gi_c, gl_c = matching_grad("constant", student, images, labels, lr, seg)
    torch.testing.assert_close(gi_c, gi_u, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(gl_c, gl_u, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- each AST switch


def test_balance_scale_is_asts_formula():
    # h = 10: start 10 -> log5(8); start 0 -> 1 / log5(18); late starts get larger steps
    assert balance_scale(10, 20) == pytest.approx(1.2920, abs=1e-4)
    assert balance_scale(0, 20) == pytest.approx(1 / 1.7959, abs=1e-4)
    assert balance_scale(19, 20) > balance_scale(10, 20) > 1 > balance_scale(5, 20)


def test_segment_switches(setup):
    experts, _, _ = setup
    dev = torch.device("cpu")
    draw = lambda cfg: sample_segment(cfg, experts, 6, torch.Generator().manual_seed(1), dev)  # noqa: E731
    plain = draw(_cfg(syn_steps=6))
    assert [(s, w) for s, _, w in plain.targets] == [(6, 1.0)] and plain.scale == 1.0 and plain.momentum == 0.0
    # intermediate: M=2 -> one extra target at step N // M = 3, from expert epoch start + 1
    for kind, weight in (("constant", 1.0), ("adaptive", 0.5)):
        seg = draw(_cfg(syn_steps=6, intermediate_loss=kind))
        assert [(s, w) for s, _, w in seg.targets] == [(3, weight), (6, 1.0)]
        reader = experts.reader(experts.expert_ids.index(seg.expert_id))
        assert torch.equal(seg.targets[0][1], reader.snapshot(seg.start_epoch + 1))
    balanced = draw(_cfg(syn_steps=6, balance_loss=True))
    assert balanced.scale == pytest.approx(balance_scale(balanced.start_epoch, 2))
    assert draw(_cfg(student_momentum=0.9)).momentum == 0.9
    # weight perturbation: conv weights only, each moved by a unit-norm relative direction
    perturbed = draw(_cfg(syn_steps=6, weight_perturb=1.0))
    changed, offset = [], 0
    for _name, shape in matching.layout_from_json(experts.meta["layout"]):
        size = int(torch.tensor(shape).prod())
        a, b = plain.start[offset : offset + size], perturbed.start[offset : offset + size]
        changed.append((len(shape) == 4, not torch.equal(a, b)))
        if len(shape) == 4:
            d = (b - a) / a
            assert d.norm().item() == pytest.approx(1.0, rel=1e-3)
        offset += size
    assert all(is_conv == moved for is_conv, moved in changed)
    # minibatches cover every image once per pass (MTT's batch_syn)
    mini = draw(_cfg(syn_steps=3, batch_syn=2))
    assert sorted(torch.cat([idx for idx, _ in mini.plan]).tolist()) == list(range(6))


@pytest.mark.parametrize("ipc", [1, 2])
def test_representative_init_works_at_one_image_per_class(setup, ipc):
    experts, x, y = setup
    result = match_trajectories(
        _cfg(ipc=ipc, init="representative", iterations=1), experts, x, y, num_classes=NUM_CLASSES
    )
    init = result.init_images
    assert init.shape == (NUM_CLASSES * ipc, 3, 8, 8)
    for i, img in enumerate(init):
        # every starting image is a real image of its own class, no duplicates
        match = [j for j in range(len(x)) if torch.equal(x[j], img)]
        assert match and int(y[match[0]]) == i // ipc
    assert len({tuple(im.flatten()[:5].tolist()) for im in init}) == len(init)
    if ipc == 1:
        # k = 1: the centre is the class's mean logits; its nearest image is chosen
        i = int(torch.randint(len(experts), (), generator=torch.Generator().manual_seed(0)))
        reader = experts.reader(i)
        student = Student(experts.meta, torch.device("cpu"))
        with torch.no_grad():
            logits = student(reader.snapshot(reader.last_epoch), x).double()
        for c in range(NUM_CLASSES):
            members = (y == c).nonzero().flatten()
            nearest = members[(logits[members] - logits[members].mean(0)).norm(dim=1).argmin()]
            assert torch.equal(init[c], x[nearest])


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"init": "noise"},
        {"init": "representative"},
        {"balance_loss": True},
        {"intermediate_loss": "adaptive"},
        {"weight_perturb": 1.0},
        {"student_momentum": 0.9},
        {"memory": "constant"},
        {"dsa": None},
    ],
)
def test_every_switch_runs_and_learns(setup, switches):
    experts, x, y = setup
    result = match_trajectories(_cfg(iterations=3, **switches), experts, x, y, num_classes=NUM_CLASSES)
    assert result.images.shape == (3, 3, 8, 8) and result.labels.tolist() == [0, 1, 2]
    assert len(result.losses) == 3 and all(loss > 0 for loss in result.losses)
    assert result.lr > 0 and result.lr != 0.01
    if result.init_images is not None:
        assert not torch.equal(result.images, result.init_images), "the images moved"


def test_switches_change_the_result(setup):
    experts, x, y = setup
    run = lambda **kw: match_trajectories(_cfg(iterations=2, **kw), experts, x, y, num_classes=NUM_CLASSES)  # noqa: E731
    base = run().images
    for kw in (
        {"balance_loss": True},
        {"intermediate_loss": "constant"},
        {"weight_perturb": 1.0},
        {"student_momentum": 0.9},
    ):
        assert not torch.allclose(run(**kw).images, base), kw
    torch.testing.assert_close(run(memory="constant").images, base, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- long runs survive


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_gives_the_uninterrupted_result(setup, tmp_path):
    experts, x, y = setup
    cfg = _cfg(iterations=5, checkpoint_every=2, student_momentum=0.9, weight_perturb=1.0)
    whole = match_trajectories(cfg, experts, x, y, num_classes=NUM_CLASSES)

    def crash_at_3(step, total, **metrics):
        if step == 3:
            raise Crash("killed")

    with pytest.raises(Crash):
        match_trajectories(cfg, experts, x, y, num_classes=NUM_CLASSES, work_dir=tmp_path, progress=crash_at_3)
    seen = []
    resumed = match_trajectories(
        cfg,
        experts,
        x,
        y,
        num_classes=NUM_CLASSES,
        work_dir=tmp_path,
        progress=lambda step, total, **m: seen.append(step),
    )
    assert resumed.resumed_from == 2 and seen == [3, 4, 5]
    assert torch.equal(resumed.images, whole.images) and resumed.lr == whole.lr
    assert resumed.losses == whole.losses and resumed.start_epochs == whole.start_epochs

    # finished: a re-run returns at once; more iterations extend it
    again = match_trajectories(cfg, experts, x, y, num_classes=NUM_CLASSES, work_dir=tmp_path)
    assert again.resumed_from == 5 and torch.equal(again.images, whole.images)
    longer = match_trajectories(
        cfg.model_copy(update={"iterations": 6}), experts, x, y, num_classes=NUM_CLASSES, work_dir=tmp_path
    )
    assert longer.resumed_from == 5 and len(longer.losses) == 6
    with pytest.raises(MatchingError, match="belongs to another run"):
        match_trajectories(
            cfg.model_copy(update={"lr_img": 5.0}), experts, x, y, num_classes=NUM_CLASSES, work_dir=tmp_path
        )


def _poisoned(monkeypatch, at_calls: set[int], kind: str):
    """Make the unrolled mode return a NaN loss (or a huge lr gradient) on the given calls."""
    real = matching.MEMORY_MODES["unrolled"]
    calls = [0]

    def poisoned(student, images, labels, lr, seg):
        calls[0] += 1
        loss, gi, gl = real(student, images, labels, lr, seg)
        if calls[0] in at_calls:
            return (float("nan"), gi, gl) if kind == "nan" else (loss, gi, gl + 1e9)
        return loss, gi, gl

    monkeypatch.setitem(matching.MEMORY_MODES, "unrolled", poisoned)


def test_non_finite_loss_stops_with_a_clear_error(setup, monkeypatch):
    experts, x, y = setup
    _poisoned(monkeypatch, {2}, "nan")
    with pytest.raises(MatchingDiverged, match=r"diverged at iteration 2/3: the matching loss is nan.*lower lr_img"):
        match_trajectories(_cfg(), experts, x, y, num_classes=NUM_CLASSES)


def test_negative_lr_stops_with_a_clear_error(setup, monkeypatch):
    experts, x, y = setup
    _poisoned(monkeypatch, {1}, "lr")
    with pytest.raises(MatchingDiverged, match="learned student lr became -"):
        match_trajectories(_cfg(), experts, x, y, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("lr_img", [1e38, 1e39])
def test_an_image_step_that_explodes_the_pixels_stops_the_run(setup, lr_img):
    """Issue 12: with lr_img 1e38 the loss stayed finite while pixels reached 1e36 (published), and
    with 1e39 the images became inf without an error; the updated images are now checked."""
    experts, x, y = setup
    with pytest.raises(MatchingDiverged, match=r"iteration 1/3: the updated images (reach|have non-finite)"):
        match_trajectories(_cfg(lr_img=lr_img), experts, x, y, num_classes=NUM_CLASSES)
    # rollback shrinks the step until it fits, and the result stays in range
    result = match_trajectories(
        _cfg(lr_img=lr_img, on_divergence="rollback", rollback_factor=1e-30, max_rollbacks=3),
        experts,
        x,
        y,
        num_classes=NUM_CLASSES,
    )
    assert result.rollbacks >= 1 and float(result.images.abs().max()) <= 50 * float(x.abs().max())


def test_rollback_returns_to_the_checkpoint_with_a_smaller_image_lr(setup, monkeypatch):
    experts, x, y = setup
    _poisoned(monkeypatch, {3}, "nan")  # iteration 3; last checkpoint at 2
    seen = []
    cfg = _cfg(iterations=4, on_divergence="rollback", rollback_factor=0.5)
    result = match_trajectories(
        cfg, experts, x, y, num_classes=NUM_CLASSES, progress=lambda s, t, **m: seen.append((s, m["lr_img"]))
    )
    assert result.rollbacks == 1 and len(result.losses) == 4
    assert seen == [(1, 10.0), (2, 10.0), (3, 5.0), (4, 5.0)]
    _poisoned(monkeypatch, {1, 2, 3}, "nan")
    with pytest.raises(MatchingDiverged, match="after 2 rollback"):
        match_trajectories(cfg.model_copy(update={"max_rollbacks": 2}), experts, x, y, num_classes=NUM_CLASSES)


# ---------------------------------------------------------------- follow-up switches (issue 14 part 2)


def test_image_ema_equals_its_formula_and_survives_a_resume(setup, tmp_path):
    """EMA images = sum_s (1-d) d^(t-s) x_s / (1 - d^t) over the iterates x_1..x_t; the dynamics are unchanged."""
    experts, x, y = setup
    d, t = 0.6, 3
    iterates = [
        match_trajectories(_cfg(iterations=s), experts, x, y, num_classes=NUM_CLASSES).images for s in range(1, t + 1)
    ]
    ema = match_trajectories(_cfg(iterations=t, ema_decay=d), experts, x, y, num_classes=NUM_CLASSES)
    expected = sum((1 - d) * d ** (t - s) * iterates[s - 1] for s in range(1, t + 1)) / (1 - d**t)
    torch.testing.assert_close(ema.images, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(ema.last_images, iterates[-1])
    assert not torch.allclose(ema.images, iterates[-1])
    # the accumulator rides in the checkpoint: 2 iterations, then resumed to 3, gives the same EMA
    cfg = _cfg(iterations=2, ema_decay=d, checkpoint_every=1)
    match_trajectories(cfg, experts, x, y, num_classes=NUM_CLASSES, work_dir=tmp_path)
    resumed = match_trajectories(
        cfg.model_copy(update={"iterations": t}), experts, x, y, num_classes=NUM_CLASSES, work_dir=tmp_path
    )
    assert resumed.resumed_from == 2
    torch.testing.assert_close(resumed.images, ema.images, rtol=0, atol=0)


def test_soft_labels_start_from_the_experts_logits_and_receive_a_gradient(setup):
    experts, x, y = setup
    cfg = _cfg(ipc=2, soft_labels=True, lr_labels=5.0, iterations=2)
    result = match_trajectories(cfg, experts, x, y, num_classes=NUM_CLASSES)
    student = Student(experts.meta, torch.device("cpu"))
    with torch.no_grad():
        mean_logits = torch.stack(
            [
                student(experts.reader(i).snapshot(experts.reader(i).last_epoch), result.init_images)
                for i in range(len(experts))
            ]
        ).mean(0)
    torch.testing.assert_close(
        matching.initial_soft_labels(cfg, experts, result.init_images, torch.device("cpu")), mean_logits
    )
    assert result.soft_labels.shape == (6, NUM_CLASSES)
    assert not torch.allclose(result.soft_labels, mean_logits), "the labels were updated"
    # fixed soft labels (lr_labels 0) stay where they started
    fixed = match_trajectories(cfg.model_copy(update={"lr_labels": 0.0}), experts, x, y, num_classes=NUM_CLASSES)
    torch.testing.assert_close(fixed.soft_labels, mean_logits)

    # the gradient w.r.t. the logits: non-zero, and the constant-memory adjoint equals backprop (float64)
    student64 = Student(experts.meta, torch.device("cpu"), torch.float64)
    images = x[[0, 1, 12, 13, 24, 25]].double()
    logits = torch.randn(6, NUM_CLASSES, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seg = sample_segment(
        _cfg(ipc=2, dsa=None, student_momentum=0.5),
        experts,
        6,
        torch.Generator().manual_seed(3),
        torch.device("cpu"),
        torch.float64,
    )
    lr = torch.tensor(0.02, dtype=torch.float64)
    unrolled = matching_grad("unrolled", student64, images, logits, lr, seg, learn_labels=True)
    constant = matching_grad("constant", student64, images, logits, lr, seg, learn_labels=True)
    assert len(unrolled) == 4 and unrolled[3].abs().max() > 0
    for a, b in zip(unrolled[1:], constant[1:]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="learn_labels needs soft-label logits"):
        matching_grad("unrolled", student64, images, torch.arange(6) % 3, lr, seg, learn_labels=True)


def test_difficulty_window_moves_and_defaults_draw_as_before(setup):
    experts, _, _ = setup
    cfg = _cfg(max_start_epoch=2, min_start_epoch=1, initial_max_start_epoch=1, window_growth=4)
    # upper end: 1 + (2 - 1) * (it - 1) // 4, capped at 2
    assert [matching.start_window(cfg, it)[1] for it in (1, 4, 5, 9, 100)] == [1, 1, 2, 2, 2]
    assert matching.start_window(cfg, 1)[0] == 1
    draws = lambda c, it: {  # noqa: E731
        sample_segment(
            c,
            experts,
            3,
            torch.Generator().manual_seed(s),
            torch.device("cpu"),
            iteration=it,
        ).start_epoch
        for s in range(40)
    }
    assert draws(cfg, 1) == {1} and draws(cfg, 9) == {1, 2}
    # the defaults draw exactly what TrajectorySet.random_segment draws from the same generator
    plain = _cfg(max_start_epoch=2)
    for s in range(5):
        seg = sample_segment(plain, experts, 3, torch.Generator().manual_seed(s), torch.device("cpu"))
        start, target, expert_id, start_epoch = experts.random_segment(torch.Generator().manual_seed(s), 2, 2)
        assert (seg.expert_id, seg.start_epoch) == (expert_id, start_epoch) and torch.equal(seg.start, start)
    with pytest.raises(ValidationError, match="min_start_epoch <= initial_max_start_epoch <= max_start_epoch"):
        _cfg(max_start_epoch=2, min_start_epoch=2, initial_max_start_epoch=1)
    # switches at their defaults stay out of the identity, so older runs still resume
    assert "ema_decay" not in plain.identity() and cfg.identity()["min_start_epoch"] == 1
