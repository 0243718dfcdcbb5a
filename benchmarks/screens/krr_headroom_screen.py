"""KRR-ST screen: does the bilevel optimization add anything when the teacher has headroom?

With the Barlow Twins teacher of distill-krr/cpu, random real images with the teacher's targets
(KRR-ST's step-0 set) already match the teacher's own linear probe from 100 images on
(benchmarks/records/krr_st.jsonl), so KRR-ST cannot show a gain there. This screen swaps in a
teacher worth more: the same backbone (convnet_bn 16-32-64-128, 512-d representation) trained
with cross-entropy on the source's labels, a diagnostic (KRR-ST's source is unlabelled). Then
KRR-ST (the distill-krr/cpu settings) against its step-0 set at several budgets, linear probe on
CIFAR-10 with 20 images per class, paired per seed. If KRR-ST beats step-0 here, the machinery
works and the self-supervised teacher is the bottleneck at this scale; if not, the
optimization itself adds nothing at these step counts.

Exploratory: reads /tmp/i13/data.pt (benchmarks/screens/issue13_cache.py) and appends its lines
to /tmp/i13/headroom.jsonl; kept lines go to benchmarks/records/transfer_screens.jsonl.

    cd benchmarks/screens && ../../.venv/bin/python krr_headroom_screen.py --budgets 20 100 --seeds 0 1 2
"""

import argparse
import json
import os
import subprocess
import time

import torch
from issue13_cache import per_class  # noqa: E402  (run as a script from this folder)

from distill.krr import KRRConfig, krr_distill, krr_transfer, pretrained_backbone, representations
from distill.nets import create_net
from distill.train import TrainConfig, train
from distill.transfer import transfer
from distill.transforms import Preprocessor

p = argparse.ArgumentParser()
p.add_argument("--teacher-epochs", type=int, default=15)
p.add_argument("--budgets", type=int, nargs="+", default=[20, 100])
p.add_argument("--steps", type=int, default=400)
p.add_argument("--outer-lr", type=float, default=1e-3)
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
p.add_argument("--pretrain-epochs", type=int, default=500)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--tag", default="h")
a = p.parse_args()
torch.set_num_threads(a.threads)
GIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

D = torch.load("/tmp/i13/data.pt")
sx, sy, _ = D["tiny_train"]
sx, sy = per_class(sx, sy, 100, 0)  # distill-krr/cpu: 100 per class, 20,000 images
spre = Preprocessor.fit(sx)
sxf = spre(sx)
cx, cy, _ = D["cifar_train"]
tx, ty, _ = D["cifar_test"]
x, y = per_class(cx, cy, 20, 100)
tx, ty = per_class(tx, ty, 200, 1)
tpre = Preprocessor.fit(x)
xf, txf = tpre(x), tpre(tx)


def log(**r):
    r.update(tag=a.tag, git=GIT, load=open("/proc/loadavg").read().split()[0])
    print(json.dumps(r), flush=True)
    with open("/tmp/i13/headroom.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")


path = f"/tmp/i13/sup_teacher_e{a.teacher_epochs}.pt"
teacher = create_net("convnet_bn", num_classes=200, widths=[16, 32, 64, 128])
t = time.time()
if os.path.exists(path):
    teacher.load_state_dict(torch.load(path))
    held = None
else:
    res = train(
        teacher,
        sxf,
        sy,
        TrainConfig(
            epochs=a.teacher_epochs,
            batch_size=256,
            lr=0.05,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="cosine",
            augment="flip_crop",
        ),
        seed=0,
    )
    torch.save(teacher.state_dict(), path)
    held = res.history[-1] if res.history else None
teacher.eval()
log(kind="teacher", epochs=a.teacher_epochs, secs=round(time.time() - t, 1), last=held)

cfg = krr_transfer().model_copy(
    update={
        "modes": ["linear_probe"],
        "net_kwargs": {"widths": [16, 32, 64]},
        "pretrain": krr_transfer().pretrain.model_copy(update={"epochs": a.pretrain_epochs}),
    }
)


def evaluate(method, seed, images=None, targets=None, **extra):
    t = time.time()
    net, _ = pretrained_backbone(
        method, cfg, image_shape=(3, 32, 32), images=images, targets=targets, teacher=teacher, seed=seed
    )
    row = transfer(net, xf, y, txf, ty, cfg, num_classes=10, seed=seed)
    log(kind="eval", method=method, seed=seed, lp=row.get("linear_probe_acc"), secs=round(time.time() - t, 1), **extra)


for seed in a.seeds:
    evaluate("teacher", seed)
    evaluate("no-pretrain", seed)
for n in a.budgets:
    kc = KRRConfig(
        num_images=n,
        net="convnet_bn",
        net_kwargs={"widths": [16, 32, 64]},
        num_models=4,
        online_iterations=100,
        outer_steps=a.steps,
        outer_lr=a.outer_lr,
        lr_end_factor=0.1,
        real_batch=256,
    )
    t = time.time()
    res = krr_distill(kc, sxf, teacher, device="cpu")
    dsecs = round(time.time() - t, 1)
    init = sxf[res.source_indices]
    for seed in a.seeds:
        extra = {"n": n, "steps": a.steps, "outer_lr": a.outer_lr}
        evaluate(
            "krr-st",
            seed,
            images=res.images,
            targets=res.targets,
            distill_s=dsecs,
            loss0=res.history[0]["loss"],
            loss1=res.history[-1]["loss"],
            **extra,
        )
        evaluate("random-real-targets", seed, images=init, targets=representations(teacher, init), **extra)
