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
    with pytest.raises(tinybn.DeviceUnavailableError, match="cupy-cuda12x.*cupy-cuda13x") as raised:
        tinybn.tensor([1.0], device=name)
    # tinybn is not on PyPI: the advice installs the extra from the clone, as the README does
    assert "pip install -e '.[cuda12]'" in str(raised.value) and "tinybn is not on PyPI" in str(raised.value)


class _DriverlessCupy:
    """CuPy as it behaves on a machine without a GPU driver: it imports, and CUDA blames the driver's version."""

    class cuda:
        class runtime:
            @staticmethod
            def getDeviceCount():
                raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA "
                                   "runtime version")


@pytest.mark.parametrize("driver", [False, True])
def test_cupy_without_a_gpu_driver_says_no_gpu_was_found_not_reinstall(monkeypatch, driver):
    """Issue 20: with CuPy installed and no GPU or driver, CUDA's words ("driver version is insufficient") and
    advice to reinstall CuPy pointed the wrong way."""
    monkeypatch.setitem(sys.modules, "cupy", _DriverlessCupy)
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_driver_present", lambda: driver)
    with pytest.raises(tinybn.DeviceUnavailableError) as raised:
        backend.resolve_device("gpu")
    message = str(raised.value)
    assert "insufficient" in message          # CUDA's own words stay, in parentheses
    if driver:
        assert "driver's CUDA version" in message and ".[cuda12]" in message
    else:
        assert "no NVIDIA GPU driver was found" in message and "pip install" not in message


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
