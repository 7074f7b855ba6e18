"""Exercise 1: remove the bias of the conv/dense layers that feed batch norm. Nothing changes — why?

Batch norm subtracts the batch mean, and a bias b shifts the mean by exactly b, so x + b − mean(x + b)
= x − mean(x): the output does not depend on b at all. Its gradient is therefore exactly zero (the BN
input gradient sums to 0 over each channel), and the bias never moves. β plays the bias's role.
"""
import numpy

import tinybn
from tinybn.app.models import build_lenet

import common

args = common.parser(__doc__.splitlines()[0]).parse_args()
out, data = common.setup(args, "bias_before_bn")

# The analytic fact, measured: one backward pass through LeNet-BN with biases.
tinybn.manual_seed(args.seed)
net = build_lenet("scratch")
x = tinybn.tensor(data[0][:256].astype(numpy.float32) / 255)
tinybn.functional.cross_entropy(net(x), tinybn.tensor(data[1][:256])).backward()
for index in (0, 4, 9, 12):
    grad = numpy.abs(net[index].bias.grad).max()
    print(f"max |d loss / d bias| of layer {index} ({type(net[index]).__name__}) before BN: {grad:.2e}")

curves = {
    "with bias": common.run_variant(args, data, out, "with bias", lambda: build_lenet("scratch")),
    "without bias": common.run_variant(args, data, out, "without bias", lambda: build_lenet("scratch", conv_bias=False)),
}
rows = [{"variant": k, "parameters": n, **common.summary(v)} for (k, v), n in
        zip(curves.items(), [sum(p.size for p in build_lenet("scratch").parameters()),
                             sum(p.size for p in build_lenet("scratch", conv_bias=False).parameters())])]
common.table(rows, ["variant", "parameters", "train loss", "train acc", "test acc"])
common.plot_curves(out / "bias_before_bn.png", curves, title="LeNet-BN with and without pre-BN biases")
