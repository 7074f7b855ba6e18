"""The worker threads behind the fast paths: tinybn.fast.parallel."""
import os
import subprocess
import sys
import threading
import time

import numpy
import pytest

from tinybn.fast import blas, parallel

pytestmark = pytest.mark.skipif(parallel._spin is None, reason="no pthread_spin_lock here: map runs serially")


@pytest.fixture(params=[2, 3])
def threads(request, monkeypatch):
    """Run with 2 and 3 threads, all of them taking pieces even on a 2-core machine, then restore."""
    monkeypatch.setattr(parallel, "_cores", lambda: request.param)
    before = parallel.threads()
    parallel.set_threads(request.param)
    yield request.param
    parallel.set_threads(before)


def test_map_returns_every_result_in_order(threads):
    calls = []

    def square(k):
        calls.append(k)
        return k * k
    assert parallel.map(square, range(50)) == [k * k for k in range(50)]
    assert sorted(calls) == list(range(50))


def test_map_really_uses_other_threads(threads):
    """With pieces that release the GIL for a while, a worker thread takes some of them."""
    seen = set()
    block = numpy.ones(2_000_000)

    def piece(_):
        seen.add(threading.get_ident())
        for _ in range(5):
            numpy.exp(block)        # releases the GIL, giving a worker time to join
    parallel.map(piece, range(8 * threads))
    assert len(seen) > 1


def test_a_failing_piece_raises_in_the_caller_and_the_pool_still_works(threads):
    def piece(k):
        time.sleep(0.001)
        if k == 7:
            raise ZeroDivisionError("piece 7")
        return k
    with pytest.raises(ZeroDivisionError, match="piece 7"):
        parallel.map(piece, range(16))
    assert parallel.map(lambda k: -k, range(16)) == [-k for k in range(16)]


def test_nested_and_concurrent_maps_run_serially_and_stay_correct(threads):
    inner = parallel.map(lambda k: parallel.map(lambda j: k * 10 + j, range(3)), range(4))
    assert inner == [[k * 10 + j for j in range(3)] for k in range(4)]
    results = {}

    def caller(name):
        results[name] = parallel.map(lambda k: (name, k), range(20))
    callers = [threading.Thread(target=caller, args=(name,)) for name in "ab"]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    assert results == {name: [(name, k) for k in range(20)] for name in "ab"}


def test_workers_sleep_when_idle_and_wake_for_the_next_map(threads):
    parallel.map(lambda k: k, range(4))
    parallel.rest()
    assert parallel.map(lambda k: k + 1, range(4)) == [1, 2, 3, 4]
    time.sleep(parallel.IDLE_SPIN_SECONDS * 5)             # the watchdog's turn, after which it ends
    assert all(worker.asleep for worker in parallel._workers[:threads - 1])
    assert parallel._watchdog is None
    assert parallel.map(lambda k: k + 2, range(4)) == [2, 3, 4, 5]


def test_no_more_threads_take_pieces_than_there_are_cores(monkeypatch):
    """Waiting workers spin, so more of them than cores would slow everything: 4 threads on 2 cores cut
    the work into 4 pieces but run 2 threads."""
    monkeypatch.setattr(parallel, "_cores", lambda: 2)
    before = parallel.threads()
    parallel.set_threads(4)
    block = numpy.ones(1_000_000)
    try:
        assert len(parallel.pieces(100)) == 4
        seen = parallel.map(lambda _: (numpy.exp(block), threading.get_ident())[1], range(16))
        assert 1 <= len(set(seen)) <= 2
    finally:
        parallel.set_threads(before)


def test_one_thread_runs_everything_in_the_caller():
    before = parallel.threads()
    parallel.set_threads(1)
    try:
        assert {parallel.map(lambda _: threading.get_ident(), range(8))[k] for k in range(8)} == {threading.get_ident()}
    finally:
        parallel.set_threads(before)


def test_pieces_cover_the_range_without_tiny_pieces(threads):
    for count in (0, 1, 5, 1000):
        cut = parallel.pieces(count, smallest=100)
        assert [k for piece in cut for k in piece] == list(range(count))
        assert len(cut) <= threads and (len(cut) == 1 or min(len(piece) for piece in cut) >= 100)


def test_bad_thread_counts_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        parallel.set_threads(0)
    env = dict(os.environ, TINYBN_NUM_THREADS="many")
    out = subprocess.run([sys.executable, "-c", "import tinybn; print('imported'); tinybn.fast.parallel.threads()"],
                         env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "imported", "a bad TINYBN_NUM_THREADS must not break the import"
    assert out.returncode != 0 and "TINYBN_NUM_THREADS='many'" in out.stderr
    cli = subprocess.run([sys.executable, "-m", "tinybn", "train", "--epochs", "1"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr and "TINYBN_NUM_THREADS='many'" in cli.stderr


def test_environment_variable_sets_the_thread_count():
    env = dict(os.environ, TINYBN_NUM_THREADS="3")
    code = "from tinybn.fast import parallel; print(parallel.threads())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


def test_openblas_has_one_thread_while_pieces_run_and_gets_its_count_back(threads):
    """While a map's pieces run, OpenBLAS has one thread; when map returns (or raises), its count is back."""
    if blas.get_threads() is None:
        pytest.skip("NumPy does not use OpenBLAS here")
    before = blas.get_threads()
    blas.set_threads(2)
    try:
        seen = parallel.map(lambda _: blas.get_threads(), range(4))
        assert seen == [1, 1, 1, 1] and blas.get_threads() == 2
        with pytest.raises(ZeroDivisionError):
            parallel.map(lambda k: 1 / (k - 2), range(4))
        assert blas.get_threads() == 2
    finally:
        blas.set_threads(before)
