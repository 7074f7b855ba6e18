"""Exercise 7: other normalizations in LeNet's batch-norm slots, and how each copes with small batches.

Part 1 (``--part compare``): LeNet with batch norm, layer norm, group norm, batch renormalization and
decorrelated batch norm (whitening groups of 16 channels) after each hidden layer, the chapter's recipe
(lr 1.0, batch 256), one run per seed; the table gives training accuracy and test accuracy in prediction mode.

Part 2 (``--part batch-sizes``): final test accuracy against the batch size for batch norm, group norm and
batch renorm, with the learning rate scaled with the batch size (lr = 1.0 · B / 256), as in the classic
figure of group norm's paper. Test accuracy here uses each model's own prediction mode (the moving
averages for BN and batch renorm; group norm has none), because that is what the batch size does to them.
Each batch size trains for ``--sweep-epochs`` epochs.

``--replot`` redraws both figures and tables from ``results.json`` without training.

Merging (``--merge FOLDER ...``): small batches keep one core busy, so a long sweep runs faster as several
processes, each with ``TINYBN_NUM_THREADS=1`` and its own ``--out``, e.g. one per normalization, batch size and
seed. ``--merge`` combines their results: the runs of a normalization and batch size are gathered by seed (a
later folder wins for a seed run twice). A batch-256 point that no sweep folder has is taken from part 1's
runs of that normalization when they trained for the same number of epochs: at batch 256 the sweep's recipe
(lr 1.0 · 256 / 256, the same seeds) is part 1's, and precise BN changes no weight, so the runs are the same
(to float32 rounding, which differs with the number of threads); only the prediction-mode accuracy with the
moving averages is kept.
"""
import json
from pathlib import Path

import numpy

import common
from tinybn.app.models import build_lenet

p = common.parser(__doc__.splitlines()[0])
p.add_argument("--part", choices=("compare", "batch-sizes", "both"), default="both")
p.add_argument("--batch-sizes", default="2,4,8,16,32,256", help="batch sizes of part 2")
p.add_argument("--sweep-epochs", type=int, default=10, help="epochs of each run in part 2")
p.add_argument("--compare-norms", default="batch norm,layer norm,group norm,batch renorm,decorrelated BN",
               help="normalizations of part 1 (the others keep their saved results)")
p.add_argument("--sweep-norms", default="batch norm,group norm,batch renorm", help="normalizations of part 2")
p.add_argument("--replot", action="store_true", help="redraw the figures and tables from results.json")
p.add_argument("--merge", nargs="+", metavar="FOLDER",
               help="combine the results.json of these folders (a sweep split across processes) into "
                    "--out/results.json (replacing it), then draw; see 'Merging' in the docstring")
args = p.parse_args()

NORMS = {"batch norm": "scratch", "layer norm": "layer", "group norm": "group", "batch renorm": "renorm",
         "decorrelated BN": "decorrelated"}
for option, names in (("--compare-norms", args.compare_norms), ("--sweep-norms", args.sweep_norms)):
    unknown = [name for name in names.split(",") if name not in NORMS]
    if unknown:
        p.error(f"{option}: unknown normalization {', '.join(map(repr, unknown))}; choose from {', '.join(NORMS)}")



def merged(folders) -> tuple[list, list]:
    """(compare, sweep) from several folders' results.json; see 'Merging' in the docstring."""
    compare, sweep = {}, {}
    missing = [folder for folder in folders if not (Path(folder) / "results.json").is_file()]
    if missing:
        p.error(f"--merge: no results.json in {', '.join(missing)} (a run that has not finished a variant yet?)")
    for folder in folders:
        saved = json.loads((Path(folder) / "results.json").read_text())
        compare.update((result["label"], result) for result in saved["compare"])
        for result in saved["sweep"]:
            entry = sweep.setdefault((result["label"], result["batch_size"]), {**result, "runs": []})
            by_seed = {run["seed"]: run for run in entry["runs"] + result["runs"]}
            entry["runs"] = [by_seed[seed] for seed in sorted(by_seed)]
    epochs = {len(run["history"]) for result in sweep.values() for run in result["runs"]}
    for label, result in compare.items():
        if ((label, 256) not in sweep and any(name == label for name, _ in sweep) and result["batch_size"] == 256
                and result["lr"] == args.lr and {len(run["history"]) for run in result["runs"]} <= epochs):
            sweep[label, 256] = {"label": label, "lr": result["lr"], "batch_size": 256, "runs": [
                {**run, "history": [{k: v for k, v in row.items() if not k.endswith("_precise")}
                                    for row in run["history"]]} for run in result["runs"]]}
    order = list(NORMS)
    return ([compare[name] for name in order if name in compare],
            [sweep[key] for key in sorted(sweep, key=lambda key: (key[1], order.index(key[0])))])


if args.merge:
    out = Path(args.out or "runs/examples/normalizations")
    out.mkdir(parents=True, exist_ok=True)
    compare, sweep = merged(args.merge)
    (out / "results.json").write_text(json.dumps({"compare": compare, "sweep": sweep}, indent=1))
    print(f"merged {len(args.merge)} folders into {out / 'results.json'}")
elif args.replot:
    out = Path(args.out or "runs/examples/normalizations")
    saved = json.loads((out / "results.json").read_text())
    compare, sweep = saved["compare"], saved["sweep"]
else:
    out, data = common.setup(args, "normalizations")
    previous = out / "results.json"                 # part 1 and part 2 may run separately: keep the other part
    saved = json.loads(previous.read_text()) if previous.is_file() else {"compare": [], "sweep": []}
    compare, sweep = saved["compare"], saved["sweep"]
    if args.part in ("compare", "both"):
        chosen = args.compare_norms.split(",")
        runs = {result["label"]: result for result in compare if result["label"] not in chosen}
        for name in chosen:
            runs[name] = common.run_variant(args, data, out, name, lambda norm=NORMS[name]: build_lenet(norm))
        compare = [runs[name] for name in NORMS if name in runs]
    if args.part in ("batch-sizes", "both"):
        sweep = []
        for size in (int(b) for b in args.batch_sizes.split(",")):
            for name in args.sweep_norms.split(","):
                sweep.append(common.run_variant(args, data, out, name, lambda norm=NORMS[name]: build_lenet(norm),
                                                lr=args.lr * size / 256, batch_size=size, precise_bn=0,
                                                epochs=args.sweep_epochs))
                # saved after every run: a long sweep stopped early keeps what it measured (--replot draws it)
                (out / "results.json").write_text(json.dumps({"compare": compare, "sweep": sweep}, indent=1))
    (out / "results.json").write_text(json.dumps({"compare": compare, "sweep": sweep}, indent=1))
    print(f"wrote {out / 'results.json'}")

if compare:
    common.table([common.summary(r) for r in compare])
    common.compare_plot(out / "normalizations.png", compare, f"normalizations in LeNet's BN slots (lr {args.lr:g})",
                        len(compare[0]["runs"]))

if sweep:
    from matplotlib.figure import Figure

    rows, fig = [], Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    swept = [name for name in NORMS if any(r["label"] == name for r in sweep)]
    for name, marker in zip(swept, ("o", "s", "^", "D", "v")):
        results = sorted((r for r in sweep if r["label"] == name), key=lambda r: r["batch_size"])
        sizes, means, lows, highs = [], [], [], []
        for result in results:
            values = [history[-1]["test_acc"] for history in common.finished(result)]
            diverged = sum(1 for run in result["runs"] if run["diverged"])
            rows.append({"normalization": name, "batch": result["batch_size"], "lr": f"{result['lr']:g}",
                         "train acc": common.spread(result, "train_acc"),
                         "test acc (prediction mode)": common.spread(result, "test_acc")})
            if values:
                sizes.append(result["batch_size"])
                means.append(numpy.mean(values))
                lows.append(numpy.mean(values) - min(values))
                highs.append(max(values) - numpy.mean(values))
        ax.errorbar(sizes, means, yerr=[lows, highs], marker=marker, capsize=3, label=name)
    common.table(rows)
    counts = sorted({len(common.finished(r)) for r in sweep})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    epochs = max(len(run["history"]) for r in sweep for run in r["runs"])
    ax.set_xscale("log", base=2)
    sizes = sorted({r["batch_size"] for r in sweep})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_ylim(0, 1)
    ax.set_xlabel("batch size (learning rate 1.0 · batch / 256)")
    ax.set_ylabel("final test accuracy, prediction mode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"LeNet on Fashion-MNIST, {epochs} epoch{'s' if epochs != 1 else ''}: mean of {seeds} "
                 f"seed{'s' if seeds != '1' else ''} per point, bars = lowest to highest", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "batch_sizes.png")
    print(f"wrote {out / 'batch_sizes.png'}")
