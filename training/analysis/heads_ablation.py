"""Which exit heads pay for themselves: head kinds, distillation temperatures and epochs, refitted on one frozen
backbone from one feature cache, compared on the validation split.

``python -m training.analysis.heads_ablation --checkpoint FILE --out DIR [--variants a,b,...] [--epochs 12]
[--views 2] [--splits 20]``

The backbone's features at the exit points are cached once (``training.heads``); every variant then gets fresh
heads fitted on that cache, so the variants differ only in what is named. ``joint`` is the checkpoint's own heads,
trained with the backbone. Per variant: every exit's accuracy on the validation split, the cost of leaving at each
exit (the heads on the way included) as a share of the whole network, the seconds of fitting, and, for the
``confidence`` and ``margin`` policies, the FLOPs at thresholds certified on validation (LTT, delta 0.1, within 1
point of the final exit; ordered on one half, certified and measured on the other, as ``training.calibrate --order-on
val`` does), repeated over ``--splits`` random halvings, since one halving alone moves the result by points.
The test split is not touched. Writes ``DIR/heads_ablation.json`` and ``DIR/heads_ablation.png``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common.cli import positive_int, run
from common.model import ExitHeadSpec
from common.model.split import cost_table
from training import checkpoint
from training.calibrate import ExitScores, Objective, calibrate_scores, policy_family
from training.config import TrainConfig
from training.engine import collect_logits
from training.heads import EPOCHS, cached_views, fit_heads, with_new_heads
from training.policies import gate_split

# name -> what differs from refitting the checkpoint's own kind of head with its training config
VARIANTS: dict[str, dict] = {
    "joint": {},          # the checkpoint's heads as trained with the backbone (nothing refitted)
    "refit": {},
    "pool_linear": {"conv_channels": 0},
    "conv32": {"conv_channels": 32},
    "conv64": {"conv_channels": 64},
    "deeper": {"conv_layers": 2},
    "no_cascade": {"cascade": False},
    "no_distill": {"distill": 0.0},
    "distill_t1": {"distill": 1.0},
    "distill_t6": {"distill": 6.0},
    "epochs_x2": {"epochs_factor": 2},
}
DEFAULT = ("joint", "refit", "pool_linear", "conv32", "no_cascade", "no_distill", "distill_t1", "distill_t6",
           "epochs_x2")
POLICIES = ("confidence", "margin")


def certified_flops(logits: list[torch.Tensor], labels: torch.Tensor, costs: list[float], full: float, seed: int,
                    splits: int) -> dict:
    """Per static policy, over ``splits`` random halvings of the validation split (the first is the one training
    uses): the FLOPs fraction and accuracy drop on the certifying half at LTT-certified thresholds (delta 0.1, drop
    <= 1 point), their means and standard deviations. One halving alone moves by points: the fixed-sequence test
    stops at the first candidate its half cannot certify."""
    out = {}
    for name in POLICIES:
        family = policy_family(name, None, len(logits) - 1)
        flops, drops = [], []
        for s in range(splits):
            fit, cal = gate_split(len(labels), seed + s)
            path = ExitScores.build([lg[fit] for lg in logits], labels[fit], family, costs, full)
            scores = ExitScores.build([lg[cal] for lg in logits], labels[cal], family, costs, full)
            thresholds, _ = calibrate_scores(scores, Objective("drop", 1.0), "ltt", 0.1, path=path)
            outcome = scores.outcome(thresholds)
            flops.append(outcome["flops_fraction"])
            drops.append(outcome["drop"])
        out[name] = {"flops_fraction": flops, "drop": drops, "mean_flops_fraction": float(np.mean(flops)),
                     "std_flops_fraction": float(np.std(flops)), "mean_drop": float(np.mean(drops))}
    return out


def ablate(checkpoint_path: Path, variants: list[str], epochs: int, views: int, splits: int = 20,
           log=print) -> dict:
    model, meta = checkpoint.load(checkpoint_path)
    cfg = TrainConfig.from_checkpoint(meta["config"], "run the heads ablation")
    train_set, val = cfg.load_split("train"), cfg.load_split("val")
    # The draws training.heads makes: the cache first, then every variant starts from the generator's state after it
    # and from the same initial weights, so ``refit`` is exactly what ``training.heads`` writes.
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    cached, seconds = cached_views(model, train_set, cfg, views, gen, log)
    after_cache = gen.get_state()
    result = {"checkpoint": str(checkpoint_path), "views": views, "epochs": epochs, "splits": splits,
              "cache_seconds": seconds, "validation_samples": len(val), "variants": {}}
    for name in variants:
        change = VARIANTS[name]
        if name == "joint":
            candidate, seconds = model, None
        else:
            head = model.spec.exit_head
            head = ExitHeadSpec(change.get("conv_channels", head.conv_channels), head.conv_stride,
                                change.get("conv_layers", head.conv_layers))
            torch.manual_seed(cfg.seed + 2)
            candidate = with_new_heads(model, head, cascade=change.get("cascade"))
            gen.set_state(after_cache)
            start = time.perf_counter()
            fit_heads(candidate, cached, epochs=epochs * change.get("epochs_factor", 1), lr=cfg.lr,
                      distill=change.get("distill", cfg.distill), batch_size=cfg.batch_size, generator=gen,
                      momentum=cfg.momentum, weight_decay=cfg.weight_decay, log=lambda _: None)
            seconds = time.perf_counter() - start
        logits = collect_logits(candidate, val)
        costs, full = cost_table(candidate)
        entry = {"change": change, "fit_seconds": seconds,
                 "exit_accuracy": [float((lg.argmax(1) == val.labels).double().mean()) for lg in logits],
                 "exit_cost_fraction": [c / full for c in costs],
                 "certified": certified_flops(logits, val.labels, costs, full, cfg.seed, splits)}
        result["variants"][name] = entry
        log(f"{name:>12}: exit accuracy {[round(a, 4) for a in entry['exit_accuracy']]}, leaving costs "
            f"{[round(100 * c, 1) for c in entry['exit_cost_fraction']]}%, certified FLOPs "
            + ", ".join(f"{p} {100 * c['mean_flops_fraction']:.1f} ± {100 * c['std_flops_fraction']:.1f}%"
                        for p, c in entry["certified"].items())
            + ("" if seconds is None else f", fitted in {seconds:.0f} s"))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        v = result["variants"][name]
        left.plot(range(len(v["exit_accuracy"])), v["exit_accuracy"], marker="o", label=name)
    left.set_xlabel("exit")
    left.set_ylabel("validation accuracy")
    left.legend(fontsize=7)
    for k, policy in enumerate(POLICIES):
        right.bar([i + 0.4 * k for i in range(len(names))],
                  [100 * result["variants"][n]["certified"][policy]["mean_flops_fraction"] for n in names], 0.4,
                  yerr=[100 * result["variants"][n]["certified"][policy]["std_flops_fraction"] for n in names],
                  label=policy)
    right.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=45, ha="right", fontsize=8)
    right.set_ylabel(f"% of the FLOPs certified ≤ 1 pt (mean, sd; {result['splits']} halvings)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _variants(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    return names


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.analysis.heads_ablation", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.safetensors written by training.train")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--variants", type=_variants, default=list(DEFAULT),
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--epochs", type=positive_int, default=EPOCHS,
                   help=f"epochs over the cached features per variant (default {EPOCHS}, as training.heads)")
    p.add_argument("--views", type=positive_int, default=2, help="copies of the training split cached")
    p.add_argument("--splits", type=positive_int, default=20,
                   help="random halvings of the validation split the certification is repeated on")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    result = ablate(args.checkpoint, args.variants, args.epochs, args.views, args.splits)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heads_ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "heads_ablation.png")
    print(f"wrote {args.out / 'heads_ablation.json'} and {args.out / 'heads_ablation.png'}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
