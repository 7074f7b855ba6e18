"""Print the Markdown tables of docs/results.md from the examples' results.json files."""
import argparse
import json
from pathlib import Path

import common

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("folder", nargs="?", default="runs/examples",
                    help="the folder that holds each example's NAME/results.json, as the examples write them, or "
                         "NAME.json, as docs/measurements/examples keeps them (default: %(default)s)")
root = Path(parser.parse_args().folder)
for name in ("bias_before_bn", "learning_rates", "bn_placement", "dropout_vs_bn", "fixed_gamma_beta"):
    path = root / name / "results.json"
    if not path.is_file():
        path = root / f"{name}.json"
    if not path.is_file():
        print(f"\n{name}: no results.json yet")
        continue
    document = json.loads(path.read_text())
    seeds = sorted({run["seed"] for result in document["results"] for run in result["runs"]})
    epochs = max((len(run["history"]) for result in document["results"] for run in result["runs"]), default=0)
    print(f"\n### {name} ({epochs} epochs, seeds {', '.join(map(str, seeds))})\n")
    common.table([common.summary(result) for result in document["results"]])
    for key in ("answers", "bias_gradients"):
        if key in document:
            print(f"\n{key}: {json.dumps(document[key])}")
