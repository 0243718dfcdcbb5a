"""DP4TL core screen: surrogate -> selections -> pretrain on kept classes -> LP/FT on scarce CIFAR-10.

Exploratory screen of issue 13 (reads /tmp/i13/data.pt from issue13_cache.py, appends to /tmp/i13/*.jsonl;
its lines are kept in benchmarks/records/transfer_screens.jsonl). One thread.

    .venv/bin/python benchmarks/screens/issue13_dp_screen.py --src-per-class 250 --epochs 4 --sur-epochs 4 --k 20 --methods lm fm_kmeans random --ratios 0.5 0.8 --seeds 0
"""

import argparse
import json
import time

import torch
from issue13_cache import per_class  # noqa: E402  (run as a script from this folder)

torch.set_num_threads(1)
from distill.train import TrainConfig, evaluate
from distill.transfer import TransferConfig, pretrain, transfer
from distill.transforms import Preprocessor
from dp4tl.methods import get_method, kept_samples
from dp4tl.selection import SelectionInputs, select_classes

p = argparse.ArgumentParser()
p.add_argument("--src-per-class", type=int, default=100)
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--sur-epochs", type=int, default=5)
p.add_argument("--k", type=int, default=20)
p.add_argument("--methods", nargs="+", default=["lm", "fm_kmeans", "random", "lm_bottom"])
p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8])
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
p.add_argument("--arms", nargs="+", default=["full", "scratch"])
p.add_argument("--tag", default="d")
a = p.parse_args()
D = torch.load("/tmp/i13/data.pt")
sx, sy, snames = D["tiny_train"]
vx, vy, _ = D["tiny_valid"]
sx, sy = per_class(sx, sy, a.src_per_class, 0)
spre = Preprocessor.fit(sx)
sxf, vxf = spre(sx), spre(vx)
cx, cy, _ = D["cifar_train"]
tx, ty, _ = D["cifar_test"]
x, y = per_class(cx, cy, a.k, 100)
tx, ty = per_class(tx, ty, 200, 1)
tpre = Preprocessor.fit(x)
xf, txf = tpre(x), tpre(tx)
cfg = TransferConfig(
    pretrain=TrainConfig(
        epochs=a.epochs,
        batch_size=128,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        augment="flip_crop",
    )
)


def log(**r):
    r.update(tag=a.tag, load=open("/proc/loadavg").read().split()[0])
    print(json.dumps(r), flush=True)
    with open("/tmp/i13/dp.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")


t = time.time()
c0 = time.process_time()
sur_cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"epochs": a.sur_epochs})})
sur, _ = pretrain(sur_cfg, sxf, sy, loss="ce", out_dim=200, seed=1234)
sur.eval()
log(
    kind="surrogate",
    secs=round(time.time() - t, 1),
    cpu=round(time.process_time() - c0, 1),
    src_val_acc=evaluate(sur, vxf, vy)["acc"],
    n=len(sy),
    epochs=a.sur_epochs,
)
# the selection reads target images preprocessed like the source
tsx = spre(x)
sels = {}
for m in a.methods:
    sel_name = get_method(m).selector
    for s in a.seeds:
        key = (sel_name, s if sel_name in ("random", "fm_kmeans") else 0)
        if key not in sels:
            sels[key] = select_classes(
                sel_name,
                SelectionInputs(num_classes=200, surrogate=sur, target_x=tsx, source_x=sxf, source_y=sy, seed=key[1]),
            )
lm = sels[("lm", 0)]
log(
    kind="lm_top", top=[snames[int(c)] for c in lm.ranking[:15]], votes=[int(lm.votes[int(c)]) for c in lm.ranking[:15]]
)


def run(arm, ratio, s, xs, ys):
    t = time.time()
    c = time.process_time()
    if arm == "scratch":
        net, info = pretrain(cfg, None, None, loss="none", image_shape=(3, 32, 32), seed=s)
    else:
        net, info = pretrain(cfg, xs, ys, loss="ce", out_dim=200, seed=s)
    row = transfer(net, xf, y, txf, ty, cfg, num_classes=10, seed=s)
    log(
        kind="run",
        arm=arm,
        ratio=ratio,
        seed=s,
        n=int(len(ys)) if ys is not None else 0,
        pre_s=round(info["pretrain_seconds"], 1),
        lp=row["linear_probe_acc"],
        ft=row["fine_tune_acc"],
        secs=round(time.time() - t, 1),
        cpu=round(time.process_time() - c, 1),
    )


for s in a.seeds:
    if "full" in a.arms:
        run("full", 0.0, s, sxf, sy)
    if "scratch" in a.arms:
        run("scratch", 0.0, s, None, None)
    for m in a.methods:
        sel_name = get_method(m).selector
        sel = sels[(sel_name, s if sel_name in ("random", "fm_kmeans") else 0)]
        for r in a.ratios:
            kept = kept_samples(m, sel, r, s, sy)
            idx = torch.tensor(kept.kept)
            run(m, r, s, sxf[idx], sy[idx])
