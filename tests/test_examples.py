"""The examples' own logic that needs no training: examples/normalizations.py --merge."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "normalizations.py"


def run(seed, epochs, acc, precise=False):
    row = {"test_acc": acc, "train_acc": acc}
    rows = [dict(row, epoch=e + 1, **({"test_acc_precise": acc + 0.01} if precise else {})) for e in range(epochs)]
    return {"seed": seed, "history": rows, "diverged": None}


def variant(label, batch, runs, lr=None):
    return {"label": label, "lr": lr if lr is not None else batch / 256, "batch_size": batch, "runs": runs}


def write(folder: Path, compare=(), sweep=()):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"compare": list(compare), "sweep": list(sweep)}))
    return str(folder)


def merge(tmp_path, *folders):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--merge", *folders, "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    return done, (json.loads((out / "results.json").read_text()) if done.returncode == 0 else None)


def test_merge_gathers_runs_by_seed_and_takes_batch_256_from_part_1_only_when_it_matches(tmp_path):
    part1 = write(tmp_path / "part1", compare=[variant("batch norm", 256, [run(s, 3, 0.8, precise=True)
                                                                          for s in (0, 1)]),
                                               variant("group norm", 256, [run(0, 5, 0.7)])])
    a = write(tmp_path / "a", sweep=[variant("batch norm", 4, [run(1, 3, 0.5)]),
                                     variant("group norm", 4, [run(0, 3, 0.6)])])
    b = write(tmp_path / "b", sweep=[variant("batch norm", 4, [run(0, 3, 0.4),
                                                               run(1, 3, 0.45)])])
    done, saved = merge(tmp_path, part1, a, b)
    assert done.returncode == 0, done.stderr
    sweep = {(r["label"], r["batch_size"]): r for r in saved["sweep"]}
    assert [run["seed"] for run in sweep["batch norm", 4]["runs"]] == [0, 1]
    assert sweep["batch norm", 4]["runs"][1]["history"][-1]["test_acc"] == 0.45      # the later folder wins
    # batch norm's part-1 runs have the sweep's 3 epochs: they are its batch-256 point, without precise BN;
    # group norm's trained 5 epochs, so it has no batch-256 point
    assert [run["seed"] for run in sweep["batch norm", 256]["runs"]] == [0, 1]
    assert all("test_acc_precise" not in row for run in sweep["batch norm", 256]["runs"] for row in run["history"])
    assert ("group norm", 256) not in sweep
    assert [r["label"] for r in saved["compare"]] == ["batch norm", "group norm"]
    assert [(r["batch_size"], r["label"]) for r in saved["sweep"]] == [(4, "batch norm"), (4, "group norm"),
                                                                       (256, "batch norm")]


def test_merge_names_a_folder_without_results(tmp_path):
    a = write(tmp_path / "a", sweep=[variant("batch norm", 4, [run(1, 3, 0.5)])])
    done, _ = merge(tmp_path, a, str(tmp_path / "missing"))
    assert done.returncode == 2
    assert "no results.json in" in done.stderr and "missing" in done.stderr
    assert "Traceback" not in done.stderr
