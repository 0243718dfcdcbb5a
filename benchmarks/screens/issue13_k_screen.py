"""KRR-ST screen: BT teacher vs no pretraining; KRR-ST vs step-0 at budgets.

Exploratory screen of issue 13 (reads /tmp/i13/data.pt from issue13_cache.py, appends to /tmp/i13/*.jsonl;
its lines are kept in benchmarks/records/transfer_screens.jsonl). One thread.

    .venv/bin/python benchmarks/screens/issue13_k_screen.py --phase teacher --src-per-class 100 --teacher-epochs 20 --teacher-lr 0.002 --seeds 0 1
"""

import argparse
import json
import time

import torch
from issue13_cache import per_class  # noqa: E402  (run as a script from this folder)

torch.set_num_threads(1)
from distill.krr import KRRConfig, krr_distill, krr_transfer, pretrained_backbone, representations
from distill.ssl import SSLConfig, load_teacher, train_teacher
from distill.transfer import transfer
from distill.transforms import Preprocessor

p = argparse.ArgumentParser()
p.add_argument("--src-per-class", type=int, default=100)
p.add_argument("--teacher-epochs", type=int, default=10)
p.add_argument("--teacher-widths", default="16,32,64,128")
p.add_argument("--k", type=int, default=20)
p.add_argument("--phase", choices=["teacher", "krr"], default="teacher")
p.add_argument("--budgets", type=int, nargs="+", default=[50, 100])
p.add_argument("--steps", type=int, nargs="+", default=[400])
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--pretrain-epochs", type=int, default=1000)
p.add_argument("--outer-lr", type=float, default=1e-3)
p.add_argument("--modes", nargs="+", default=["linear_probe", "fine_tune"])
p.add_argument("--methods", nargs="+", default=["teacher", "no-pretrain"])
p.add_argument("--tag", default="k")
p.add_argument("--teacher-lr", type=float, default=1e-3)
p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
a = p.parse_args()
D = torch.load("/tmp/i13/data.pt")
sx, sy, _ = D["tiny_train"]
sx, sy = per_class(sx, sy, a.src_per_class, 0)
spre = Preprocessor.fit(sx)
sxf = spre(sx)
cx, cy, _ = D["cifar_train"]
tx, ty, _ = D["cifar_test"]
x, y = per_class(cx, cy, a.k, 100)
tx, ty = per_class(tx, ty, 200, 1)
tpre = Preprocessor.fit(x)
xf, txf = tpre(x), tpre(tx)
widths = [int(w) for w in a.teacher_widths.split(",")]
tdir = f"/tmp/i13/teacher_n{a.src_per_class}_e{a.teacher_epochs}_w{'-'.join(map(str, widths))}_lr{a.teacher_lr}"


def log(**r):
    r.update(tag=a.tag, load=open("/proc/loadavg").read().split()[0])
    print(json.dumps(r), flush=True)
    with open("/tmp/i13/krr.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")


t = time.time()
c = time.process_time()
s = train_teacher(
    SSLConfig(
        net_kwargs={"widths": widths}, projector=[512, 512], epochs=a.teacher_epochs, batch_size=256, lr=a.teacher_lr
    ),
    sxf,
    out_dir=tdir,
    device="cpu",
)
teacher = load_teacher(s["path"])
log(
    kind="teacher",
    n=len(sy),
    epochs=a.teacher_epochs,
    widths=widths,
    loss=s["loss"],
    secs=round(time.time() - t, 1),
    cpu=round(time.process_time() - c, 1),
    reused=s["reused"],
)
cfg = krr_transfer().model_copy(
    update={"modes": a.modes, "pretrain": krr_transfer().pretrain.model_copy(update={"epochs": a.pretrain_epochs})}
)


def evaluate(method, seed, images=None, targets=None, labels=None, **extra):
    t = time.time()
    net, info = pretrained_backbone(
        method, cfg, image_shape=(3, 32, 32), images=images, targets=targets, labels=labels, teacher=teacher, seed=seed
    )
    row = transfer(net, xf, y, txf, ty, cfg, num_classes=10, seed=seed)
    log(
        kind="eval",
        method=method,
        seed=seed,
        lp=row.get("linear_probe_acc"),
        ft=row.get("fine_tune_acc"),
        secs=round(time.time() - t, 1),
        **extra,
    )


if a.phase == "teacher":
    for seed in a.seeds:
        for m in a.methods:
            evaluate(m, seed)
else:
    for n in a.budgets:
        for steps in a.steps:
            kc = KRRConfig(
                num_images=n,
                net="convnet_bn",
                net_kwargs={"widths": [16, 32, 64]},
                num_models=4,
                online_iterations=100,
                outer_steps=max(steps, 1),
                outer_lr=a.outer_lr,
                lr_end_factor=0.1,
                real_batch=256,
            )
            t = time.time()
            res = krr_distill(kc, sxf, teacher, device="cpu")
            dsecs = round(time.time() - t, 1)
            init = sxf[res.source_indices]
            for seed in a.seeds:
                evaluate(
                    "krr-st",
                    seed,
                    images=res.images,
                    targets=res.targets,
                    n=n,
                    steps=steps,
                    distill_s=dsecs,
                    loss0=res.history[0]["loss"],
                    loss1=res.history[-1]["loss"],
                )
                if a.baselines and steps == a.steps[0]:
                    evaluate("random-real-targets", seed, images=init, targets=representations(teacher, init), n=n)
                    evaluate("random-real-ce", seed, images=init, labels=sy[res.source_indices], n=n)
