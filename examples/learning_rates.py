"""Exercise 2: learning rates for LeNet with and without BN — how fast accuracy rises, and how large lr can go."""
import common
from tinybn.app.models import build_lenet

p = common.parser(__doc__.splitlines()[0])
p.add_argument("--rates", default="0.1,0.3,1,3,10,30", help="comma-separated learning rates to sweep")
args = p.parse_args()
out, data = common.setup(args, "learning_rates")
rates = [float(r) for r in args.rates.split(",")]

results, curves = [], {}
for norm, name in (("none", "LeNet"), ("scratch", "LeNet-BN")):
    for lr in rates:
        history = common.run_variant(args, data, out, f"{name} lr {lr:g}", lambda: build_lenet(norm), lr=lr)
        curves[f"{name} lr {lr:g}"] = history
        results.append({"model": name, "lr": lr, **common.summary(history)})
common.table(results, ["model", "lr", "train loss", "train acc", "test acc"])

import matplotlib  # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120)
for label, history in curves.items():
    if history and ("lr 1" in label and "lr 10" not in label):
        left.plot([h["epoch"] for h in history], [h["train_acc"] for h in history], label=f"{label} train")
        left.plot([h["epoch"] for h in history], [h["test_acc"] for h in history], "--", label=f"{label} test")
left.set_xlabel("epoch"), left.set_ylabel("accuracy"), left.legend(fontsize=7), left.grid(alpha=0.3)
left.set_title("accuracy rise at lr 1.0", fontsize=9)
for name in ("LeNet", "LeNet-BN"):
    accs = [float(r["test acc"]) if r["test acc"] != "diverged" else 0.0 for r in results if r["model"] == name]
    right.semilogx(rates, accs, marker="o", label=name)
right.set_xlabel("learning rate"), right.set_ylabel("final test accuracy"), right.legend(), right.grid(alpha=0.3)
right.set_title("learning-rate sweep", fontsize=9)
fig.tight_layout()
fig.savefig(out / "learning_rates.png")
print(f"wrote {out / 'learning_rates.png'}")
