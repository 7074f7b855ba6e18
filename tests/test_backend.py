"""Devices: names, the default, the GPU error, and the array-module switch."""
import subprocess
import sys

import numpy
import pytest

import tinybn
from tinybn import backend


def test_cpu_names_and_default():
    assert backend.resolve_device("cpu") == ("cpu", numpy)
    assert backend.resolve_device(None)[0] == tinybn.get_default_device()
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        backend.resolve_device("tpu")


def test_set_default_device():
    tinybn.set_default_device("strict")
    try:
        assert tinybn.tensor([1.0]).device == "strict"
    finally:
        tinybn.set_default_device(None)
    assert tinybn.tensor([1.0]).device == "cpu"


def test_environment_variable_sets_default():
    code = "import tinybn; print(tinybn.get_default_device())"
    out = subprocess.run([sys.executable, "-c", code], env={"TINYBN_DEVICE": "cpu", "PATH": ""},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cpu"


@pytest.mark.skipif(backend.cupy_available(), reason="a GPU is present")
@pytest.mark.parametrize("name", ["gpu", "cuda", "cuda:0"])
def test_gpu_without_cupy_gives_one_clear_error(name):
    with pytest.raises(tinybn.DeviceUnavailableError, match="cupy-cuda12x.*cupy-cuda13x"):
        tinybn.tensor([1.0], device=name)


def test_cupy_is_imported_lazily():
    code = "import sys, tinybn, tinybn.nn, tinybn.functional; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_get_array_module_and_moves(device):
    t = tinybn.tensor([1.0, 2.0], device=device)
    xp = tinybn.get_array_module(t.data)
    assert (xp is numpy) == (device == "cpu")
    back = t.to("cpu")
    assert back.device == "cpu" and isinstance(back.data, numpy.ndarray)
    numpy.testing.assert_array_equal(back.numpy(), [1.0, 2.0])


def test_strict_stand_in_refuses_host_arrays():
    """The stand-in must really catch the NumPy/CuPy mixing mistake, or the suite proves nothing."""
    from strict_xp import MixedDeviceError

    device_array = tinybn.tensor([1.0, 2.0], device="strict").data
    with pytest.raises(MixedDeviceError):
        device_array + numpy.ones(2)
    with pytest.raises(MixedDeviceError):
        numpy.concatenate([device_array, device_array])
    xp = tinybn.get_array_module(device_array)
    with pytest.raises(MixedDeviceError):
        xp.maximum(device_array, numpy.zeros(2))
    assert type(xp.zeros(2)) is type(device_array)
    assert float((device_array * 2.0).sum()) == 6.0
