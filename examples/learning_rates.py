"""Exercise 2: learning rates for LeNet with and without BN — how accuracy rises, and how large the rate can go.

Each model is swept over rates a factor of about 3 apart, from below where plain LeNet trains up to where the
model fails: its loss turns NaN (a model's sweep stops after the first rate at which every seed diverged), or it
stays at chance. "How large" is answered twice per model: the largest rate whose mean final test accuracy
reaches --target, and the smallest rate above it at which the model fails to learn at all (mean final test
accuracy at most 0.2, twice chance, or every seed diverged). --replot redraws the figure and the answers from
results.json without training.
"""
import numpy

import common
import tinybn
from tinybn.app.models import build_lenet

tinybn.kernels.use("fastest")    # compiled kernels where installed; --kernels reference runs tinybn/functional

p = common.parser(__doc__.splitlines()[0])
p.add_argument("--rates-plain", default="0.03,0.1,0.3,1,3,10", help="rates for LeNet without BN")
p.add_argument("--rates-bn", default="0.1,0.3,1,3,10,30,100", help="rates for LeNet-BN")
p.add_argument("--target", type=float, default=0.8, help="final test accuracy that counts as trained")
args = p.parse_args()
out, data = common.setup(args, "learning_rates", quick={"rates_plain": "0.3,3", "rates_bn": "1,30"},
                         fewer="LeNet at lr 0.3 and 3, LeNet-BN at lr 1 and 30")
sweeps = {}
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
              and largest is not None and lr > largest]
    answers[name] = {"largest rate reaching the target": largest,
                     "smallest larger rate that fails": min(failed) if failed else None}
rows = [common.summary(r) for results in sweeps.values() for r in results]
common.table(rows)
for name, answer in answers.items():
    largest, fails = answer["largest rate reaching the target"], answer["smallest larger rate that fails"]
    tried = ", ".join(f"{r['lr']:g}" for r in sweeps[name])
    if largest is None:
        print(f"{name}: no rate tried ({tried}) reached a mean final test accuracy of {args.target} after "
              f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}")
    else:
        print(f"{name}: the largest rate tried ({tried}) with mean final test accuracy >= {args.target}: {largest:g}; "
              + (f"the smallest larger rate at which it fails to learn: {fails:g}" if fails is not None
                 else "no larger rate tried failed to learn"))
common.save(out, [r for results in sweeps.values() for r in results], {"answers": answers, "target": args.target})

from matplotlib.figure import Figure  # noqa: E402

fig = Figure(figsize=(14, 4.4), dpi=110)
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
seeds = f"seeds {args.seeds}" if len(args.seed_list) > 1 else f"seed {args.seeds}"
sweep_ax.set_title(f"after {args.epochs} epoch{'s' if args.epochs != 1 else ''}: mean and range over {seeds}", fontsize=9)
sweep_ax.grid(alpha=0.3, which="both")
sweep_ax.legend(fontsize=7)
shown = sorted({e for e in (1, 2, 5, args.epochs) if e <= args.epochs})      # how accuracy rises, epoch by epoch
for ax, (name, results) in zip(curve_axes, sweeps.items()):
    colors = ["#c6dbef", "#6baed6", "#2171b5", "#08306b"][-len(shown):]
    for epoch, color in zip(shown, colors):
        rates, means, lows, highs = [], [], [], []
        for result in results:
            values = [history[epoch - 1][common.test_key(result)] for history in common.finished(result)
                      if len(history) >= epoch]
            if values:
                rates.append(result["lr"])
                means.append(numpy.mean(values))
                lows.append(min(values))
                highs.append(max(values))
        ax.plot(rates, means, marker="o", markersize=3, color=color, label=f"after epoch {epoch}")
        ax.fill_between(rates, lows, highs, color=color, alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy" + (" (precise BN)" if name == "LeNet-BN" else ""))
    ax.set_title(f"{name}: how test accuracy rises, epoch by epoch", fontsize=9)
    ax.set_xlim(sweep_ax.get_xlim())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "learning_rates.png")
print(f"wrote {out / 'learning_rates.png'}")
