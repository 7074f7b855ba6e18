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


def merge(tmp_path, *folders, out=True):
    pytest.importorskip("matplotlib")
    target = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--merge", *folders, *(["--out", str(target)] if out else [])],
                          capture_output=True, text=True, timeout=120)
    return done, (json.loads((target / "results.json").read_text()) if done.returncode == 0 else None)


def test_merge_gathers_runs_by_seed_and_takes_batch_256_from_part_1_only_when_it_matches(tmp_path):
    part1 = write(tmp_path / "part1", compare=[variant("batch norm", 256, [run(0, 3, 0.8, precise=True)], lr=1.0),
                                               variant("group norm", 256, [run(0, 5, 0.7)], lr=1.0)])
    part1b = write(tmp_path / "part1b", compare=[variant("batch norm", 256, [run(1, 3, 0.8, precise=True)], lr=1.0)])
    a = write(tmp_path / "a", sweep=[variant("batch norm", 4, [run(1, 3, 0.5)]),
                                     variant("group norm", 4, [run(0, 5, 0.6)])])
    b = write(tmp_path / "b", sweep=[variant("batch norm", 4, [run(0, 3, 0.4), run(1, 3, 0.5)]),
                                     variant("group norm", 8, [run(0, 5, 0.6)])])
    done, saved = merge(tmp_path, part1, part1b, a, b, b)          # b twice: read once
    assert done.returncode == 0, done.stderr
    sweep = {(r["label"], r["batch_size"]): r for r in saved["sweep"]}
    assert [run["seed"] for run in sweep["batch norm", 4]["runs"]] == [0, 1]
    assert [run["seed"] for run in saved["compare"][0]["runs"]] == [0, 1]           # part 1 gathered by seed too
    # both normalizations' part-1 runs match their own sweep's epochs and lr: they are its batch-256 point,
    # without precise BN
    assert [run["seed"] for run in sweep["batch norm", 256]["runs"]] == [0, 1]
    assert all("test_acc_precise" not in row for run in sweep["batch norm", 256]["runs"] for row in run["history"])
    assert [(r["batch_size"], r["label"]) for r in saved["sweep"]] == [(4, "batch norm"), (4, "group norm"),
                                                                       (8, "group norm"), (256, "batch norm"),
                                                                       (256, "group norm")]


def test_part_1_is_not_a_batch_256_point_for_a_sweep_of_other_epochs_or_rate(tmp_path):
    part1 = write(tmp_path / "part1", compare=[variant("batch norm", 256, [run(0, 10, 0.8)], lr=1.0),
                                               variant("group norm", 256, [run(0, 2, 0.7)], lr=1.0)])
    a = write(tmp_path / "a", sweep=[variant("batch norm", 4, [run(0, 10, 0.5)], lr=0.5 * 4 / 256),
                                     variant("group norm", 4, [run(0, 10, 0.6)])])
    done, saved = merge(tmp_path, part1, a)
    assert done.returncode == 0, done.stderr
    assert [r["batch_size"] for r in saved["sweep"]] == [4, 4]


@pytest.mark.parametrize("second, message", [
    ({"sweep": [variant("batch norm", 4, [run(1, 3, 0.5)], lr=0.5)]}, "ran with lr"),
    ({"sweep": [variant("batch norm", 4, [run(1, 2, 0.5)])]}, "runs of 2 and 3 epochs"),
    ({"sweep": [variant("batch norm", 4, [run(0, 3, 0.9)])]}, "seed 0, is in two folders with different histories"),
    ({"sweep": [variant("weight norm", 4, [run(0, 3, 0.9)])]}, "has results of 'weight norm'"),
    ("{\"compare\": [", "cannot read"),
    ({}, "is not this example's results"),
    (None, "no results.json in"),
])
def test_merge_refuses_what_cannot_share_a_point_in_one_line(tmp_path, second, message):
    a = write(tmp_path / "a", sweep=[variant("batch norm", 4, [run(0, 3, 0.5)])])
    folder = tmp_path / "b"
    if second is not None:
        folder.mkdir()
        (folder / "results.json").write_text(second if isinstance(second, str) else json.dumps(
            {"compare": [], "sweep": [], **second} if second else {}))
    done, _ = merge(tmp_path, a, str(folder))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_merge_needs_out(tmp_path):
    a = write(tmp_path / "a", sweep=[variant("batch norm", 4, [run(0, 3, 0.5)])])
    done, _ = merge(tmp_path, a, out=False)
    assert done.returncode == 2 and "--merge needs --out" in done.stderr


# ------------------------------------------------------------------ quick modes: what they train (issue 20)

QUICK_BUDGET = 5 * 60_000       # images trained in all: five one-epoch runs, about a minute on the 2-core machine


@pytest.mark.parametrize("script", ["bias_before_bn", "bn_placement", "dropout_vs_bn", "fixed_gamma_beta",
                                    "learning_rates", "normalizations"])
def test_each_quick_mode_trains_at_most_its_budget_and_says_what_it_is(script, tmp_path, monkeypatch, capsys):
    """Quick modes gave numbers that looked broken (3 epochs on 10,000 images), and normalizations.py ignored quick
    mode in its sweep (still running after 9 minutes). Each now trains one epoch on all the images, fewer variants,
    at most QUICK_BUDGET images in all, and says so. The training itself is replaced here by a recorder of what would
    be trained (time is measured, not tested: docs/results.md); everything around it runs."""
    import runpy

    pytest.importorskip("matplotlib")
    from test_data import HAVE_DATA
    if not HAVE_DATA:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    examples = SCRIPT.parent
    monkeypatch.syspath_prepend(str(examples))
    import common

    planned = []

    def recorded_train(config, log=print, data=None, model=None):
        images = config.train_subset or len(data[1])
        planned.append((config.epochs, images, config.batch_size))
        rows = [{"epoch": e + 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5,
                 **({"test_acc_precise": 0.6} if config.precise_bn else {})} for e in range(config.epochs)]
        return {"history": rows}

    monkeypatch.setattr(common, "train", recorded_train)
    monkeypatch.setattr("sys.argv", [script, "--quick", "--out", str(tmp_path)])
    runpy.run_path(str(examples / f"{script}.py"), run_name="__main__")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("kernels: ") and printed[1].startswith("quick mode: 1 epoch on all 60,000 training")
    assert planned and all(epochs == 1 for epochs, _, _ in planned)
    assert sum(epochs * images for epochs, images, _ in planned) <= QUICK_BUDGET, planned
    assert all(batch == 256 for *_, batch in planned)        # no small-batch sweep hiding in quick mode
