"""Reading ahead (refseg.runtime.prefetch.read_ahead): order, overlap with the caller, errors, early stop."""

import threading

import pytest

from refseg.runtime.prefetch import read_ahead


def test_order_and_values():
    assert list(read_ahead(range(7), lambda b: b * 10)) == [(b, b * 10) for b in range(7)]
    assert list(read_ahead([], lambda b: b)) == []
    assert list(read_ahead(range(5), lambda b: -b, depth=3)) == [(b, -b) for b in range(5)]
    with pytest.raises(ValueError, match="depth"):
        list(read_ahead(range(2), lambda b: b, depth=0))


def test_next_batch_is_read_while_the_caller_works():
    started = {b: threading.Event() for b in range(3)}

    def read(b):
        started[b].set()
        return b

    for b, _ in read_ahead(range(3), read):
        if b + 1 < 3:  # the caller is still on batch b, yet batch b + 1 is being read
            assert started[b + 1].wait(timeout=10)
        assert threading.current_thread() is threading.main_thread()


def test_a_read_error_surfaces_at_its_batch():
    def read(b):
        if b == 2:
            raise OSError("disk gone")
        return b

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for b, r in read_ahead(range(5), read):
            got.append(r)
    assert got == [0, 1]


def test_stopping_early_reads_no_further():
    seen = []
    for b, _ in read_ahead(range(100), seen.append):
        if b == 3:
            break
    assert seen == [0, 1, 2, 3, 4]  # the batch after the last one taken was already in flight, no more
