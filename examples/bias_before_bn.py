"""Exercise 1: remove the bias of the conv/dense layers that feed batch norm. Nothing changes — why?

Batch norm subtracts the batch mean, and a bias b shifts the mean by exactly b, so x + b − mean(x + b)
= x − mean(x): the output does not depend on b at all. Its gradient is therefore exactly zero (the BN
input gradient sums to 0 over each channel), and the bias never moves. β plays the bias's role.
"""
import numpy

import tinybn
from tinybn.app.models import build_lenet

import common

tinybn.kernels.use("fastest")    # compiled kernels where installed; --kernels reference runs tinybn/functional

args = common.parser(__doc__.splitlines()[0]).parse_args()
out, data = common.setup(args, "bias_before_bn")

# The analytic fact, measured: one backward pass through LeNet-BN with biases.
if data is None:                                  # --replot: what the training run measured
    gradients = args.saved["bias_gradients"]
else:
    tinybn.manual_seed(0)
    net = build_lenet("scratch")
    x = tinybn.tensor(data[0][:256].astype(numpy.float32) / 255)
    tinybn.functional.cross_entropy(net(x), tinybn.tensor(data[1][:256])).backward()
    gradients = {}
    for index, name in ((0, "conv 1"), (4, "conv 2"), (9, "dense 1"), (12, "dense 2")):
        gradients[index] = float(numpy.abs(net[index].bias.grad).max())
        weight = float(numpy.abs(net[index].weight.grad).max())
        print(f"{name} (net[{index}]), before a BN layer: max |dL/d bias| {gradients[index]:.1e}, "
              f"max |dL/d weight| {weight:.1e}")

results = [common.run_variant(args, data, out, "with bias", lambda: build_lenet("scratch")),
           common.run_variant(args, data, out, "without bias", lambda: build_lenet("scratch", conv_bias=False))]
counts = [sum(p.size for p in build_lenet("scratch").parameters()),
          sum(p.size for p in build_lenet("scratch", conv_bias=False).parameters())]
common.table([{**common.summary(r), "parameters": n} for r, n in zip(results, counts)])
common.save(out, results, {"bias_gradients": gradients})
common.compare_plot(out / "bias_before_bn.png", results, "LeNet-BN with and without the biases before BN",
                    len(args.seed_list))
