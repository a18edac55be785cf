"""The CIFAR-10 reader refuses what is not a batch file before it waits or allocates.

Issue 18, item 8. tests/test_tasks.py covers the official format, pickled code and a missing or
garbled file; these cover files that never end (a FIFO, /dev/zero), files too large to be a
batch, and pickles of a few bytes that ask numpy for a terabyte.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from gradscope.cli.main import main

from gradscope.lab.tasks import CifarFormatError, cifar10
from gradscope.lab.tasks.cifar import MAX_BATCH_BYTES, read_batch

TERA = 2**40


def batch_bytes(n=2, labels=None):
    rng = np.random.default_rng(0)
    labels = [int(v) for v in rng.integers(0, 10, n)] if labels is None else labels
    return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": labels}, protocol=2)


def global_(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def long1(n):
    raw = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


# numpy's own pickling names _reconstruct(ndarray, shape, dtype) then fills it: here the shape is 2^40
RECONSTRUCT_TERA = (b"\x80\x02" + global_("numpy._core.multiarray", "_reconstruct") + global_("numpy", "ndarray")
                    + long1(TERA) + b"\x85" + b"C\x01b" + b"\x87R.")
# ndarray((2^40,), 'u1') called directly
NDARRAY_TERA = b"\x80\x02" + global_("numpy", "ndarray") + long1(TERA) + b"\x85" + b"X\x02\x00\x00\x00u1" + b"\x86R."


class ForgedState:
    """Pickles as numpy does (an empty array, then __setstate__), with a state of 2^40 objects."""

    def __reduce__(self):
        return (np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct,
                (np.ndarray, (0,), b"b"), (1, (TERA,), np.dtype(object), False, [0]))


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "cifar"
    path.mkdir()
    return path


@pytest.mark.parametrize("payload", [RECONSTRUCT_TERA, NDARRAY_TERA, pickle.dumps({b"data": ForgedState()}, 2)],
                         ids=["reconstruct", "ndarray", "setstate"])
def test_a_tiny_pickle_of_a_huge_array_is_refused_before_allocating(root, payload):
    assert len(payload) < 300  # bytes, asking for a terabyte
    (root / "test_batch").write_bytes(payload)
    with pytest.raises(CifarFormatError, match=f"{root / 'test_batch'} is not a CIFAR-10 batch file"):
        read_batch(root / "test_batch")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_waiting_for_a_writer(root):
    fifo = root / "test_batch"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            read_batch(fifo)
        except Exception as exc:  # noqa: BLE001  (reported below)
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # unblock the reader before failing, so the test run can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=5)
        pytest.fail("read_batch waited for a writer on a FIFO")
    assert isinstance(outcome[0], CifarFormatError) and "not a regular file" in str(outcome[0])
    assert str(fifo) in str(outcome[0])


@pytest.mark.parametrize("target", ["/dev/zero", "directory"])
def test_a_device_or_directory_is_refused_naming_the_file(root, target):
    if target == "directory":
        (root / "data_batch_1").mkdir()
    elif not os.path.exists(target):
        pytest.skip(f"no {target} here")
    else:
        (root / "data_batch_1").symlink_to(target)
    with pytest.raises(CifarFormatError, match=f"{root / 'data_batch_1'} is not a regular file"):
        read_batch(root / "data_batch_1")


def test_a_file_larger_than_any_batch_is_refused_without_reading_it(root):
    big = root / "data_batch_1"
    with open(big, "wb") as f:  # sparse: no disk used, and nothing read if the size is checked first
        f.truncate(MAX_BATCH_BYTES + 1)
    with pytest.raises(CifarFormatError, match=f"{big} holds more than"):
        read_batch(big)


def test_an_array_larger_than_its_bytes_is_refused(root):
    """A state whose shape says more elements than its bytes hold (numpy checks this too; the
    reader refuses it before numpy sees it)."""
    raw = bytearray(batch_bytes(n=1))
    shape = struct.pack("<H", 3072)  # BININT2 3072 in the array's state
    at = raw.index(b"M" + shape)
    raw[at + 1:at + 3] = struct.pack("<H", 4096)
    (root / "test_batch").write_bytes(bytes(raw))
    with pytest.raises(CifarFormatError, match="does not match its 3072 bytes"):
        read_batch(root / "test_batch")


def test_arrays_come_back_as_plain_numpy_arrays(root):
    (root / "test_batch").write_bytes(batch_bytes(n=3, labels=np.array([1, 2, 3], dtype=np.int64)))
    x, y = read_batch(root / "test_batch")
    assert type(x) is np.ndarray and type(y) is np.ndarray
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [1, 2, 3]


def test_the_cli_refuses_a_forged_batch_before_training(root, tmp_path):
    for name in ("data_batch_1", "test_batch"):
        (root / name).write_bytes(batch_bytes())
    (root / "data_batch_2").write_bytes(RECONSTRUCT_TERA)
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, ["run", "resnet20", "--task", "cifar10", "--data-dir", str(root),
                                       "--steps", "1", "--out", str(out), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert str(root / "data_batch_2") in result.output and "internal error" not in result.output
    assert not out.exists()
    with pytest.raises(CifarFormatError, match="data_batch_2"):
        cifar10(root)
