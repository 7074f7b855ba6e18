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
def test_overwrite_with_a_batch_too_small_for_batch_norm_is_refused_before_any_file_goes(tmp_path, fashion):
    """Issue 21: train --overwrite --batch-size 1 deleted the previous run's files, then failed at step 1 advising
    to switch the layer to eval mode."""
    train(config(tmp_path, train_subset=600), log=quiet, data=fashion)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ValueError, match=r"--batch-size 1: the model cannot train on batches of 1 image\(s\): "
                                         r"batch_norm .* Use --batch-size 2 or more") as raised:
        train(config(tmp_path, train_subset=600, batch_size=1, overwrite=True), log=quiet, data=fashion)
    assert "eval mode" not in str(raised.value)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    train(config(tmp_path / "plain", model="lenet", train_subset=8, batch_size=1), log=quiet, data=fashion)  # no BN


@needs_data
def test_metrics_record_the_number_of_precise_bn_batches_used_not_the_default(tmp_path, fashion):
    """Issue 20: metrics.json said "precise_bn": null though 50 batches were used."""
    train(config(tmp_path, train_subset=600, precise_bn=None), log=quiet, data=fashion)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["config"]["precise_bn"] == 50 and "test_acc_precise" in saved["history"][0]
    train(config(tmp_path / "plain", model="lenet", train_subset=600, precise_bn=None), log=quiet, data=fashion)
    assert json.loads((tmp_path / "plain" / "run" / "metrics.json").read_text())["config"]["precise_bn"] == 0


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
        train(config(tmp_path, epochs=2, resume=True, lr=1e39, override_config=True), log=quiet, data=fashion)
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
    assert "Traceback" not in stderr and not (tmp_path / "r").exists()       # no empty folder left behind
    assert all(line.strip() for line in stderr.splitlines()), stderr          # no blank line without a progress bar
    rc, stderr = interrupt_cli_after("epoch  1/5", *run)
    assert rc == 130 and "The checkpoint of the last complete epoch is" in stderr and "Traceback" not in stderr, stderr
    assert checkpoint.load(tmp_path / "r" / "checkpoint.npz")[2]["epoch"] >= 1
    rc, stderr = interrupt_cli_after("resuming", *run, "--resume")
    assert rc == 130 and "is unchanged, and --resume continues from it" in stderr, stderr
    rc, stderr = interrupt_cli_after("training", *run, "--overwrite")   # the earlier run is replaced at the start
    assert rc == 130 and "No epoch finished in this run, so it wrote no checkpoint" in stderr, stderr
    assert not (tmp_path / "r" / "checkpoint.npz").exists()
    rc, stderr = interrupt_cli_after("epoch  1/5", *run, "--overwrite")
    assert rc == 130 and "the same command with --resume in place of --overwrite continues" in stderr, stderr


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
        train(config(tmp_path, epochs=2, resume=True), log=quiet, data=fashion)


# the run folder, resuming, and what the command line checks before any work ----------------------------------


def test_a_new_run_refuses_a_folder_that_holds_one(tmp_path, fashion):
    train(config(tmp_path), log=quiet, data=fashion)
    saved = (tmp_path / "run" / "checkpoint.npz").read_bytes()
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(config(tmp_path), log=quiet, data=fashion)
    with pytest.raises(ValueError, match="give one"):
        train(config(tmp_path, resume=True, overwrite=True), log=quiet, data=fashion)
    assert (tmp_path / "run" / "checkpoint.npz").read_bytes() == saved
    (tmp_path / "run" / "best.npz").write_bytes(b"an earlier run's")
    train(config(tmp_path, overwrite=True, seed=1), log=quiet, data=fashion)
    assert not (tmp_path / "run" / "best.npz").exists()
    assert checkpoint.load(tmp_path / "run" / "checkpoint.npz")[2]["config"]["seed"] == 1


def test_resume_names_changed_settings_and_takes_them_only_when_told(tmp_path, fashion):
    train(config(tmp_path), log=quiet, data=fashion)
    with pytest.raises(ValueError, match=r"--batch-size 256 -> 128; --lr 1.0 -> 0.5\).*--override-config"):
        train(config(tmp_path, epochs=2, resume=True, lr=0.5, batch_size=128), log=quiet, data=fashion)
    lines = []
    train(config(tmp_path, epochs=2, resume=True, lr=0.5, override_config=True), log=lines.append, data=fashion)
    assert any("resuming with changed settings: --lr 1.0 -> 0.5" in line for line in lines)
    train(config(tmp_path, epochs=3, resume=True, lr=0.5), log=quiet, data=fashion)   # more epochs need no override
    cosine = config(tmp_path, out=str(tmp_path / "cosine"), schedule="cosine")
    train(cosine, log=quiet, data=fashion)
    with pytest.raises(ValueError, match=r"--epochs 1 -> 2 \(the cosine schedule spans the epochs\)"):
        train(config(tmp_path, out=str(tmp_path / "cosine"), schedule="cosine", epochs=2, resume=True), log=quiet,
              data=fashion)


@needs_data
def test_cli_checks_everything_before_any_work_and_creates_nothing(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    out = tmp_path / "new" / "run"
    for args, words in [(["--momentum", "1.5"], "--momentum"), (["--momentum", "nan"], "--momentum"),
                        (["--weight-decay", "-1"], "--weight-decay"), (["--weight-decay", "inf"], "--weight-decay"),
                        (["--train-subset", "1"], "at least 2 images"), (["--resume"], "no checkpoint"),
                        (["--data", str(afile)], "is a file"), (["--data", str(tmp_path / "none")], "not found"),
                        (["--precise-bn", "-1"], "--precise-bn"), (["--val-size", "-5"], "--val-size")]:
        result = run_cli("train", "--epochs", "1", "--no-progress", "--out", str(out), *args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and "tuned this process" not in result.stderr, (args, result.stderr)
        assert not (tmp_path / "new").exists(), args
    for args, words in [([str(tmp_path)], "is a folder"), ([str(tmp_path / "x.npz"), "--device", "tpu"], "exist"),
                        ([str(afile), "--device", "tpu"], "not a readable")]:
        result = run_cli("eval", *args)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert "tuned this process" not in result.stderr


def test_cli_help_says_each_default_once_and_explains_every_option():
    import argparse
    from tinybn.app.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        for action in parser._actions:
            assert action.help, (name, action.dest)
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            for flag in action.option_strings:
                described = text.split(flag + " ", 2)[-1].split(" --", 1)[0]
                assert described.count("(default") <= 1, (name, flag, described)
    assert "(default: 0)" in " ".join(commands.choices["train"].format_help().split())     # a 0 default is shown


def test_damaged_checkpoint_arrays_and_histories_are_named(tmp_path, fashion):
    train(config(tmp_path), log=quiet, data=fashion)
    path = tmp_path / "run" / "checkpoint.npz"
    with numpy.load(path) as archive:
        good = dict(archive)
    meta = json.loads(good["meta"].tobytes().decode())

    def damaged(**changes):
        arrays = dict(good)
        for key, value in changes.items():
            arrays[key.replace("__", "/")] = value
        numpy.savez(path, **arrays)

    for change, words in [({"model__1.moving_var": -good["model/1.moving_var"] - 1}, "1.moving_var holds negative"),
                          ({"model__1.num_batches_tracked": numpy.array(1.5)}, "holds float64 values"),
                          ({"model__0.weight": good["model/0.weight"].astype(numpy.int8)}, "holds int8 values"),
                          ({"meta": numpy.frombuffer(json.dumps({**meta, "history": [5]}).encode(), numpy.uint8)},
                           "history's row for epoch 1")]:
        damaged(**change)
        result = run_cli("eval", str(path))
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    # issue 21: a hand-edited batch_size "64" crashed eval --precise-bn and made --resume report "64 -> 64"
    damaged(meta=numpy.frombuffer(json.dumps({**meta, "config": {**meta["config"], "batch_size": "64"}}).encode(),
                                  numpy.uint8))
    result = run_cli("eval", str(path), "--precise-bn", "2")
    assert result.returncode == 2 and "its settings say batch_size '64'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ValueError, match="its settings say batch_size '64', where tinybn writes int"):
        train(config(tmp_path, epochs=2, resume=True), log=quiet, data=fashion)
    bad_rng = {**meta, "tinybn_rng": {"bit_generator": "PCG64", "state": {"state": "x", "inc": 1}}}
    damaged(meta=numpy.frombuffer(json.dumps(bad_rng).encode(), numpy.uint8))
    with pytest.raises(ValueError, match="random generators' states cannot be restored"):
        train(config(tmp_path, epochs=2, resume=True), log=quiet, data=fashion)


# precise BN, validation, best epoch ---------------------------------------------------------------------------


def test_precise_bn_changes_no_weight_and_reports_both_accuracies(tmp_path, fashion):
    plain = train(config(tmp_path, out=str(tmp_path / "plain"), epochs=2), log=quiet, data=fashion)
    lines = []
    precise = train(config(tmp_path, out=str(tmp_path / "precise"), epochs=2, precise_bn=4), log=lines.append,
                    data=fashion)
    for (name, a), b in zip(plain["model"].named_parameters(), precise["model"].parameters()):
        numpy.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    for a, b in zip(plain["history"], precise["history"]):
        assert a["test_acc"] == b["test_acc"] and "test_acc_precise" in b and "test_acc_precise" not in a
    assert any("test acc" in line and "(moving averages) /" in line and "(precise BN)" in line for line in lines)
    # before the first such figure, one line says what precise BN is (issue 20)
    said = next(i for i, line in enumerate(lines) if line.startswith("precise BN: after each epoch"))
    assert "recomputed over 4 training batches with the weights frozen" in lines[said]
    assert said < next(i for i, line in enumerate(lines) if "(precise BN)" in line)
    # the model returned and the checkpoint hold the precise statistics; prediction with them gives the reported figure
    saved = checkpoint.load_precise(precise["checkpoint"])
    assert sorted(saved) == sorted(k for k in precise["model"].state_dict() if k.endswith(("moving_mean", "moving_var")))
    for name, value in saved.items():
        numpy.testing.assert_array_equal(precise["model"].state_dict()[name], value)
    from tinybn.app.train import evaluate
    test = data.DataLoader(fashion[2][:1000], fashion[3][:1000], 1000)
    assert round(evaluate(precise["model"], test), 6) == precise["history"][-1]["test_acc_precise"]
    moving = checkpoint.load(precise["checkpoint"])[0]
    numpy.testing.assert_array_equal(moving["1.moving_mean"], plain["model"].state_dict()["1.moving_mean"])


def test_precise_statistics_for_decorrelated_batch_norm(tmp_path, fashion):
    """A LeNet whose BN slots whiten gets precise statistics too: its mean and whitening matrix are recomputed,
    saved with the checkpoint, used by the model returned, and the moving averages are kept beside them."""
    lines = []
    result = train(config(tmp_path, epochs=1, precise_bn=3), log=lines.append, data=fashion,
                   model=models.build_lenet("decorrelated"))
    assert "test_acc_precise" in result["history"][-1]
    saved = checkpoint.load_precise(result["checkpoint"])
    state = result["model"].state_dict()
    assert sorted(saved) == sorted(k for k in state if k.endswith(("moving_mean", "moving_whitening")))
    assert any(k.endswith("moving_whitening") for k in saved)
    for name, value in saved.items():
        numpy.testing.assert_array_equal(state[name], value)
    moving = checkpoint.load(result["checkpoint"])[0]
    assert any(not numpy.array_equal(moving[k], saved[k]) for k in saved if k.endswith("moving_whitening"))
    from tinybn.app.train import evaluate
    test = data.DataLoader(fashion[2][:1000], fashion[3][:1000], 1000)
    assert round(evaluate(result["model"], test), 6) == result["history"][-1]["test_acc_precise"]


@needs_data
def test_eval_reports_moving_and_precise_accuracies(tmp_path):
    run = run_cli("train", "--epochs", "1", "--train-subset", "2000", "--precise-bn", "3", "--no-progress",
                  "--no-plot", "--out", str(tmp_path / "r"))
    assert run.returncode == 0, run.stderr
    path = str(tmp_path / "r" / "checkpoint.npz")
    saved = run_cli("eval", path)
    assert saved.returncode == 0 and "(moving averages) /" in saved.stdout and "(precise BN)" in saved.stdout
    assert "after 1 epoch," in saved.stdout
    fresh = run_cli("eval", path, "--precise-bn", "3")      # recomputed from the run's own 2,000 training images
    assert fresh.returncode == 0 and fresh.stdout == saved.stdout, (fresh.stdout, saved.stdout)
    plain = run_cli("train", "--model", "lenet", "--epochs", "1", "--train-subset", "500", "--no-progress",
                    "--no-plot", "--out", str(tmp_path / "p"))
    assert plain.returncode == 0 and "no batch norm" not in plain.stdout     # precise BN is off by default there
    explicit = run_cli("train", "--model", "lenet", "--epochs", "1", "--train-subset", "500", "--no-progress",
                       "--no-plot", "--precise-bn", "5", "--out", str(tmp_path / "q"))
    assert explicit.returncode == 0 and "no batch norm" in explicit.stdout
    refused = run_cli("eval", str(tmp_path / "p" / "checkpoint.npz"), "--precise-bn", "2")
    assert refused.returncode == 2 and "no batch norm" in refused.stderr


def test_validation_split_and_best_epoch(tmp_path, fashion):
    lines = []
    result = train(config(tmp_path, epochs=3, val_size=500, keep_best=True, precise_bn=2), log=lines.append,
                   data=fashion)
    assert any("best validation accuracy (precise BN)" in line for line in lines)
    history = result["history"]
    assert all("val_acc" in row and "val_acc_precise" in row for row in history)
    best_epoch = max(history, key=lambda row: (row["val_acc_precise"], row["epoch"]))["epoch"]
    best = checkpoint.load(tmp_path / "run" / "best.npz")[2]
    assert best["epoch"] == best_epoch and best["best_by"] == "val_acc_precise"
    lines.clear()
    train(config(tmp_path, out=str(tmp_path / "t"), keep_best=True), log=lines.append, data=fashion)
    assert any("for demonstration only" in line and "--val-size" in line for line in lines)
    with pytest.raises(ValueError, match="--val-size 2999 leaves fewer than 2"):
        train(config(tmp_path, out=str(tmp_path / "v"), val_size=2999), log=quiet, data=fashion)


def test_metrics_of_a_resumed_run_keep_every_column_and_leave_no_temporary_file(tmp_path, fashion):
    train(config(tmp_path), log=quiet, data=fashion)
    train(config(tmp_path, epochs=2, resume=True, precise_bn=2), log=quiet, data=fashion)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert "test_acc_precise" in rows[0] and len(rows) == 3
    assert not list((tmp_path / "run").glob("*.tmp"))


@needs_data
def test_a_full_disk_is_one_line_and_leaves_the_last_checkpoint_whole(tmp_path, capsys, monkeypatch):
    import errno
    from tinybn.app import cli

    args = ["train", "--epochs", "2", "--train-subset", "1000", "--no-progress", "--no-plot", "--precise-bn", "0",
            "--out", str(tmp_path / "r")]
    assert cli.main(args[:2] + ["1"] + args[3:]) == 0
    saved = (tmp_path / "r" / "checkpoint.npz").read_bytes()
    real = numpy.savez

    def full(handle, **arrays):
        real(handle, **arrays)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.numpy, "savez", full)
    capsys.readouterr()
    assert cli.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not write to") and "No space left on device" in err and "\n" not in err, err
    assert "unchanged" in err and (tmp_path / "r" / "checkpoint.npz").read_bytes() == saved
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_fit_refuses_an_epoch_without_batches_and_reports_plain_numbers():
    """Found by the outside test of issue 23: a generator of batches, used up after the first epoch, gave later
    epochs a loss and an accuracy of 0.0 without a word; and the rows held NumPy scalars."""
    from tinybn.app.loop import fit
    from tinybn.optim import SGD

    rng = numpy.random.default_rng(0)
    batches = [(tinybn.tensor(rng.standard_normal((4, 3)).astype(numpy.float32)), tinybn.tensor(rng.integers(0, 2, 4)))
               for _ in range(2)]
    model = tinybn.nn.Linear(3, 2)
    rows = fit(model, SGD(model.parameters(), 0.1), batches, 2)
    assert [type(row["train_loss"]) for row in rows] == [float, float] and type(rows[0]["train_acc"]) is float
    with pytest.raises(ValueError, match="epoch 2 had no batch.*not a generator"):
        fit(model, SGD(model.parameters(), 0.1), (batch for batch in batches), 2)


def test_ranks_share_their_running_statistics_before_the_divergence_guard_checks_them():
    """Found by the outside test of issue 23: with per-shard batch norm, a rank whose own running variance
    overflowed raised Diverged alone, before rank 0's statistics reached it, and rank 0 waited in the broadcast
    for ever. The statistics are shared first, so every rank checks the same model."""
    from types import SimpleNamespace

    from threadcomm import run_ranks
    from tinybn.app.guard import DivergenceGuard
    from tinybn.app.parallel import ShareBuffers
    from tinybn.app.train import _callbacks
    from tinybn.optim import SGD

    def work(comm):
        model = tinybn.nn.Sequential(tinybn.nn.Linear(3, 2), tinybn.nn.BatchNorm1d(2))
        model(tinybn.tensor((numpy.ones((4, 3)) * numpy.arange(4)[:, None]).astype(numpy.float32)))
        if comm.rank == 1:
            model[1].moving_var.data = model[1].moving_var.data * numpy.float32("inf")
        config = TrainConfig(sync_bn=False, progress=False)
        job = SimpleNamespace(config=config, comm=comm, train_loader=[None], device="cpu", precise=None, model=model,
                              evaluations={}, best_by="test_acc", out=None, log=print)
        optimizer = SGD(model.parameters(), 0.1)
        callbacks = [c for c in _callbacks(job, optimizer, [], None, comm.rank == 0)[0]
                     if isinstance(c, (ShareBuffers, DivergenceGuard))]
        assert [type(c) for c in callbacks] == [ShareBuffers, DivergenceGuard]
        for callback in callbacks:
            callback.on_epoch_end(1, {})
        return float(model[1].moving_var.data.max())

    assert all(numpy.isfinite(value) for value in run_ranks(2, work))


def test_the_progress_bar_leaves_the_first_step_out_of_its_eta(monkeypatch):
    """The first step carries the start-up (numba compiling its kernels: 8 s on the 2-core machine, where the rest
    take 10 ms), and an ETA from it said 1879 s for a 3 s epoch. The bar says '?' until a second step has run, and
    then counts from the steps after the first."""
    import io
    from tinybn.app import progress
    clock = iter([100.0, 108.0, 108.01, 108.02])           # start, after step 1 (8 s), steps 2 and 3 (10 ms each)
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = progress.Progress(235, "epoch 1", stream=stream, interval=0.0)
    for _ in range(3):
        bar.update(1)
    first, second, third = stream.getvalue().splitlines()
    assert "eta    ?s" in first
    assert "eta    2s" in second and "eta    2s" in third, (second, third)     # 233 steps of 10 ms
