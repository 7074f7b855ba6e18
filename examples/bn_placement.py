"""Exercise 3: batch norm after every hidden layer against batch norm in only some of them."""
import common
from tinybn.app.models import build_lenet

args = common.parser(__doc__.splitlines()[0]).parse_args()
out, data = common.setup(args, "bn_placement")
variants = {"BN everywhere": (0, 1, 2, 3), "BN after convs only": (0, 1), "BN after dense only": (2, 3),
            "BN after first conv only": (0,), "no BN": ()}
curves = {name: common.run_variant(args, data, out, name, lambda layers=layers: build_lenet(
    "scratch" if layers else "none", bn_layers=layers)) for name, layers in variants.items()}
common.table([{"variant": k, **common.summary(v)} for k, v in curves.items()],
             ["variant", "train loss", "train acc", "test acc"])
common.plot_curves(out / "bn_placement.png", curves, title="where to put batch norm (lr 1.0)")
