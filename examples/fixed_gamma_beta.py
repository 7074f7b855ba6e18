"""Exercise 5: fix γ = 1 and β = 0 (not trained) and compare with learned ones."""
import common
from tinybn.app.models import build_lenet

args = common.parser(__doc__.splitlines()[0]).parse_args()
out, data = common.setup(args, "fixed_gamma_beta")
curves = {
    "learned gamma, beta": common.run_variant(args, data, out, "learned", lambda: build_lenet("scratch")),
    "fixed gamma=1, beta=0": common.run_variant(args, data, out, "fixed",
                                                lambda: build_lenet("scratch", train_bn_affine=False)),
}
common.table([{"variant": k, **common.summary(v)} for k, v in curves.items()],
             ["variant", "train loss", "train acc", "test acc"])
common.plot_curves(out / "fixed_gamma_beta.png", curves, title="trainable vs fixed BN scale and shift")
