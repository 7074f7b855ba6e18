"""Exercise 4: replace batch norm with dropout — does it help as much?"""
import common
from tinybn.app.models import build_lenet

p = common.parser(__doc__.splitlines()[0])
p.add_argument("--p", type=float, default=0.5, help="dropout probability")
args = p.parse_args()
out, data = common.setup(args, "dropout_vs_bn")
curves = {
    "LeNet": common.run_variant(args, data, out, "LeNet", lambda: build_lenet("none")),
    f"LeNet + dropout {args.p}": common.run_variant(args, data, out, "LeNet + dropout",
                                                    lambda: build_lenet("none", dropout=args.p)),
    "LeNet-BN": common.run_variant(args, data, out, "LeNet-BN", lambda: build_lenet("scratch")),
}
common.table([{"variant": k, **common.summary(v)} for k, v in curves.items()],
             ["variant", "train loss", "train acc", "test acc"])
common.plot_curves(out / "dropout_vs_bn.png", curves, title="dropout in place of batch norm (lr 1.0)")
