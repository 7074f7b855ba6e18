"""Training on the real Fashion-MNIST (a subset), checkpoints, exact resume, NaN stop, and the CLI."""
import json
import subprocess
import sys

import numpy
import pytest

import tinybn
from tinybn import optim  # noqa: F401
from tinybn.app import checkpoint, data, models  # noqa: F401
from tinybn.app.train import Diverged, TrainConfig, train

from test_data import HAVE_DATA, needs_data


@pytest.fixture(scope="module")
def fashion():
    if not HAVE_DATA:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    return data.load_fashion_mnist()


def config(tmp_path, **overrides):
    base = dict(epochs=1, train_subset=3000, test_subset=1000, out=str(tmp_path / "run"), progress=False, plot=False)
    base.update(overrides)
    return TrainConfig(**base)


def quiet(*_):
    pass


@needs_data
def test_short_real_training_beats_chance_by_far(tmp_path, fashion):
    result = train(config(tmp_path, epochs=2, train_subset=6000), log=quiet, data=fashion)
    last = result["history"][-1]
    assert last["test_acc"] > 0.6, last  # chance is 0.1
    assert (tmp_path / "run" / "metrics.csv").read_text().startswith("epoch,train_loss,train_acc,test_acc")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["history"][-1]["epoch"] == 2


@needs_data
@pytest.mark.parametrize("model", ["lenet-bn", "lenet-bn-concise"])
def test_resume_continues_exactly(tmp_path, fashion, model):
    straight = train(config(tmp_path / "a", epochs=2, model=model), log=quiet, data=fashion)
    train(config(tmp_path / "b", epochs=1, model=model), log=quiet, data=fashion)
    resumed = train(config(tmp_path / "b", epochs=2, model=model, resume=True), log=quiet, data=fashion)
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        numpy.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert [r["train_loss"] for r in straight["history"]] == [r["train_loss"] for r in resumed["history"]]


@needs_data
def test_checkpoint_round_trip_and_validation(tmp_path, fashion):
    result = train(config(tmp_path), log=quiet, data=fashion)
    model_state, optim_state, meta = checkpoint.load(result["checkpoint"])
    assert meta["epoch"] == 1 and "1.moving_mean" in model_state
    other = models.build_model("lenet")
    with pytest.raises(KeyError, match="missing entries"):
        other.load_state_dict(model_state)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable tinybn checkpoint"):
        checkpoint.load(bad)


@needs_data
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_divergence_stops_with_epoch_and_step_and_keeps_checkpoint(tmp_path, fashion):
    first = train(config(tmp_path), log=quiet, data=fashion)
    saved = first["checkpoint"].read_bytes()
    with pytest.raises(Diverged, match=r"became nan at epoch 2, step \d+ .*smaller learning rate"):
        train(config(tmp_path, epochs=2, resume=True, lr=1e39), log=quiet, data=fashion)
    assert first["checkpoint"].read_bytes() == saved, "the last checkpoint must survive a divergence"


@needs_data
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_divergence_in_an_epochs_last_step_writes_no_checkpoint(tmp_path, fashion):
    """Regression (issue "No silent wrong answers", 12): with one step per epoch, the loss of that step was
    finite but its update was not, and the checkpoint kept 18 non-finite parameter arrays."""
    with pytest.raises(Diverged, match=r"parameters and buffers became NaN or infinite .* at epoch 1, step 1"):
        train(config(tmp_path, epochs=2, train_subset=256, lr=1e39), log=quiet, data=fashion)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_checkpoint_refuses_non_finite_arrays(tmp_path):
    model = models.build_model("lenet-bn")
    model[0].weight.data[0, 0, 0, 0] = numpy.inf
    with pytest.raises(ValueError, match="0.weight hold NaN or infinite values"):
        checkpoint.save(tmp_path / "c.npz", model, tinybn.optim.SGD(model.parameters(), 1.0), {})
    assert not (tmp_path / "c.npz").exists()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tinybn", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_help():
    out = run_cli("train", "--help")
    assert out.returncode == 0
    for flag in ["--model", "--epochs", "--lr", "--batch-size", "--device", "--seed", "--out", "--resume", "--data",
                 "--schedule", "--momentum", "--weight-decay", "--download"]:
        assert flag in out.stdout


def test_cli_errors_have_no_traceback(tmp_path):
    import os
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    missing = run_cli("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "apt-get install dataset-fashion-mnist" in missing.stderr and "--download" in missing.stderr
    gpu = run_cli("train", "--device", "gpu", "--out", str(tmp_path / "o"))
    if not tinybn.cupy_available():
        assert gpu.returncode == 2 and "cupy-cuda12x" in gpu.stderr and "Traceback" not in gpu.stderr
    bad = run_cli("train", "--epochs", "0")
    assert bad.returncode == 2 and "positive" in bad.stderr
    nockpt = run_cli("eval", str(tmp_path / "missing.npz"))
    assert nockpt.returncode == 2 and "does not exist" in nockpt.stderr and "Traceback" not in nockpt.stderr


@needs_data
def test_cli_train_and_eval(tmp_path):
    out = run_cli("train", "--epochs", "1", "--train-subset", "1000", "--out", str(tmp_path / "cli"), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "examples/sec on cpu" in out.stdout and "first BN layer gamma" in out.stdout
    assert (tmp_path / "cli" / "metrics.png").is_file()
    evaluated = run_cli("eval", str(tmp_path / "cli" / "checkpoint.npz"))
    assert evaluated.returncode == 0 and "test acc 0." in evaluated.stdout


@needs_data
def test_concise_model_trains_gamma_and_beta_on_fashion_mnist(tmp_path, fashion):
    """Regression (issue "No silent wrong answers", 2): the concise layers made new γ/β on their first call,
    after the optimizer had taken the model's parameters, so training never moved them."""
    from tinybn.app.train import first_batch_norm

    result = train(config(tmp_path, model="lenet-bn-concise", train_subset=2000), log=quiet, data=fashion)
    bn = first_batch_norm(result["model"])
    assert not numpy.allclose(bn.gamma.numpy(), 1.0) and not numpy.allclose(bn.beta.numpy(), 0.0)


def test_cli_refuses_unusable_numbers_in_one_line(tmp_path):
    for args, words in [(["--train-subset", "1"], "at least 2 images"), (["--lr", "inf"], "positive finite"),
                        (["--lr", "nan"], "positive finite")]:
        out = run_cli("train", "--epochs", "1", "--out", str(tmp_path / "o"), "--no-progress", *args)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_eval_names_a_damaged_checkpoint(tmp_path):
    model = models.build_model("lenet-bn")
    path = tmp_path / "damaged.npz"
    numpy.savez(path, meta=numpy.frombuffer(b"{not json", dtype=numpy.uint8))
    out = run_cli("eval", str(path))
    assert out.returncode == 2 and "metadata is damaged" in out.stderr and "Traceback" not in out.stderr
    state = {f"model/{k}": v for k, v in model.state_dict().items()}
    state["model/0.bias"] = numpy.full(6, "x")
    meta = {"epoch": 1, "config": {"model": "lenet-bn"}, "history": [{}]}

    def write(meta, state):
        numpy.savez(path, meta=numpy.frombuffer(json.dumps(meta).encode(), dtype=numpy.uint8), **state)

    write(meta, state)
    out = run_cli("eval", str(path))
    assert out.returncode == 2 and "0.bias" in out.stderr and "Traceback" not in out.stderr, out.stderr
    state["model/0.bias"] = numpy.full(6, numpy.nan, dtype=numpy.float32)
    write(meta, state)
    out = run_cli("eval", str(path))
    assert out.returncode == 2 and "0.bias is not finite" in out.stderr, out.stderr
    state["model/0.bias"] = numpy.zeros(6, dtype=numpy.float32)
    for damaged, words in [({**meta, "epoch": -1}, "epoch -1"), ({**meta, "epoch": "1"}, "epoch '1'"),
                           ({**meta, "history": []}, "history does not list"), ({"epoch": 1}, "no config"),
                           ([1, 2], "not a JSON object")]:
        write(damaged, state)
        out = run_cli("eval", str(path))
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, (damaged, out.stderr)


def test_cli_reports_bad_arguments_alone_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for args, words in [(["--out", str(afile)], "is a file"), (["--out", str(afile / "sub")], "cannot write"),
                        (["--seed", "-1"], "at least 0"), (["--device", "tpu"], "tpu")]:
        out = run_cli("train", "--epochs", "1", "--no-progress", *(["--out", str(tmp_path / "o")] * ("--out" not in args)),
                      *args)
        assert out.returncode == 2 and words in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr and "tuned this process" not in out.stderr, (args, out.stderr)
        assert out.stdout == "", (args, out.stdout)
    assert afile.read_text() == ""
    bench = run_cli("bench", "--batch-size", "0")
    assert bench.returncode == 2 and "at least 1" in bench.stderr and "Traceback" not in bench.stderr


def interrupt_cli_after(line_start, *args):
    """Run ``tinybn train *args``, press Ctrl-C once a stdout line starts with ``line_start``; return (rc, stderr)."""
    import signal
    process = subprocess.Popen([sys.executable, "-m", "tinybn", "train", "--no-progress", "--no-plot", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith(line_start):
                process.send_signal(signal.SIGINT)
                break
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, stderr


@needs_data
def test_ctrl_c_says_truthfully_what_the_run_leaves(tmp_path):
    run = ["--epochs", "5", "--train-subset", "20000", "--out", str(tmp_path / "r")]
    rc, stderr = interrupt_cli_after("training", *run)
    assert rc == 130 and "No epoch finished in this run, so it wrote no checkpoint" in stderr, stderr
    assert "Traceback" not in stderr and not (tmp_path / "r" / "checkpoint.npz").exists()
    rc, stderr = interrupt_cli_after("epoch  1/5", *run)
    assert rc == 130 and "The checkpoint of the last complete epoch is" in stderr and "Traceback" not in stderr, stderr
    assert checkpoint.load(tmp_path / "r" / "checkpoint.npz")[2]["epoch"] >= 1
    rc, stderr = interrupt_cli_after("resuming", *run, "--resume")
    assert rc == 130 and "is unchanged, and --resume continues from it" in stderr, stderr
    rc, stderr = interrupt_cli_after("training", *run)
    assert rc == 130 and "is from an earlier run" in stderr, stderr


def test_sgd_refuses_unusable_settings_and_foreign_states():
    net = models.build_model("lenet")
    for kwargs, words in [({"lr": float("inf")}, "positive finite"), ({"lr": float("nan")}, "positive finite"),
                          ({"lr": 0.1, "weight_decay": -1.0}, "weight decay"),
                          ({"lr": 0.1, "weight_decay": float("nan")}, "weight decay")]:
        with pytest.raises(ValueError, match=words):
            optim.SGD(net.parameters(), **kwargs)
    sgd = optim.SGD(net.parameters(), 0.1, momentum=0.9)
    params = list(net.parameters())
    good = {"velocity.0": numpy.ones(params[0].shape, numpy.float32)}
    for state, words in [({"velocity.99": good["velocity.0"]}, "velocity.99"),
                         ({"momentum.0": good["velocity.0"]}, "momentum.0"),
                         ({**good, "velocity.1": numpy.ones((3,), numpy.float32)}, "has shape")]:
        with pytest.raises(ValueError, match=words):
            sgd.load_state_dict(state)
        assert sgd.velocity == [None] * len(params)        # nothing was taken from a refused state
    sgd.load_state_dict(good)
    assert sgd.velocity[0].dtype == params[0].dtype and sgd.velocity[0].shape == params[0].shape


@needs_data
def test_resume_names_a_checkpoint_that_does_not_fit(tmp_path, fashion):
    train(config(tmp_path), log=quiet, data=fashion)
    path = tmp_path / "run" / "checkpoint.npz"
    with numpy.load(path) as archive:
        arrays = dict(archive)
    arrays["optim/velocity.0"] = numpy.zeros((1, 2), numpy.float32)
    numpy.savez(path, **arrays)
    with pytest.raises(ValueError, match="does not fit this run.*velocity.0 has shape"):
        train(config(tmp_path, epochs=2, resume=True, momentum=0.9), log=quiet, data=fashion)
