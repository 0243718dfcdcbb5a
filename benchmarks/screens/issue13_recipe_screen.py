"""LP / FT recipe screen on saved pretrained nets vs scratch nets (same arch).

Exploratory screen of issue 13 (reads /tmp/i13/data.pt from issue13_cache.py, appends to /tmp/i13/*.jsonl;
its lines are kept in benchmarks/records/transfer_screens.jsonl). One thread.

Its lines in benchmarks/records/transfer_screens.jsonl were made at revision 38310b4 (their `git` field) with
distill.train's linear probe (unstandardized features), removed since; it now probes with
distill.transfer's, the project's one transfer recipe, so its probe numbers differ.

    .venv/bin/python benchmarks/screens/issue13_recipe_screen.py --nets /tmp/i13/nets/s2_n50_e6_s0.pt --k 20 --lp '{...TrainConfig json...}' --std 0 1
"""

import argparse
import json
import time

import torch
import torch.nn as nn

torch.set_num_threads(1)
from issue13_cache import per_class  # run as a script from this folder

from distill.nets import create_net
from distill.train import TrainConfig, extract_features, train
from distill.transfer import fine_tune, linear_probe
from distill.transforms import Preprocessor

p = argparse.ArgumentParser()
p.add_argument("--nets", nargs="+")
p.add_argument("--k", type=int, nargs="+", default=[10, 20])
p.add_argument("--lp", action="append", default=[])
p.add_argument("--ft", action="append", default=[])
p.add_argument("--std", type=int, nargs="+", default=[0])
p.add_argument("--tag", default="r")
a = p.parse_args()
D = torch.load("/tmp/i13/data.pt")
cx, cy, _ = D["cifar_train"]
tx, ty, _ = D["cifar_test"]
tx, ty = per_class(tx, ty, 200, 1)


def log(**r):
    r.update(tag=a.tag, load=open("/proc/loadavg").read().split()[0])
    print(json.dumps(r), flush=True)
    with open("/tmp/i13/recipe.jsonl", "a") as f:
        f.write(json.dumps(r) + "\n")


for path in a.nets:
    ck = torch.load(path)
    seed = int(path.split("_s")[-1][:-3])
    arms = {}
    for arm in ("pre", "scratch"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            n = create_net(ck["net"], num_classes=200, **ck["kw"])
        if arm == "pre":
            n.load_state_dict(ck["state"])
        arms[arm] = n
    for k in a.k:
        x, y = per_class(cx, cy, k, 100 + seed)
        tp = Preprocessor.fit(x)
        xf, txf = tp(x), tp(tx)
        for arm, n in arms.items():
            for lps in a.lp:
                cfg = TrainConfig(**json.loads(lps))
                for std in a.std:
                    if std:
                        f, tf = extract_features(n, xf), extract_features(n, txf)
                        mu, sd = f.mean(0), f.std(0) + 1e-6
                        f, tf = (f - mu) / sd, (tf - mu) / sd
                        head = nn.Linear(f.shape[1], 10)
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(seed)
                            head = nn.Linear(f.shape[1], 10)
                        r = train(
                            head, f, y, cfg.model_copy(update={"augment": "none"}), seed=seed, eval_data=(tf, ty)
                        ).final
                        acc = r["test_acc"]
                    else:
                        acc = linear_probe(n, xf, y, txf, ty, cfg, num_classes=10, seed=seed)[1]["test_acc"]
                    log(kind="lp", net=path, arm=arm, seed=seed, k=k, cfg=lps, std=std, acc=acc)
            for fts in a.ft:
                cfg = TrainConfig(**json.loads(fts))
                t = time.time()
                r = fine_tune(n, xf, y, txf, ty, cfg, num_classes=10, seed=seed)[1]
                log(
                    kind="ft",
                    net=path,
                    arm=arm,
                    seed=seed,
                    k=k,
                    cfg=fts,
                    acc=r["test_acc"],
                    train_acc=r["train_acc"],
                    secs=round(time.time() - t, 1),
                )
