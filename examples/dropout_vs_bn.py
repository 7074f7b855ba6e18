"""Exercise 4: can batch norm replace dropout? Both with and without each, each model at a rate where it trains.

Plain LeNet (sigmoids, no BN) trains at a much smaller learning rate than LeNet-BN (see learning_rates.py), so
each pair is compared at its own rate: dropout's effect is the gap between training and test accuracy it
closes, BN's is how fast and how far training goes.
"""
import common
import tinybn
from tinybn.app.models import build_lenet

tinybn.kernels.use("fastest")    # compiled kernels where installed; --kernels reference runs tinybn/functional

p = common.parser(__doc__.splitlines()[0])
p.add_argument("--p", type=float, default=0.5, help="dropout probability")
p.add_argument("--lr-plain", type=float, default=None,
               help="learning rate of the models without BN (default: plain LeNet's best rate in "
                    "runs/examples/learning_rates/results.json when that sweep has run, else 0.3)")
args = p.parse_args()
out, data = common.setup(args, "dropout_vs_bn")
if args.lr_plain is None:
    args.lr_plain = common.best_rate("LeNet", 0.3)
results = [
    common.run_variant(args, data, out, "LeNet", lambda: build_lenet("none"), lr=args.lr_plain),
    common.run_variant(args, data, out, f"LeNet + dropout {args.p:g}", lambda: build_lenet("none", dropout=args.p),
                       lr=args.lr_plain),
    common.run_variant(args, data, out, "LeNet-BN", lambda: build_lenet("scratch")),
    common.run_variant(args, data, out, f"LeNet-BN + dropout {args.p:g}", lambda: build_lenet("scratch", dropout=args.p)),
]
common.table([common.summary(r) for r in results])
common.save(out, results)
common.compare_plot(out / "dropout_vs_bn.png", results, "dropout and batch norm", len(args.seed_list))
