"""Print the Markdown tables of docs/results.md from the examples' results.json files.

    python examples/report.py [runs/examples]
"""
import json
import sys
from pathlib import Path

import common

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/examples")
for name in ("bias_before_bn", "learning_rates", "bn_placement", "dropout_vs_bn", "fixed_gamma_beta"):
    path = root / name / "results.json"
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
