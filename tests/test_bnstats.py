"""train --bn-stats: the recorder watches through forward hooks, records the right numbers, and changes nothing."""
import json

import numpy
import pytest

import tinybn
from tinybn import nn
from tinybn.app import models
from tinybn.app.bnstats import BNStatsRecorder
from tinybn.app.train import train

from test_train import config, fashion, quiet  # noqa: F401  (fashion is a fixture)


def test_forward_hooks_see_inputs_and_output_and_come_off():
    layer = nn.Linear(2, 3)
    seen = []
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append((module, inputs[0].shape,
                                                                                    output.shape)))
    x = tinybn.tensor(numpy.ones((4, 2), numpy.float32))
    layer(x)
    handle.remove()
    handle.remove()                              # a second remove does nothing
    layer(x)
    assert seen == [(layer, (4, 2), (4, 3))]
    doubled = layer.register_forward_hook(lambda module, inputs, output: output * 2)
    numpy.testing.assert_allclose(layer(x).numpy(), 2 * layer.forward(x).numpy())
    doubled.remove()


def test_recorded_statistics_are_those_of_the_layer_input():
    tinybn.manual_seed(0)
    model = models.build_model("lenet-bn")
    recorder = BNStatsRecorder(model, channels=3)
    x = tinybn.tensor(numpy.random.default_rng(0).random((16, 1, 28, 28), dtype=numpy.float32))
    conv_out = model[0](x).numpy().astype(numpy.float64)
    model(x)
    record = recorder.layers["1"]
    numpy.testing.assert_allclose(record["batch_mean"][0], conv_out[:, :3].mean(axis=(0, 2, 3)), rtol=1e-10)
    numpy.testing.assert_allclose(record["batch_var"][0], conv_out[:, :3].var(axis=(0, 2, 3)), rtol=1e-10)
    numpy.testing.assert_allclose(record["moving_mean"][0], model[1].moving_mean.numpy().reshape(-1)[:3])
    sigmoid_out = model[2].forward(model[1].forward(tinybn.tensor(conv_out.astype(numpy.float32)))).numpy()
    assert recorder.saturation["2"][0] == pytest.approx(((sigmoid_out < 0.05) | (sigmoid_out > 0.95)).mean(), abs=1e-3)
    model.eval()
    model(x)                                     # prediction mode: nothing recorded
    nn.recompute_batch_norm_statistics(model, [x])   # the precise-BN pass: nothing recorded either
    assert len(record["batch_mean"]) == 1 and len(recorder.saturation["2"]) == 1
    recorder.close()
    assert all(not module.__dict__.get("_forward_hooks") for module in model.modules())


def test_layers_are_named_as_a_student_sees_the_model_not_by_position_in_the_sequential():
    """Issue 20: the figure said "BN layer 1/5/10/13" and "sigmoid 2/6/11/14", positions in the Sequential."""
    recorder = BNStatsRecorder(models.build_model("lenet-bn"))
    assert recorder.to_json()["labels"] == {
        "1": "BN 1 (after conv 1)", "2": "sigmoid 1 (after BN 1)", "5": "BN 2 (after conv 2)",
        "6": "sigmoid 2 (after BN 2)", "10": "BN 3 (after dense 1)", "11": "sigmoid 3 (after BN 3)",
        "13": "BN 4 (after dense 2)", "14": "sigmoid 4 (after BN 4)"}
    plain = BNStatsRecorder(models.build_model("lenet"))
    assert plain.to_json()["labels"] == {"1": "sigmoid 1 (after conv 1)", "4": "sigmoid 2 (after conv 2)",
                                         "8": "sigmoid 3 (after dense 1)", "10": "sigmoid 4 (after dense 2)"}


def test_bn_stats_change_no_weight_and_cover_every_step(tmp_path, fashion):  # noqa: F811
    plain = train(config(tmp_path, out=str(tmp_path / "plain"), epochs=2), log=quiet, data=fashion)
    watched = train(config(tmp_path, out=str(tmp_path / "watched"), epochs=2, bn_stats=True), log=quiet, data=fashion)
    for a, b in zip(plain["model"].parameters(), watched["model"].parameters()):
        numpy.testing.assert_array_equal(a.numpy(), b.numpy())
    document = json.loads((tmp_path / "watched" / "bn_stats.json").read_text())
    steps = 3000 // 256 + 1                       # the last short batch (184 images) is fed too
    assert document["epoch_ends"] == [steps, 2 * steps]
    for name, record in document["bn_layers"].items():
        assert len(record["batch_mean"]) == len(record["moving_var"]) == 2 * steps, name
        assert len(record["gamma"]) == 2 and len(record["gamma"][0]) == watched["model"][int(name)].num_features
    assert all(len(values) == 2 * steps for values in document["sigmoid_saturation"].values())
    assert (tmp_path / "watched" / "bn_stats.png").stat().st_size > 10_000
    train(config(tmp_path, out=str(tmp_path / "watched"), epochs=3, bn_stats=True, resume=True), log=quiet,
          data=fashion)
    resumed = json.loads((tmp_path / "watched" / "bn_stats.json").read_text())
    assert resumed["epoch_ends"] == [steps, 2 * steps, 3 * steps]
    assert resumed["bn_layers"]["1"]["batch_mean"][:2 * steps] == document["bn_layers"]["1"]["batch_mean"]


def test_bn_stats_of_a_model_without_batch_norm_show_its_sigmoids(tmp_path, fashion):  # noqa: F811
    train(config(tmp_path, model="lenet", bn_stats=True), log=quiet, data=fashion)
    document = json.loads((tmp_path / "run" / "bn_stats.json").read_text())
    assert document["bn_layers"] == {} and len(document["sigmoid_saturation"]) == 4
    assert (tmp_path / "run" / "bn_stats.png").is_file()


def test_bn_stats_switched_on_when_resuming_say_where_they_start(tmp_path, fashion):  # noqa: F811
    train(config(tmp_path), log=quiet, data=fashion)
    lines = []
    train(config(tmp_path, epochs=2, resume=True, bn_stats=True), log=lines.append, data=fashion)
    document = json.loads((tmp_path / "run" / "bn_stats.json").read_text())
    assert document["first_epoch"] == 2 and len(document["epoch_ends"]) == 1
    assert any("they start at epoch 2" in line for line in lines)


def test_the_recorder_works_on_every_device(device):
    tinybn.manual_seed(0)
    model = models.build_model("lenet-bn").to(device)
    recorder = BNStatsRecorder(model)
    x = tinybn.tensor(numpy.random.default_rng(1).random((8, 1, 28, 28), dtype=numpy.float32), device=device)
    model(x)
    recorder.end_epoch()
    assert len(recorder.layers["1"]["batch_mean"]) == 1 and len(recorder.layers["1"]["gamma"][0]) == 6
    assert 0.0 <= recorder.saturation["2"][0] <= 1.0
    recorder.close()


def test_a_recorder_built_before_the_conversion_to_synchronized_layers_keeps_recording():
    """Found by the outside test of issue 21: the twin shared the hook, which looked the layer up by identity
    (KeyError)."""
    from tinybn.communicator import LocalCommunicator

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    recorder = BNStatsRecorder(model)
    model = nn.convert_sync(model, LocalCommunicator())
    model(tinybn.tensor(numpy.arange(12.0, dtype=numpy.float32).reshape(4, 3)))
    assert len(recorder.layers["1"]["batch_mean"]) == 1 and isinstance(model[1], nn.SyncBatchNorm)


def test_a_layer_used_twice_is_recorded_once_per_step_and_steps_count_model_calls():
    """Found by the outside test of issue 21: a shared BN was recorded twice per step, and epoch_ends counted its
    records, so the other layers' steps were drawn at the wrong epochs."""
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), shared, nn.Linear(3, 3), nn.BatchNorm1d(3), shared)
    recorder = BNStatsRecorder(model)
    x = tinybn.tensor(numpy.random.default_rng(0).standard_normal((4, 3)).astype(numpy.float32))
    for _ in range(3):
        model(x)
    recorder.end_epoch()
    assert recorder.epoch_ends == [3]
    assert len(recorder.layers["1"]["batch_mean"]) == 3 and len(recorder.layers["3"]["batch_mean"]) == 3
