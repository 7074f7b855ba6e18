"""Exercise 2: learning rates for LeNet with and without BN — how accuracy rises, and how large the rate can go.

Each model is swept over rates a factor of about 3 apart, from below where plain LeNet trains up to where the
model fails: its loss turns NaN (a model's sweep stops after the first rate at which every seed diverged), or it
stays at chance. "How large" is answered twice per model: the largest rate whose mean final test accuracy
reaches --target, and the smallest rate above it at which the model fails to learn at all (mean final test
accuracy at most 0.2, twice chance, or every seed diverged). --replot redraws the figure and the answers from
results.json without training.
"""
import json
from pathlib import Path

import numpy

import common
from tinybn.app.models import build_lenet

p = common.parser(__doc__.splitlines()[0])
p.add_argument("--rates-plain", default="0.03,0.1,0.3,1,3,10", help="rates for LeNet without BN")
p.add_argument("--rates-bn", default="0.1,0.3,1,3,10,30,100", help="rates for LeNet-BN")
p.add_argument("--target", type=float, default=0.8, help="final test accuracy that counts as trained")
p.add_argument("--replot", action="store_true", help="redraw the figure and answers from results.json")
args = p.parse_args()
sweeps = {}
if args.replot:
    out = Path(args.out or "runs/examples/learning_rates")
    for result in json.loads((out / "results.json").read_text())["results"]:
        sweeps.setdefault(result["label"], []).append(result)
    args.seeds = ",".join(str(run["seed"]) for run in next(iter(sweeps.values()))[0]["runs"])
    args.epochs = max(len(run["history"]) for results in sweeps.values() for r in results for run in r["runs"])
else:
    out, data = common.setup(args, "learning_rates")
    for name, norm, rates in (("LeNet", "none", args.rates_plain), ("LeNet-BN", "scratch", args.rates_bn)):
        sweeps[name] = []
        for lr in (float(r) for r in rates.split(",")):
            result = common.run_variant(args, data, out, name, lambda norm=norm: build_lenet(norm), lr=lr)
            sweeps[name].append(result)
            if not common.finished(result):
                break                                    # every seed diverged: larger rates will too


scores = {name: {r["lr"]: common.final_test(r) for r in results} for name, results in sweeps.items()}
answers = {}
for name, by_rate in scores.items():
    trained = [lr for lr, values in by_rate.items() if values and numpy.mean(values) >= args.target]
    largest = max(trained) if trained else None
    failed = [lr for lr, values in by_rate.items() if (not values or numpy.mean(values) <= 0.2)
              and (largest is None or lr > largest)]
    answers[name] = {"largest rate reaching the target": largest,
                     "smallest larger rate that fails": min(failed) if failed else None}
rows = [common.summary(r) for results in sweeps.values() for r in results]
common.table(rows)
for name, answer in answers.items():
    print(f"{name}: largest rate with mean final test accuracy >= {args.target}: "
          f"{answer['largest rate reaching the target']}; the smallest larger rate at which it fails to learn: "
          f"{answer['smallest larger rate that fails']}")
common.save(out, [r for results in sweeps.values() for r in results], {"answers": answers, "target": args.target})

from matplotlib.figure import Figure  # noqa: E402

fig = Figure(figsize=(14, 4.8), dpi=110)
sweep_ax, *curve_axes = fig.subplots(1, 3)
for (name, results), marker in zip(sweeps.items(), ("s", "o")):
    rates = [lr for lr, values in scores[name].items() if values]
    values = [values for values in scores[name].values() if values]
    if values:
        mean = numpy.array([numpy.mean(v) for v in values])
        low = numpy.maximum(mean - numpy.array([min(v) for v in values]), 0)     # rounding can make them -1e-17
        high = numpy.maximum(numpy.array([max(v) for v in values]) - mean, 0)
        sweep_ax.errorbar(rates, mean, yerr=[low, high], marker=marker, capsize=3, label=name)
    dead = [r["lr"] for r in results if any(run["diverged"] for run in r["runs"])]
    if dead:
        sweep_ax.scatter(dead, [0.02] * len(dead), marker="x", color="black", zorder=3,
                         label=f"{name}: a seed's loss turned NaN")
sweep_ax.axhline(args.target, color="gray", linestyle=":", linewidth=1, label=f"target {args.target:g}")
sweep_ax.set_xscale("log")
sweep_ax.set_ylim(0, 1)
sweep_ax.set_xlabel("learning rate")
sweep_ax.set_ylabel("final test accuracy (precise BN with BN)")
sweep_ax.set_title(f"after {args.epochs} epochs: mean and range over seeds {args.seeds}", fontsize=9)
sweep_ax.grid(alpha=0.3, which="both")
sweep_ax.legend(fontsize=7)
for ax, (name, results) in zip(curve_axes, sweeps.items()):
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"])
    for result in results:
        if not common.finished(result):
            continue
        color = next(colors)
        common.plot_band(ax, result, "train_acc", f"lr {result['lr']:g}", color=color)
        common.plot_band(ax, result, common.test_key(result), None, color=color, linestyle="--")
    common.accuracy_axes(ax, f"{name}: train (solid), test (dashed) accuracy")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16))   # below: no line hidden
fig.tight_layout()
fig.savefig(out / "learning_rates.png")
print(f"wrote {out / 'learning_rates.png'}")
