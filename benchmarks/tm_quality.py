"""Accuracy of trajectory-matching distillation against minutes of matching, beside the random real subset.

The `cpu` preset is the setting of the standalone MTT reference measured on this kind of
machine (../shared/reference/cpu-anchor.md): 10,000 class-balanced CIFAR-10 train images
(1,000 per class), the full 10,000-image test set, ZCA as MTT computes it (kornia's
ZCAWhitening, eps 0.1, on [0, 1] pixels), ConvNet width 32 depth 3 with instance norm,
5 MTT experts x 12 epochs, then per images-per-class k a matching run of at most 10 minutes
whose images are judged at several points in time. Every set is judged by one recipe
(distill.evaluate: fresh ConvNets, DSA, MTT's 1000 epochs with lr x0.1 at half, momentum
0.9, wd 5e-4, batch 256, the learned lr for distilled sets, final-epoch accuracy), mean and
std over the evaluation nets. The reference reached 34.1 at 1 image per class (9 min) and
42.1 at 10 (11 min); goals (issue 14): >= 36.0 and >= 44.0 within 10 minutes, and the
reference's accuracy in at most half its time.

It doubles as the experiment harness behind those numbers: `--ipc`, `--set key=value`
(MatchConfig overrides), `--zca` (pixels: MTT's; normalized: whiten standardized pixels),
`--its` / `--minutes` (when to judge), `--eval-epochs`, `--nets`. Data, experts, matching
checkpoints and judgements are cached under --work (default /tmp/tm-quality), so reruns
and longer runs of the same configuration continue where the last one stopped.

Pure core (no Prefect, no Ray), one process, one thread (torch.set_num_threads(1)): on the
shared 2-core box two threads per process made the double backward up to 10x slower.
Wall times depend on the load (recorded as /proc/loadavg); compare configurations at equal
iterations, and by minutes only within a run.

    .venv/bin/python benchmarks/tm_quality.py --preset cpu                 # ~45 min on 2 idle cores (+ experts once)
    .venv/bin/python benchmarks/tm_quality.py --preset cpu --ipc 1 --its 100,300 --set syn_steps=30 --label n30
    .venv/bin/python benchmarks/tm_quality.py --preset tiny                # ~1 min
Last line: one JSON object; every run is appended to benchmarks/records/tm_quality.jsonl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.records import append_flat_record, loadavg  # noqa: E402

PRESETS = {
    "tiny": {
        "data": {"classes": [0, 1, 2], "train_per_class": 60, "test_per_class": 50},
        "zca": "none",
        "net_kwargs": {"width": 8, "depth": 2},
        "experts": {"num_experts": 2, "epochs": 4, "batch_size": 64},
        "match": {1: {"syn_steps": 5, "expert_epochs": 2, "max_start_epoch": 1, "lr_img": 100, "lr_lr": 1e-6}},
        "marks": {1: {"its": [10, 20]}},
        "eval": {"epochs": 50, "num_models": 2},
        "anchor": {},
        "goal": {},
    },
    "cpu": {
        "data": {"train_per_class": 1000, "test_per_class": None},
        "zca": "pixels",
        "net_kwargs": {"width": 32, "depth": 3},
        "experts": {"num_experts": 5, "epochs": 12, "batch_size": 256},
        "match": {
            1: {
                "syn_steps": 50,
                "expert_epochs": 2,
                "max_start_epoch": 1,
                "lr_img": 100,
                "lr_lr": 1e-7,
                "lr_init": 0.01,
            },
            10: {
                "syn_steps": 30,
                "expert_epochs": 2,
                "max_start_epoch": 9,
                "lr_img": 100,
                "lr_lr": 1e-5,
                "lr_init": 0.01,
            },
        },
        "marks": {1: {"minutes": [1, 2, 3, 4.5, 7, 10]}, 10: {"minutes": [2, 3.5, 5.5, 8, 10]}},
        "eval": {"epochs": 1000, "num_models": 3},
        # the standalone reference's accuracy and minutes (cpu-anchor.md), and issue 14's goals
        "anchor": {1: (34.1, 9.0), 10: (42.1, 11.0)},
        "goal": {1: 36.0, 10: 44.0},
    },
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def pixel_zca(images_uint8, eps: float = 0.1):
    """MTT's ZCA: kornia's ZCAWhitening(eps) fitted on [0, 1] pixels (DataConfig zca='pixels')."""
    from distill.transforms import Preprocessor

    return Preprocessor.fit(images_uint8, zca="pixels", zca_eps=eps)


# Evaluation architectures (issue 14 part 4): name -> (registered net, its kwargs) from the preset's ConvNet kwargs.
ARCHS = {
    "convnet": lambda kw: ("convnet", {**kw, "norm": "instance"}),
    "convnet-w64": lambda kw: ("convnet", {**kw, "width": 64, "norm": "instance"}),
    "resnet18": lambda kw: ("resnet18", {"norm": "batch"}),
}


class Bench:
    """Cached data, experts, matching runs and judgements for one preset and ZCA variant."""

    def __init__(self, preset: str, zca: str, work: Path, data_source: str, eval_epochs: int, nets: int):
        import torch

        from distill.data import DataConfig
        from distill.transforms import Preprocessor

        self.p = PRESETS[preset]
        self.preset, self.zca, self.work = preset, zca, work
        work.mkdir(parents=True, exist_ok=True)
        self.data_cfg = DataConfig(source=data_source, zca=zca == "normalized", **self.p["data"])
        cache = work / f"data-{_hash([self.data_cfg.model_dump(mode='json'), zca])}.pt"
        if cache.exists():
            d = torch.load(cache)
        else:
            train, test = self.data_cfg.load("train"), self.data_cfg.load("test")
            if zca == "pixels":
                pre = pixel_zca(train.images)
            else:
                pre = Preprocessor.fit(train.images, zca=zca == "normalized")
            d = {
                "train_x": pre(train.images),
                "train_y": train.labels,
                "test_x": pre(test.images),
                "test_y": test.labels,
                "num_classes": train.num_classes,
                "fingerprint": train.fingerprint(),
                "pre_fingerprint": pre.fingerprint(),
            }
            torch.save(d, cache)
        self.d = d
        self.k = d["num_classes"]
        self.eval_epochs, self.nets = eval_epochs, nets
        self.judged_file = work / "judged.json"
        self.judged = json.loads(self.judged_file.read_text()) if self.judged_file.exists() else {}

    def experts(self, count: int | None = None, recipe: str = "mtt"):
        """Train (or reuse) the preset's experts with `recipe` (mtt, ast, sam); `count` uses only the first
        ones (a view of symlinks)."""
        from distill.experts import ExpertConfig, train_expert
        from distill.trajectory import TrajectorySet, expert_file

        cfg = ExpertConfig(recipe=recipe, net="convnet", net_kwargs=self.p["net_kwargs"], **self.p["experts"])
        count = count or cfg.num_experts
        directory = self.work / f"experts-{_hash([cfg.expert_recipe(), self.d['pre_fingerprint']])}"
        self.expert_stats = []
        for i in range(count):
            s = train_expert(
                cfg,
                self.d["train_x"],
                self.d["train_y"],
                self.d["test_x"],
                self.d["test_y"],
                num_classes=self.k,
                expert_id=i,
                out_path=directory / expert_file(i),
                dataset_fingerprint=self.d["fingerprint"],
                preprocessor_fingerprint=self.d["pre_fingerprint"],
                device="cpu",
            )
            self.expert_stats.append(
                {"test_acc": round(s["test_acc"], 4), "seconds": round(s["seconds"], 1), "reused": s["reused"]}
            )
            print(
                f"expert {i}: test acc {s['test_acc']:.3f} ({s['seconds']:.0f} s{', reused' if s['reused'] else ''})",
                flush=True,
            )
        view = directory / f"first-{count}"
        view.mkdir(exist_ok=True)
        for i in range(count):
            link = view / expert_file(i)
            if not link.exists():
                link.symlink_to(directory / expert_file(i))
        return TrajectorySet(view)

    def eval_cfg(self, soft: bool = False, arch: str = "convnet"):
        """MTT's evaluation recipe; soft: cross-entropy against soft labels (logits [N, K]) instead.
        arch: convnet (the experts' ConvNet), convnet-w64 (twice as wide) or resnet18 (batch norm)."""
        from distill.evaluate import EvalConfig
        from distill.train import TrainConfig

        net, net_kwargs = ARCHS[arch](self.p["net_kwargs"])
        return EvalConfig(
            net=net,
            net_kwargs=net_kwargs,
            train=TrainConfig(
                epochs=self.eval_epochs,
                batch_size=256,
                lr=0.01,
                momentum=0.9,
                weight_decay=5e-4,
                schedule="step",
                augment="dsa",
                loss="soft_ce" if soft else "ce",
            ),
            num_models=self.nets,
        )

    def judge(self, key: str, x, y, lr: float | None, arch: str = "convnet") -> dict:
        """Mean/std test accuracy (%) of `nets` fresh nets of `arch` trained on (x, y); cached by key."""
        from distill.evaluate import evaluate_set, summarize

        ecfg = self.eval_cfg(soft=y.dim() == 2, arch=arch)
        full_key = f"{key}|{_hash([ecfg.model_dump(mode='json'), lr])}"
        if full_key not in self.judged:
            accs = [
                evaluate_set(
                    x,
                    y,
                    self.d["test_x"],
                    self.d["test_y"],
                    ecfg,
                    num_classes=self.k,
                    seed=s,
                    learned_lr=lr,
                    device="cpu",
                )["test_acc"]
                for s in range(ecfg.num_models)
            ]
            s = summarize(accs)
            self.judged[full_key] = {
                "mean": round(100 * s["mean"], 2),
                "std": round(100 * s["std"], 2),
                "accs": [round(100 * a, 2) for a in accs],
            }
            self.judged_file.write_text(json.dumps(self.judged))
        return self.judged[full_key]

    def random_real(self, ipc: int, experts=None, arch: str = "convnet") -> dict:
        """The random real subset with hard labels; with `experts`, with the experts' mean logits as soft labels."""
        import torch

        from distill.matching import expert_logits

        y = self.d["train_y"]
        idx = torch.cat(
            [
                torch.nonzero(y == c).flatten()[
                    torch.randperm(int((y == c).sum()), generator=torch.Generator().manual_seed(c))[:ipc]
                ]
                for c in range(self.k)
            ]
        )
        x = self.d["train_x"][idx]
        where = "" if arch == "convnet" else f"/{arch}"
        if experts is None:
            return self.judge(f"random/{self.zca}/ipc{ipc}{where}", x, y[idx], None, arch)
        soft = expert_logits(experts, x, "cpu")
        return self.judge(f"random-soft/{self.zca}/ipc{ipc}/{experts.directory}{where}", x, soft, None, arch)

    def run(self, experts, ipc: int, overrides: dict, marks: list[tuple[str, float]], archs=()) -> dict:
        """Match with the preset's settings + overrides; judge the images at each mark (its or minutes)."""
        import torch

        from distill.matching import MatchConfig, match_trajectories

        settings = {**self.p["match"].get(ipc, {}), **overrides}
        cfg = MatchConfig(ipc=ipc, iterations=1, checkpoint_every=10**9, **settings)
        run_key = _hash([cfg.identity(), self.d["pre_fingerprint"], experts.expert_ids, experts.meta.get("recipe")])
        run_dir = self.work / "runs" / run_key
        clock_file = run_dir / "clock.json"
        clock = json.loads(clock_file.read_text()) if clock_file.exists() else {"its": 0, "seconds": 0.0}
        points = []
        s_per_it = None

        def advance(iterations: int):
            return match_trajectories(
                cfg.model_copy(update={"iterations": iterations}),
                experts,
                self.d["train_x"],
                self.d["train_y"],
                num_classes=self.k,
                device="cpu",
                work_dir=run_dir,
                dataset_fingerprint=self.d["fingerprint"],
                preprocessor_fingerprint=self.d["pre_fingerprint"],
            )

        snapshot_dir = run_dir / "marks"
        for kind, value in sorted(marks, key=lambda m: m[1] if m[0] == "its" else 1e9 + m[1]):
            mark = f"{kind}:{value:g}"
            while mark not in clock.setdefault("marks", {}):
                if kind == "its":
                    target = int(value)
                else:
                    left = 60 * value - clock["seconds"]
                    target = clock["its"] + (max(1, int(left / s_per_it)) if s_per_it else 5) if left > 0 else 0
                if target <= clock["its"]:
                    if target < clock["its"] or kind != "its":
                        break  # passed in an earlier run that kept no snapshot for it
                    r = advance(target)  # reached exactly: read the state back from the checkpoint
                else:
                    r = advance(target)
                    if r.init_images is not None:
                        torch.save(r.init_images, run_dir / "init.pt")
                    s_per_it = r.seconds / (target - clock["its"])
                    clock.update(its=target, seconds=clock["seconds"] + r.seconds)
                if kind == "its" or 60 * value <= clock["seconds"]:
                    snapshot_dir.mkdir(exist_ok=True)
                    torch.save(
                        {
                            "images": r.images,
                            "labels": r.labels,
                            "lr": r.lr,
                            "soft_labels": r.soft_labels,
                            "last_images": r.last_images,
                            "losses": r.losses,
                            "its": clock["its"],
                            "seconds": clock["seconds"],
                        },
                        snapshot_dir / f"it{clock['its']}.pt",
                    )
                    clock["marks"][mark] = clock["its"]
                clock_file.write_text(json.dumps(clock))
            if mark not in clock["marks"]:
                print(f"  ipc{ipc} {mark}: passed by an earlier run without a snapshot; skipped", flush=True)
                continue
            last = SimpleNamespace(**torch.load(snapshot_dir / f"it{clock['marks'][mark]}.pt"))
            acc = self.judge(f"run/{run_key}/it{last.its}", last.images, last.labels, last.lr)
            extra = {}
            if last.soft_labels is not None:  # the set's own labels, beside the hard ones above
                extra["own_labels"] = self.judge(
                    f"run/{run_key}/it{last.its}/soft", last.images, last.soft_labels, last.lr
                )
            if last.last_images is not None:  # the last iterate, beside the published EMA
                extra["last_iterate"] = self.judge(
                    f"run/{run_key}/it{last.its}/last", last.last_images, last.labels, last.lr
                )
            init = torch.load(run_dir / "init.pt") if (run_dir / "init.pt").exists() else None
            change = float((last.images - init).norm() / init.norm()) if init is not None else None
            losses = last.losses
            point = {
                "its": last.its,
                "minutes": round(last.seconds / 60, 2),
                **acc,
                "lr": round(last.lr, 5),
                "loss_first10": round(sum(losses[:10]) / max(len(losses[:10]), 1), 4),
                "loss_last10": round(sum(losses[-10:]) / max(len(losses[-10:]), 1), 4),
                "s_per_it": round(last.seconds / max(last.its, 1), 3),
                "loadavg": loadavg(),
                "image_change": None if change is None else round(change, 4),
                **extra,
            }
            points.append(point)
            print(
                f"  ipc{ipc} it {point['its']:5d} ({point['minutes']:5.2f} min): "
                f"{point['mean']:.2f} +- {point['std']:.2f}"
                f"  lr {point['lr']:.5f}  loss {point['loss_first10']:.3f} -> {point['loss_last10']:.3f}"
                f"  change {point['image_change']}  {point['s_per_it']:.2f} s/it  load {point['loadavg'].split()[0]}"
                + "".join(f"  {k} {v['mean']:.2f} +- {v['std']:.2f}" for k, v in extra.items()),
                flush=True,
            )
        across = {}
        if points and archs:  # the last judged set, trained by other architectures (issue 14 part 4)
            last = SimpleNamespace(**torch.load(snapshot_dir / f"it{points[-1]['its']}.pt"))
            for arch in archs:
                across[arch] = {
                    "its": last.its,
                    "set": self.judge(f"run/{run_key}/it{last.its}/{arch}", last.images, last.labels, last.lr, arch),
                    "random_real": self.random_real(ipc, arch=arch),
                }
                a = across[arch]
                print(
                    f"  ipc{ipc} it {last.its} on {arch}: {a['set']['mean']:.2f} +- {a['set']['std']:.2f}, random real "
                    f"{a['random_real']['mean']:.2f} +- {a['random_real']['std']:.2f}",
                    flush=True,
                )
        return {"config": cfg.identity(), "run_key": run_key, "points": points, "architectures": across}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--work", default="/tmp/tm-quality", help="cache: data, experts, runs, judgements")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--ipc", type=int, action="append", help="images per class (repeatable; default: the preset's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="MatchConfig override (JSON value)"
    )
    parser.add_argument("--zca", choices=["pixels", "normalized", "none"], help="default: the preset's")
    parser.add_argument("--its", help="judge after these iteration counts, e.g. 50,100,200")
    parser.add_argument("--minutes", help="judge after these minutes of matching, e.g. 2,5,10")
    parser.add_argument("--eval-epochs", type=int, help="default: the preset's")
    parser.add_argument("--nets", type=int, help="evaluation nets per set; default: the preset's")
    parser.add_argument("--label", default="", help="name of this run in the record")
    parser.add_argument("--no-random", action="store_true", help="skip the random-real baseline")
    parser.add_argument("--prepare", action="store_true", help="only cache the data and train the experts")
    parser.add_argument("--no-record", action="store_true", help="do not append to the records (smoke tests)")
    parser.add_argument("--experts", type=int, help="use the first N experts (default: the preset's number)")
    parser.add_argument(
        "--recipe", default="mtt", help="expert recipe (distill.experts RECIPES: mtt, ast, sam); default mtt"
    )
    parser.add_argument(
        "--archs",
        default="",
        help="also train the last judged set and the random real subset on these, comma-separated: "
        + ", ".join(a for a in ARCHS if a != "convnet"),
    )
    parser.add_argument(
        "--ranking",
        action="store_true",
        help="DD-Ranking scores of the last judged set: random real with the experts' soft labels, and HLR "
        "against the experts' own test accuracy (nets trained on the full real set, MTT's expert recipe)",
    )
    args = parser.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        parser.error(f"unknown --archs {unknown}; valid: {', '.join(sorted(ARCHS))}")

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    p = PRESETS[args.preset]
    overrides = dict((kv.split("=", 1)[0], _parse_value(kv.split("=", 1)[1])) for kv in args.set)
    zca = args.zca or p["zca"]
    t0 = time.perf_counter()
    load_start = loadavg()
    bench = Bench(
        args.preset,
        zca,
        Path(args.work),
        args.data,
        args.eval_epochs or p["eval"]["epochs"],
        args.nets or p["eval"]["num_models"],
    )
    print(
        f"data: {len(bench.d['train_y'])} train / {len(bench.d['test_y'])} test, zca={zca} "
        f"(pixel std {float(bench.d['train_x'].std()):.3f})",
        flush=True,
    )
    experts = bench.experts(args.experts, args.recipe)
    if args.prepare:
        return

    results = {}
    for ipc in args.ipc or sorted(p["match"]):
        marks = ([("its", float(v)) for v in args.its.split(",")] if args.its else []) + (
            [("min", float(v)) for v in args.minutes.split(",")] if args.minutes else []
        )
        if not marks:
            marks = [("its", float(v)) for v in p["marks"][ipc].get("its", [])] + [
                ("min", float(v)) for v in p["marks"][ipc].get("minutes", [])
            ]
        entry = {}
        if not args.no_random:
            entry["random_real"] = bench.random_real(ipc)
            print(
                f"random real ipc{ipc}: {entry['random_real']['mean']:.2f} +- {entry['random_real']['std']:.2f}",
                flush=True,
            )
        if (overrides.get("soft_labels") or args.ranking) and not args.no_random:
            entry["random_real_soft"] = bench.random_real(ipc, experts)
            print(
                f"random real ipc{ipc}, experts' soft labels: {entry['random_real_soft']['mean']:.2f} +- "
                f"{entry['random_real_soft']['std']:.2f}",
                flush=True,
            )
        entry.update(bench.run(experts, ipc, overrides, marks, archs))
        pts = entry["points"]
        if args.ranking and pts and "random_real" in entry:
            from distill.ranking import scores

            last = pts[-1]
            own = "own_labels" if "own_labels" in last else None
            real = 100 * sum(e["test_acc"] for e in bench.expert_stats) / len(bench.expert_stats)
            random_own = entry["random_real_soft" if own else "random_real"]["mean"]
            set_own = last[own]["mean"] if own else last["mean"]
            entry["ranking"] = {
                "its": last["its"],
                "own_labels": "soft" if own else "hard",
                "full_real": round(real, 2),
                "full_real_is": "the experts' mean test accuracy (full real set, MTT's expert recipe)",
                **{
                    k: round(v, 4)
                    for k, v in scores(real / 100, last["mean"] / 100, set_own / 100, random_own / 100).items()
                },
            }
            r = entry["ranking"]
            print(
                f"  DD-Ranking ipc{ipc} it {r['its']}: HLR {r['hlr']:.4f}  IOR {r['ior']:.4f}  LRS {r['lrs']:.4f}",
                flush=True,
            )
        if ipc in p["anchor"]:
            anchor_acc, anchor_min = p["anchor"][ipc]
            reached = [q["minutes"] for q in pts if q["mean"] >= anchor_acc]
            entry["minutes_to_anchor"] = min(reached) if reached else None
            in_budget = [q for q in pts if q["minutes"] <= 10.5]
            entry["acc_at_10min"] = in_budget[-1]["mean"] if in_budget else None
            entry["goal_acc"] = entry["acc_at_10min"] is not None and entry["acc_at_10min"] >= p["goal"][ipc]
            entry["goal_time"] = entry["minutes_to_anchor"] is not None and entry["minutes_to_anchor"] <= anchor_min / 2
        results[str(ipc)] = entry

    summary = {
        "benchmark": "tm_quality",
        "preset": args.preset,
        "label": args.label,
        "zca": zca,
        "overrides": overrides,
        "eval": {"epochs": bench.eval_epochs, "num_models": bench.nets, "test_images": len(bench.d["test_y"])},
        "expert_recipe": args.recipe,
        "experts": bench.expert_stats,
        "expert_dir": experts.directory,
        "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    for ipc, entry in results.items():
        if "goal_acc" in entry:
            summary[f"goal_ipc{ipc}_acc_{p['goal'][int(ipc)]}"] = entry["goal_acc"]
            summary[f"goal_ipc{ipc}_half_anchor_time"] = entry["goal_time"]
    if not args.no_record:
        append_flat_record(
            "tm_quality", summary, preset=args.preset, threads=torch.get_num_threads(), loadavg_start=load_start
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
