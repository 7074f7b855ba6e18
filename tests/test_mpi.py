"""Data-parallel training over real MPI: ``mpiexec -n 2`` started from here (MPICH from PyPI; the tests are
skipped, saying why, where mpiexec or mpi4py is missing). The collectives' mathematics is tested in-process
in test_sync_batchnorm.py; this is the exactness the issue asks for, and the command line around it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

import mpi_worker

HERE = Path(__file__).parent


def find_mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"    # a venv's own MPICH first
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
try:
    import mpi4py  # noqa: F401 - only whether it is there; MPI starts in the child processes
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

pytestmark = pytest.mark.skipif(MPIEXEC is None or not HAVE_MPI4PY,
                                reason="MPI is not installed (pip install 'tinybn[mpi]' gives mpi4py and MPICH)")


def launch(ranks, *args, timeout=240, env=None):
    """``mpiexec -n RANKS python ARGS`` (or several ``-n 1 ...`` groups given as lists), to completion."""
    environment = {**os.environ, "TINYBN_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), **(env or {})}
    groups = args if ranks is None else [["-n", str(ranks), sys.executable, *args]]
    command = [MPIEXEC]
    for index, group in enumerate(groups):
        command += ([":"] if index else []) + group
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


@pytest.mark.parametrize("steps", [1, 10])
def test_two_ranks_with_sync_bn_equal_one_process_on_the_whole_batch(tmp_path, steps):
    """float64, equal shards of 16: loss, every gradient, parameter and moving average to 1e-12."""
    done = launch(2, str(HERE / "mpi_worker.py"), "sync", str(steps), str(tmp_path))
    assert done.returncode == 0, done.stderr
    reference = mpi_worker.run(None, "sync", steps)
    ranks = [dict(numpy.load(tmp_path / f"rank{r}.npz")) for r in (0, 1)]
    assert set(ranks[0]) == set(reference) and any(k.startswith("grad/") for k in reference)
    for name, expected in reference.items():
        numpy.testing.assert_allclose(ranks[0][name], expected, rtol=1e-12, atol=1e-12, err_msg=name)
        numpy.testing.assert_array_equal(ranks[1][name], ranks[0][name], err_msg=f"{name} differs between the ranks")


def test_without_sync_bn_each_shard_normalizes_itself_and_the_step_differs(tmp_path):
    """Per-shard statistics are those of 16 images, not 32: the normalized values, hence the loss, the
    gradients and the moving averages, differ from the whole batch's by far more than rounding."""
    done = launch(2, str(HERE / "mpi_worker.py"), "local", "1", str(tmp_path))
    assert done.returncode == 0, done.stderr
    reference = mpi_worker.run(None, "local", 1)
    rank0, rank1 = (dict(numpy.load(tmp_path / f"rank{r}.npz")) for r in (0, 1))
    assert abs(float(rank0["loss"]) - float(reference["loss"])) > 1e-6
    assert numpy.abs(rank0["grad/0.weight"] - reference["grad/0.weight"]).max() > 1e-6
    assert numpy.abs(rank0["1.moving_mean"] - reference["1.moving_mean"]).max() > 1e-6
    assert numpy.abs(rank0["1.moving_mean"] - rank1["1.moving_mean"]).max() > 1e-6   # each rank its own
    numpy.testing.assert_array_equal(rank0["0.weight"], rank1["0.weight"])            # one model still


def tinybn_command(*args):
    return [sys.executable, "-m", "tinybn", "train", "--no-progress", "--no-plot", *args]


COMMON = ("--epochs", "1", "--train-subset", "1024", "--precise-bn", "4")


def history(out):
    return json.loads((Path(out) / "metrics.json").read_text())["history"]


def test_train_distributed_matches_one_process_and_resumes_with_another_number_of_ranks(tmp_path):
    single = subprocess.run(tinybn_command(*COMMON, "--out", str(tmp_path / "one")), capture_output=True, text=True,
                            env={**os.environ, "TINYBN_NUM_THREADS": "1"}, timeout=240)
    assert single.returncode == 0, single.stderr
    done = launch(2, "-m", "tinybn", "train", "--no-progress", "--no-plot", "--distributed", *COMMON,
                  "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("epoch  1/1") == 1 and "data parallel over 2 ranks" in done.stdout   # rank 0 speaks
    one, two = history(tmp_path / "one")[0], history(tmp_path / "two")[0]
    assert abs(one["train_loss"] - two["train_loss"]) < 1e-3      # float32: the same run up to rounding
    assert abs(one["test_acc_precise"] - two["test_acc_precise"]) < 0.01
    # the checkpoint knows nothing of the ranks: one process continues it, and then two again
    resumed = subprocess.run(tinybn_command("--epochs", "2", "--train-subset", "1024", "--precise-bn", "4", "--resume",
                                            "--out", str(tmp_path / "two")), capture_output=True, text=True,
                             env={**os.environ, "TINYBN_NUM_THREADS": "1"}, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    again = launch(2, "-m", "tinybn", "train", "--no-progress", "--no-plot", "--distributed", "--epochs", "3",
                   "--train-subset", "1024", "--precise-bn", "4", "--resume", "--out", str(tmp_path / "two"))
    assert again.returncode == 0, again.stderr
    assert [row["epoch"] for row in history(tmp_path / "two")] == [1, 2, 3]
    assert history(tmp_path / "two")[2]["train_loss"] < history(tmp_path / "two")[0]["train_loss"]


def test_a_rank_that_cannot_start_is_named_and_the_job_ends(tmp_path):
    rank1_without_data = [["-n", "1", sys.executable, "-m", "tinybn", "train", "--distributed", "--out", str(tmp_path)],
                          ["-n", "1", "-env", "TINYBN_DATA", str(tmp_path / "nowhere"), sys.executable, "-m", "tinybn",
                           "train", "--distributed", "--out", str(tmp_path)]]
    done = launch(None, *rank1_without_data, timeout=120)
    assert done.returncode == 2
    assert "error on rank 1: Fashion-MNIST was not found" in done.stderr
    assert done.stderr.count("error") == 1


def test_a_rank_that_fails_while_training_ends_the_job_instead_of_hanging(tmp_path):
    script = ("import sys, tinybn.app.train as t, tinybn.distributed as d\n"
              "original = t.train_epoch\n"
              "def failing(*args, **kwargs):\n"
              "    if d.get_communicator().rank == 1: raise RuntimeError('injected failure')\n"
              "    return original(*args, **kwargs)\n"
              "t.train_epoch = failing\n"
              "from tinybn.app.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    done = launch(2, "-c", script, "train", "--distributed", "--no-progress", *COMMON, "--out", str(tmp_path / "run"),
                  timeout=120)
    assert done.returncode == 1
    assert "rank 1 of 2 failed; ending the job" in done.stderr and "injected failure" in done.stderr
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_ranks_without_distributed_are_refused_once(tmp_path):
    done = launch(2, "-m", "tinybn", "train", "--out", str(tmp_path / "run"), timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("add --distributed") == 1
    bad = launch(2, "-m", "tinybn", "train", "--distributed", "--epochs", "0", timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("--epochs: must be") == 1


@pytest.mark.parametrize("args, message", [
    (("--bn-stats",), "--bn-stats records what one process sees"),
    (("--batch-size", "3", "--no-sync-bn"), "--batch-size 3 is too small for 2 ranks"),
    (("--train-subset", "2", "--batch-size", "8", "--no-sync-bn"), "no training batch"),
])
def test_a_setting_every_rank_refuses_is_said_once(tmp_path, args, message):
    done = launch(2, "-m", "tinybn", "train", "--distributed", "--no-progress", "--out", str(tmp_path / "run"), *args,
                  timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("error") == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()
