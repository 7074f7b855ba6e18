"""Fashion-MNIST: the IDX reader, checksums, the search order, the download, and the loader's policies."""
import gzip
import hashlib
import struct
from pathlib import Path

import numpy
import pytest

import tinybn
from tinybn.app import data

HAVE_DATA = all((data.DEBIAN_DIR / name).is_file() for name, _, _ in data.FILES.values())
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Debian's dataset-fashion-mnist is not installed")


def idx_bytes(array, type_code=0x08):
    return bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_idx_reader_round_trip(tmp_path):
    images = numpy.arange(2 * 3 * 4, dtype=numpy.uint8).reshape(2, 3, 4)
    numpy.testing.assert_array_equal(data.read_idx_bytes(idx_bytes(images)), images)
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)))
    numpy.testing.assert_array_equal(data.read_idx_bytes(data.read_payload(path)), images)


def test_idx_reader_rejects_bad_magic_and_truncation():
    good = idx_bytes(numpy.zeros((2, 3), numpy.uint8))
    with pytest.raises(data.DataError, match="bad IDX magic"):
        data.read_idx_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        data.read_idx_bytes(good[:-1])
    with pytest.raises(data.DataError, match="too short"):
        data.read_idx_bytes(b"\x00")


def test_truncated_gzip_is_reported(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"x" * 1000)[:20])
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        data.read_payload(path)


def test_checksum_failure_names_file_and_digests(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    payload = idx_bytes(numpy.zeros(10, numpy.uint8))
    path.write_bytes(gzip.compress(payload))
    found = hashlib.sha256(payload).hexdigest()
    with pytest.raises(data.DataError) as info:
        data.load_array("t10k-labels", path)
    message = str(info.value)
    assert str(path) in message and found in message and data.FILES["t10k-labels"][1] in message


def test_missing_dataset_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(data.DataError) as info:
        data.load_fashion_mnist(tmp_path / "empty")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message and "--data DIR" in message
    # a named folder is the only place looked at, and where --download saves (issue 20: the advice named the cache)
    assert f"--download to fetch it from the official source into {tmp_path / 'empty'}" in message
    assert "leave out --data and TINYBN_DATA" in message and str(tmp_path / "cache") not in message
    monkeypatch.delenv("TINYBN_DATA", raising=False)
    with pytest.raises(data.DataError) as info:
        data.load_fashion_mnist()
    assert f"into {tmp_path / 'cache' / 'tinybn' / 'fashion-mnist'}" in str(info.value)
    assert "leave out --data" not in str(info.value)


def test_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TINYBN_DATA", "/somewhere")
    assert data.candidate_dirs() == [Path("/somewhere"), tmp_path / "tinybn" / "fashion-mnist", data.DEBIAN_DIR]
    assert data.candidate_dirs("/explicit")[0] == Path("/explicit")


def test_download_checks_md5_and_writes_atomically(tmp_path):
    """The real download code, served from a local folder through a file:// URL (no network here)."""
    source = tmp_path / "mirror"
    source.mkdir()
    md5s = {}
    for key, (name, _, _) in data.FILES.items():
        blob = gzip.compress(idx_bytes(numpy.zeros(4, numpy.uint8)))
        (source / name).write_bytes(blob)
        md5s[key] = hashlib.md5(blob).hexdigest()
    dest = tmp_path / "cache"
    log = open(tmp_path / "log.txt", "w")
    data.download(dest, base_url=source.as_uri(), md5s=md5s, log=log)
    assert sorted(p.name for p in dest.iterdir()) == sorted(name for name, _, _ in data.FILES.values())
    md5s["train-images"] = "0" * 32
    (dest / data.FILES["train-images"][0]).unlink()
    with pytest.raises(data.DataError, match="MD5"):
        data.download(dest, base_url=source.as_uri(), md5s=md5s, log=log)
    assert not (dest / data.FILES["train-images"][0]).exists(), "a bad download must not keep the final name"
    assert not list(dest.glob("*.part"))


@needs_data
def test_real_fashion_mnist_loads_and_verifies():
    train_x, train_y, test_x, test_y = data.load_fashion_mnist()
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert train_x.dtype == numpy.uint8 and train_y.dtype == numpy.int64
    assert numpy.bincount(train_y).tolist() == [6000] * 10


def test_loader_batches_shuffling_and_last_batch_policy():
    images = numpy.arange(10 * 4, dtype=numpy.uint8).reshape(10, 1, 2, 2)
    labels = numpy.arange(10)
    keep = data.DataLoader(images, labels, 4, shuffle=True, seed=3)
    assert [len(y) for _, y in keep] == [4, 4, 2]
    first = numpy.concatenate([y.numpy() for _, y in data.DataLoader(images, labels, 4, shuffle=True, seed=3)])
    again = numpy.concatenate([y.numpy() for _, y in data.DataLoader(images, labels, 4, shuffle=True, seed=3)])
    numpy.testing.assert_array_equal(first, again)
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() != list(range(10))
    assert [len(y) for _, y in data.DataLoader(images, labels, 4, last_batch="drop")] == [4, 4]
    # 9 examples in batches of 4 leave one: never fed to batch norm in training
    assert [len(y) for _, y in data.DataLoader(images[:9], labels[:9], 4, min_batch=2)] == [4, 4]
    x, _ = next(iter(keep))
    assert x.dtype == numpy.float32 and float(x.numpy().max()) <= 1.0
    with pytest.raises(ValueError, match="last_batch"):
        data.DataLoader(images, labels, 4, last_batch="merge")


def test_loader_on_device(device):
    images = numpy.zeros((6, 1, 2, 2), numpy.uint8)
    loader = data.DataLoader(images, numpy.arange(6), 4, device=device)
    x, y = next(iter(loader))
    assert x.device == tinybn.backend.resolve_device(device)[0] and y.device == x.device
