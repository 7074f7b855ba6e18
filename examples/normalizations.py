"""Exercise 7: other normalizations in LeNet's batch-norm slots, and how each copes with small batches.

Part 1 (``--part compare``): LeNet with batch norm, layer norm, group norm, batch renormalization and
decorrelated batch norm (whitening groups of 16 channels) after each hidden layer, the chapter's recipe
(lr 1.0, batch 256), one run per seed; the table gives training accuracy and test accuracy in prediction mode.

Part 2 (``--part batch-sizes``): final test accuracy against the batch size for batch norm, group norm and
batch renorm, with the learning rate scaled with the batch size (lr = 1.0 · B / 256), as in the classic
figure of group norm's paper. Test accuracy here uses each model's own prediction mode (the moving
averages for BN and batch renorm; group norm has none), because that is what the batch size does to them.
Each batch size trains for ``--sweep-epochs`` epochs.

``--replot`` redraws both figures and tables from ``results.json`` without training. ``--quick`` trains part 1 for one
epoch on all the images, and not part 2: its small batches need thousands of steps per epoch (a full sweep takes
hours; one epoch at batch 8 still took longer than the whole quick mode may). It says so, and how to run a short
sweep (``--part batch-sizes --batch-sizes 8,64 --sweep-epochs 1``).

Merging (``--merge FOLDER ...``): small batches keep one core busy, so a long sweep runs faster as several
processes, each with ``TINYBN_NUM_THREADS=1`` and its own ``--out``, e.g. one per normalization, batch size and
seed. ``--merge`` combines their results into ``--out``: the runs of a normalization and batch size (in either
part) are gathered by seed; it refuses runs of one point with different learning rates or epochs, and a seed
found twice with different histories. A batch-256 point that no sweep folder has is taken from part 1's
runs of that normalization when their learning rate and epochs match the sweep's: at batch 256 the sweep's recipe
(lr 1.0 · 256 / 256, the same seeds) is part 1's, and precise BN changes no weight, so the runs are the same
(to float32 rounding, which differs with the number of threads); only the prediction-mode accuracy with the
moving averages is kept.
"""
import json
from pathlib import Path

import numpy

import common
import tinybn
from tinybn.app.models import build_lenet

tinybn.kernels.use("fastest")    # compiled kernels where installed; --kernels reference runs tinybn/functional

p = common.parser(__doc__.splitlines()[0])
p.add_argument("--part", choices=("compare", "batch-sizes", "both"), default="both")
p.add_argument("--batch-sizes", default="2,4,8,16,32,256", help="batch sizes of part 2")
p.add_argument("--sweep-epochs", type=int, default=10, help="epochs of each run in part 2")
p.add_argument("--compare-norms", default="batch norm,layer norm,group norm,batch renorm,decorrelated BN",
               help="normalizations of part 1 (the others keep their saved results)")
p.add_argument("--sweep-norms", default="batch norm,group norm,batch renorm", help="normalizations of part 2")
p.add_argument("--merge", nargs="+", metavar="FOLDER",
               help="combine the results.json of these folders (a sweep split across processes) into "
                    "--out/results.json (replacing it), then draw; see 'Merging' in the docstring")
p.add_argument("--sweep-subset", type=int, default=None, help="first N training images in part 2 (default: all)")
args = p.parse_args()
QUICK = {"part": "compare"}        # part 1 only: see the docstring

NORMS = {"batch norm": "scratch", "layer norm": "layer", "group norm": "group", "batch renorm": "renorm",
         "decorrelated BN": "decorrelated"}
for option, names in (("--compare-norms", args.compare_norms), ("--sweep-norms", args.sweep_norms)):
    unknown = [name for name in names.split(",") if name not in NORMS]
    if unknown:
        p.error(f"{option}: unknown normalization {', '.join(map(repr, unknown))}; choose from {', '.join(NORMS)}")


def epochs_of(result) -> set:
    """The epochs of a variant's runs that finished (one number when its runs share a recipe)."""
    return {len(run["history"]) for run in result["runs"] if not run["diverged"]}


def read_results(folder) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        p.error(f"--merge: no results.json in {folder} (a run that has not finished a variant yet?)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        p.error(f"--merge: cannot read {path} ({type(error).__name__}); is a run still writing it?")
    if not (isinstance(saved, dict) and all(isinstance(saved.get(part), list) for part in ("compare", "sweep"))):
        p.error(f"--merge: {path} is not this example's results (no 'compare' and 'sweep' lists)")
    for result in saved["compare"] + saved["sweep"]:
        if result.get("label") not in NORMS:
            p.error(f"--merge: {path} has results of {result.get('label')!r}, not one of {', '.join(NORMS)}")
    return saved


def merged(folders) -> tuple[list, list]:
    """(compare, sweep) from several folders' results.json; see 'Merging' in the docstring. Runs of one
    normalization and batch size must share the learning rate and the number of epochs; a seed found twice
    must have the same history in both places."""
    parts = {"compare": {}, "sweep": {}}
    for folder in dict.fromkeys(folders):                 # a folder named twice is read once
        saved = read_results(folder)
        for part, gathered in parts.items():
            for result in saved[part]:
                if not result["runs"]:
                    continue
                where = f"{result['label']} at batch {result['batch_size']} ({part})"
                entry = gathered.setdefault((result["label"], result["batch_size"]), {**result, "runs": []})
                if entry["lr"] != result["lr"]:
                    p.error(f"--merge: {where} ran with lr {entry['lr']:g} in one folder and {result['lr']:g} in "
                            f"{folder}; runs of different recipes cannot share a point")
                by_seed = {run["seed"]: run for run in entry["runs"]}
                for run in result["runs"]:
                    if run["seed"] in by_seed and by_seed[run["seed"]] != run:
                        p.error(f"--merge: {where}, seed {run['seed']}, is in two folders with different histories "
                                f"(the second is {folder}); leave out the one that should not count")
                    by_seed[run["seed"]] = run
                entry["runs"] = [by_seed[seed] for seed in sorted(by_seed)]
                if len(epochs_of(entry)) > 1:
                    p.error(f"--merge: {where} has runs of {' and '.join(map(str, sorted(epochs_of(entry))))} epochs "
                            f"(up to {folder}); runs of different lengths cannot share a point")
    compare, sweep = parts["compare"], parts["sweep"]
    for (label, _), result in compare.items():          # part 1's runs as the sweep's batch-256 point
        swept = [r for (name, _), r in sweep.items() if name == label]
        if (label, 256) in sweep or result["batch_size"] != 256 or not swept:
            continue
        base_lr = {r["lr"] * 256 / r["batch_size"] for r in swept}
        if base_lr == {result["lr"]} and epochs_of(result) == set().union(*map(epochs_of, swept)):
            sweep[label, 256] = {"label": label, "lr": result["lr"], "batch_size": 256, "runs": [
                {**run, "history": [{k: v for k, v in row.items() if not k.endswith("_precise")}
                                    for row in run["history"]]} for run in result["runs"]]}
    order = list(NORMS)
    return ([compare[key] for key in sorted(compare, key=lambda key: order.index(key[0]))],
            [sweep[key] for key in sorted(sweep, key=lambda key: (key[1], order.index(key[0])))])


if args.merge:
    if not args.out:
        p.error("--merge needs --out: the folder to write the merged results.json into")
    compare, sweep = merged(args.merge)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"compare": compare, "sweep": sweep}, indent=1))
    print(f"merged {len(args.merge)} folders into {out / 'results.json'}")
else:
    out, data = common.setup(args, "normalizations", quick=QUICK,
                             fewer="part 1 only: the batch-size sweep of part 2 is hours of small batches, and "
                                   "docs/results.md has its results (a short one: --part batch-sizes --batch-sizes 8,64 "
                                   "--sweep-epochs 1)")
    saved = args.saved if args.replot else (json.loads((out / "results.json").read_text())
                                            if (out / "results.json").is_file() else {"compare": [], "sweep": []})
    compare, sweep = saved["compare"], saved["sweep"]   # part 1 and part 2 may run separately: keep the other part
    if args.replot:
        pass
    elif args.part in ("compare", "both"):
        chosen = args.compare_norms.split(",")
        runs = {result["label"]: result for result in compare if result["label"] not in chosen}
        for label, result in runs.items():          # the variants kept must share this run's recipe
            kept = (result["lr"], result["batch_size"], sorted(run["seed"] for run in result["runs"]),
                    epochs_of(result))
            if kept != (args.lr, 256, sorted(args.seed_list), {args.epochs}):
                p.error(f"--compare-norms: {out / 'results.json'} holds {label} with lr {kept[0]:g}, seeds {kept[2]} "
                        f"and {' or '.join(map(str, sorted(kept[3])))} epochs, not this run's lr {args.lr:g}, seeds "
                        f"{args.seed_list} and {args.epochs} epochs; rerun it too, or use another --out")
        for name in chosen:
            runs[name] = common.run_variant(args, data, out, name, lambda norm=NORMS[name]: build_lenet(norm))
        compare = [runs[name] for name in NORMS if name in runs]
    if not args.replot and args.part in ("batch-sizes", "both"):
        sweep = []
        subset = (data[0][:args.sweep_subset], data[1][:args.sweep_subset], *data[2:]) if args.sweep_subset else data
        for size in (int(b) for b in args.batch_sizes.split(",")):
            for name in args.sweep_norms.split(","):
                sweep.append(common.run_variant(args, subset, out, name, lambda norm=NORMS[name]: build_lenet(norm),
                                                lr=args.lr * size / 256, batch_size=size, precise_bn=0,
                                                epochs=args.sweep_epochs))
                # saved after every run: a long sweep stopped early keeps what it measured (--replot draws it)
                (out / "results.json").write_text(json.dumps({"compare": compare, "sweep": sweep}, indent=1))
    if not args.replot:
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
    counts = sorted({len(common.finished(r)) for r in sweep})      # seeds per point, fewest to most
    for name, marker in zip(swept, ("o", "s", "^", "D", "v")):
        results = sorted((r for r in sweep if r["label"] == name), key=lambda r: r["batch_size"])
        sizes, means, lows, highs, fewer = [], [], [], [], []
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
                if len(values) < counts[-1]:                 # a point with fewer seeds than the others says so
                    fewer.append((result["batch_size"], numpy.mean(values), len(values)))
        line = ax.errorbar(sizes, means, yerr=[lows, highs], marker=marker, capsize=3, label=name)
        for size, mean, count in fewer:
            ax.annotate(f"{count} seed{'s' if count != 1 else ''}", (size, mean), textcoords="offset points",
                        xytext=(6, -10), fontsize=7, color=line[0].get_color())
    common.table(rows)
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
    ax.set_title(f"LeNet on Fashion-MNIST, {epochs} epoch{'s' if epochs != 1 else ''}\nmean of {seeds} "
                 f"seed{'s' if seeds != '1' else ''} per point, bars = lowest to highest", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "batch_sizes.png")
    print(f"wrote {out / 'batch_sizes.png'}")
