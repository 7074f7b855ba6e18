"""Fashion-MNIST: find it, check it, read it, and feed it in batches.

Where the files come from, in order:

1. ``--data DIR`` (the ``data_dir`` argument) or the ``TINYBN_DATA`` environment variable — when given,
   this folder is the only place looked at (and the download target);
2. tinybn's cache, ``$XDG_CACHE_HOME/tinybn/fashion-mnist`` (default ``~/.cache/tinybn/fashion-mnist``);
3. Debian's ``dataset-fashion-mnist`` package, ``/usr/share/datasets/fashion-mnist``;
4. a download from the official source into the cache, when allowed (``--download``).

Every file is checked twice: the downloaded ``.gz`` against the MD5 that upstream publishes, and
the decompressed payload against a SHA-256 recorded here. (Debian recompressed the ``.gz`` files,
so their bytes differ from upstream's, but the payloads are identical: the SHA-256 is what makes
every source trustworthy.)
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy

from .. import backend

FILES = {
    # name: (file, payload SHA-256, upstream .gz MD5)
    "train-images": ("train-images-idx3-ubyte.gz", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                     "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels": ("train-labels-idx1-ubyte.gz", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                     "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images": ("t10k-images-idx3-ubyte.gz", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                    "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels": ("t10k-labels-idx1-ubyte.gz", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                    "bb300cfdad3c16e7a12a480ee83cd310"),
}
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(RuntimeError):
    """The dataset is missing, corrupt or malformed; the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinybn" / "fashion-mnist"


def candidate_dirs(data_dir=None) -> list[Path]:
    """The places searched, in order."""
    explicit = data_dir or os.environ.get("TINYBN_DATA")
    dirs = [Path(explicit)] if explicit else []
    return dirs + [cache_dir(), DEBIAN_DIR]


# ------------------------------------------------------------------ IDX format

_IDX_DTYPES = {0x08: numpy.uint8, 0x09: numpy.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx_bytes(payload: bytes, name: str = "IDX data") -> numpy.ndarray:
    """Parse an IDX payload: magic (0, 0, dtype, ndim), ndim big-endian uint32 sizes, then the values."""
    if len(payload) < 4:
        raise DataError(f"{name}: {len(payload)} bytes is too short for an IDX header")
    zero1, zero2, type_code, ndim = payload[:4]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{name}: bad IDX magic number {payload[:4].hex()} (expected 0000 08 01 for labels or "
                        f"0000 08 03 for images)")
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", payload[4:header])
    dtype = numpy.dtype(_IDX_DTYPES[type_code])
    expected = int(numpy.prod(shape)) * dtype.itemsize
    if len(payload) - header != expected:
        raise DataError(f"{name}: the header promises shape {shape} ({expected} bytes of data) but the file holds "
                        f"{len(payload) - header} bytes: it is truncated or corrupt")
    return numpy.frombuffer(payload, dtype=dtype, offset=header).reshape(shape)


def read_payload(path: Path) -> bytes:
    """The decompressed bytes of a .gz file (or the raw bytes of an uncompressed one)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataError(f"{path}: cannot decompress ({error}); the file is truncated or corrupt. Delete it and "
                            f"fetch it again.") from None
    return raw


def _find(key: str, dirs: list[Path]) -> Path | None:
    gz_name = FILES[key][0]
    for directory in dirs:
        for name in (gz_name, gz_name[:-3]):
            if (directory / name).is_file():
                return directory / name
    return None


def load_array(key: str, path: Path, verify: bool = True) -> numpy.ndarray:
    payload = read_payload(path)
    if verify:
        digest = hashlib.sha256(payload).hexdigest()
        if digest != FILES[key][1]:
            raise DataError(f"{path} is corrupt: the SHA-256 of its decompressed content is {digest}, expected "
                            f"{FILES[key][1]}. Delete it and fetch it again.")
    return read_idx_bytes(payload, str(path))


# ------------------------------------------------------------------ download


def download(dest_dir: Path | None = None, base_url: str = OFFICIAL_URL, md5s: dict | None = None,
             log=sys.stderr) -> Path:
    """Fetch the four files into ``dest_dir`` (the cache by default), with progress, MD5 checks and atomic writes."""
    dest_dir = Path(dest_dir or cache_dir())
    dest_dir.mkdir(parents=True, exist_ok=True)
    for key, (name, _, md5) in FILES.items():
        target = dest_dir / name
        if target.is_file():
            continue
        expected_md5 = (md5s or {}).get(key, md5)
        url = base_url.rstrip("/") + "/" + name
        handle, tmp = tempfile.mkstemp(dir=dest_dir, prefix=name + ".", suffix=".part")
        try:
            digest = hashlib.md5()
            with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0)
                done, last = 0, 0.0
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if time.monotonic() - last > 0.5 or done == total:
                        last = time.monotonic()
                        share = f"{100 * done / total:5.1f}%" if total else f"{done / 1e6:.1f} MB"
                        print(f"\rdownloading {name}: {share}", end="", file=log, flush=True)
            print(file=log)
            if digest.hexdigest() != expected_md5:
                raise DataError(f"download of {url} is corrupt: MD5 {digest.hexdigest()}, expected {expected_md5}")
            os.replace(tmp, target)  # atomic: a half-written file never carries the final name
        except OSError as error:
            raise DataError(f"could not download {url}: {error}") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return dest_dir


# ------------------------------------------------------------------ the dataset


def missing_message(dirs: list[Path], download_to: Path | None = None) -> str:
    """What to do when the files are in none of ``dirs``. ``download_to``: the folder named with --data or
    TINYBN_DATA, which is then the only place looked at and where --download saves (else the cache)."""
    searched = ", ".join(str(d) for d in dirs)
    apt = "sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs to /usr/share/datasets/fashion-mnist)"
    if download_to is not None:
        apt += ", then leave out --data and TINYBN_DATA, which make " + str(download_to) + " the only place looked at"
    return ("Fashion-MNIST was not found (searched: " + searched + "). Get it in one of three ways:\n"
            "  1. " + apt + "\n"
            "  2. add --download to fetch it from the official source into " + str(download_to or cache_dir()) + "\n"
            "  3. --data DIR (or TINYBN_DATA=DIR) pointing at a folder with the four *-ubyte(.gz) files")


def load_fashion_mnist(data_dir=None, allow_download: bool = False, verify: bool = True):
    """Return ``(train_images, train_labels, test_images, test_labels)`` as uint8/int64 NumPy arrays.

    Images are (N, 1, 28, 28) uint8; labels (N,) int64. Raises :class:`DataError` when missing or corrupt.
    """
    explicit = data_dir or os.environ.get("TINYBN_DATA")
    dirs = [Path(explicit)] if explicit else candidate_dirs()  # an explicit folder is the only place looked at
    if explicit and Path(explicit).exists() and not Path(explicit).is_dir():
        raise DataError(f"the Fashion-MNIST location {explicit} is a file; name the folder that holds the four "
                        f"*-ubyte(.gz) files (--data or TINYBN_DATA)")
    paths = {key: _find(key, dirs) for key in FILES}
    if any(path is None for path in paths.values()):
        if not allow_download:
            raise DataError(missing_message(dirs, dirs[0] if explicit else None))
        target = download(dirs[0] if explicit else cache_dir())
        paths = {key: _find(key, [target]) for key in FILES}
    arrays = {key: load_array(key, path, verify) for key, path in paths.items()}
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images"], arrays[f"{split}-labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise DataError(f"{split}: images of shape {images.shape} do not match labels of shape {labels.shape}")
    return (arrays["train-images"][:, None], arrays["train-labels"].astype(numpy.int64),
            arrays["t10k-images"][:, None], arrays["t10k-labels"].astype(numpy.int64))


class DataLoader:
    """Minibatches of (images, labels) as tensors on a device, shuffled reproducibly.

    * Images become float32 in [0, 1]; on the GPU the whole dataset is copied to the device once.
    * ``shuffle``: a new permutation every epoch from a generator seeded with ``seed``; its state
      can be saved and restored (:meth:`get_state`/:meth:`set_state`) for exact resumption.
    * The last short batch follows ``last_batch``: ``"keep"`` (default) feeds it, ``"drop"`` skips it.
      Either way, a final batch of a single example is never fed when ``min_batch=2``, because
      batch norm would see one value per feature (training loaders use that).
    * ``shard=(rank, world_size)``: a data-parallel rank's share. Every rank draws the same permutation
      and cuts each global batch of ``batch_size`` into ``world_size`` consecutive shards whose sizes
      differ by at most one; this rank gets shard ``rank``. :meth:`batch_sizes` and ``len`` stay global.
    """

    def __init__(self, images, labels, batch_size: int, shuffle: bool = False, seed: int = 0, device=None,
                 last_batch: str = "keep", min_batch: int = 1, shard: tuple[int, int] = (0, 1)):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if last_batch not in ("keep", "drop"):
            raise ValueError(f"last_batch must be 'keep' or 'drop', got {last_batch!r}")
        self.device = backend.resolve_device(device)[0]
        self.batch_size, self.shuffle, self.last_batch, self.min_batch = batch_size, shuffle, last_batch, min_batch
        self.images = backend.to_device(numpy.ascontiguousarray(images), self.device)
        self.labels = backend.to_device(numpy.ascontiguousarray(labels), self.device)
        self.rng = numpy.random.default_rng(seed)
        rank, world_size = shard
        if not 0 <= rank < world_size:
            raise ValueError(f"shard: rank {rank} is not one of the {world_size} ranks")
        self.shard = (rank, world_size)

    def batch_sizes(self) -> list[int]:
        n, b = len(self.labels), self.batch_size
        sizes = [b] * (n // b)
        rest = n % b
        if rest and self.last_batch == "keep" and rest >= self.min_batch:
            sizes.append(rest)
        return sizes

    def __len__(self):
        return len(self.batch_sizes())

    def get_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def __iter__(self):
        from ..autograd import Tensor

        n = len(self.labels)
        order = self.rng.permutation(n) if self.shuffle else numpy.arange(n)
        order = backend.to_device(order, self.device)
        start = 0
        rank, world_size = self.shard
        for size in self.batch_sizes():
            base, extra = divmod(size, world_size)     # ranks below `extra` take one more
            first = start + rank * base + min(rank, extra)
            index = order[first:first + base + (rank < extra)]
            start += size
            images = self.images[index].astype(numpy.float32) * (1.0 / 255.0)
            yield Tensor(images), Tensor(self.labels[index])
