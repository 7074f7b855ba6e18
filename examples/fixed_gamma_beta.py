"""Exercise 5: fix γ = 1 and β = 0 (not trained) and compare with learned ones."""
import common
import tinybn
from tinybn.app.models import build_lenet

tinybn.kernels.use("fastest")    # compiled kernels where installed; --kernels reference runs tinybn/functional

args = common.parser(__doc__.splitlines()[0]).parse_args()
out, data = common.setup(args, "fixed_gamma_beta")
results = [common.run_variant(args, data, out, "learned gamma, beta", lambda: build_lenet("scratch")),
           common.run_variant(args, data, out, "fixed gamma=1, beta=0",
                              lambda: build_lenet("scratch", train_bn_affine=False))]
common.table([common.summary(r) for r in results])
common.save(out, results)
common.compare_plot(out / "fixed_gamma_beta.png", results, "trainable against fixed BN scale and shift",
                    len(args.seed_list))
