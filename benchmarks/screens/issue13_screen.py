"""Part 2 screen: pretrain on Tiny (32px) vs scratch, transfer to scarce CIFAR-10.

Exploratory screen of issue 13 (reads /tmp/i13/data.pt from issue13_cache.py, appends to /tmp/i13/*.jsonl;
its lines are kept in benchmarks/records/transfer_screens.jsonl). One thread.

Its lines in benchmarks/records/transfer_screens.jsonl were made at revision 38310b4 (their `git` field) with
distill.train's linear probe (unstandardized features), removed since; it now probes with
distill.transfer's, the project's one transfer recipe, so its probe numbers differ.

    .venv/bin/python benchmarks/screens/issue13_screen.py --src-per-class 100 --epochs 5 --tgt-per-class 10 20 50 --seeds 0 1 2
"""

import argparse
import json
import os
import time

import torch
from issue13_cache import per_class  # noqa: E402  (run as a script from this folder)

torch.set_num_threads(1)
from distill.nets import create_net
from distill.train import TrainConfig, evaluate, train
from distill.transfer import fine_tune, linear_probe
from distill.transforms import Preprocessor

p = argparse.ArgumentParser()
p.add_argument("--src-per-class", type=int, default=100)
p.add_argument("--src-classes", type=int, default=200)
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--net", default="convnet")
p.add_argument("--kw", default='{"width":32,"depth":3}')
p.add_argument("--bs", type=int, default=128)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--tgt-per-class", type=int, nargs="+", default=[10, 50])
p.add_argument("--test-per-class", type=int, default=200)
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument(
    "--lp",
    default='{"epochs":100,"batch_size":128,"lr":0.01,"optimizer":"adam","weight_decay":0.0,"schedule":"cosine","augment":"none"}',
)
p.add_argument(
    "--ft",
    default='{"epochs":30,"batch_size":64,"lr":0.01,"momentum":0.9,"weight_decay":0.0005,"schedule":"cosine","augment":"flip_crop"}',
)
p.add_argument("--no-scratch", action="store_true")
p.add_argument("--tag", default="")
a = p.parse_args()
D = torch.load("/tmp/i13/data.pt")
kw = json.loads(a.kw)
lp_cfg, ft_cfg = TrainConfig(**json.loads(a.lp)), TrainConfig(**json.loads(a.ft))
sx, sy, _ = D["tiny_train"]
vx, vy, _ = D["tiny_valid"]
classes = list(range(a.src_classes))
sx, sy = per_class(sx, sy, a.src_per_class, 0, classes)
keep = torch.isin(vy, torch.tensor(classes))
vx, vy = vx[keep], vy[keep]
spre = Preprocessor.fit(sx)
sxf, vxf = spre(sx), spre(vx)
cx, cy, _ = D["cifar_train"]
tx, ty, _ = D["cifar_test"]
tx, ty = per_class(tx, ty, a.test_per_class, 1)


def log(**r):
    r.update(tag=a.tag, load=open("/proc/loadavg").read().split()[0])
    print(json.dumps(r), flush=True)
    with open("/tmp/i13/screen.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")


for seed in a.seeds:
    nets = {}
    if not a.no_scratch:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nets["scratch"] = create_net(a.net, num_classes=200, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_net(a.net, num_classes=200, **kw)
    cfg = TrainConfig(
        epochs=a.epochs,
        batch_size=a.bs,
        lr=a.lr,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        augment="flip_crop",
    )
    t = time.time()
    r = train(net, sxf, sy, cfg, seed=seed)
    pt = time.time() - t
    sacc = evaluate(net, vxf, vy)["acc"]
    nets["pre"] = net
    os.makedirs("/tmp/i13/nets", exist_ok=True)
    torch.save(
        {"state": net.state_dict(), "net": a.net, "kw": kw},
        f"/tmp/i13/nets/{a.tag}_n{a.src_per_class}_e{a.epochs}_s{seed}.pt",
    )
    log(
        kind="pretrain",
        seed=seed,
        n=len(sy),
        epochs=a.epochs,
        bs=a.bs,
        lr=a.lr,
        net=a.net,
        kw=kw,
        secs=round(pt, 1),
        src_val_acc=sacc,
        train_acc=r.final["train_acc"],
    )
    for k in a.tgt_per_class:
        x, y = per_class(cx, cy, k, 100 + seed)
        tpre = Preprocessor.fit(x)
        xf, txf = tpre(x), tpre(tx)
        for arm, n_ in nets.items():
            t = time.time()
            lp = linear_probe(n_, xf, y, txf, ty, lp_cfg, num_classes=10, seed=seed)[1]
            lt = time.time() - t
            t = time.time()
            f = fine_tune(n_, xf, y, txf, ty, ft_cfg, num_classes=10, seed=seed)[1]
            ftt = time.time() - t
            log(
                kind="transfer",
                arm=arm,
                seed=seed,
                src_n=len(sy),
                epochs=a.epochs,
                k=k,
                lp=lp["test_acc"],
                lp_train=lp["train_acc"],
                ft=f["test_acc"],
                ft_train=f["train_acc"],
                lp_s=round(lt, 1),
                ft_s=round(ftt, 1),
            )
