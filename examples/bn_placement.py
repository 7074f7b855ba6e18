"""Exercise 3: batch norm after every hidden layer against batch norm in only some of them."""
import common
import tinybn
from tinybn.app.models import build_lenet

tinybn.kernels.use("fastest")    # compiled kernels where installed; --kernels reference runs tinybn/functional

args = common.parser(__doc__.splitlines()[0]).parse_args()
out, data = common.setup(args, "bn_placement")
variants = {"BN everywhere": (0, 1, 2, 3), "BN after convs only": (0, 1), "BN after dense only": (2, 3),
            "no BN": ()}
results = [common.run_variant(args, data, out, name, lambda layers=layers: build_lenet(
    "scratch" if layers else "none", bn_layers=layers)) for name, layers in variants.items()]
common.table([common.summary(r) for r in results])
common.save(out, results)
common.compare_plot(out / "bn_placement.png", results, f"where to put batch norm (LeNet, lr {args.lr:g})",
                    len(args.seed_list))
