"""Built-in tasks: made locally, deterministic, well-formed; the CIFAR-10 reader is safe."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from gradscope.lab.tasks import DEFAULT_TASK, TASKS, CifarFormatError, UnknownTaskError, get_task
from gradscope.lab.tasks.cifar import cifar10, read_batch
from gradscope.lab.tasks.images import synthetic_images
from gradscope.lab.tasks.sequences import IGNORE, copy_task, dyck_sequences, majority_task


def test_synthetic_images_are_cifar_shaped_and_deterministic():
    a = synthetic_images(train_size=200, test_size=50, seed=3)
    b = synthetic_images(train_size=200, test_size=50, seed=3)
    assert a.train_inputs.shape == (200, 3, 32, 32) and a.test_inputs.shape == (50, 3, 32, 32)
    assert torch.equal(a.train_inputs, b.train_inputs) and torch.equal(a.test_targets, b.test_targets)
    assert set(a.train_targets.tolist()) == set(range(10))
    assert not torch.equal(a.train_inputs, synthetic_images(train_size=200, test_size=50, seed=4).train_inputs)
    assert a.model_overrides == {"num_classes": 10, "in_channels": 3, "input_size": 32}


def test_synthetic_images_are_not_solved_by_a_pixel_template_match():
    """Not trivial: matching each image against per-class mean images is far from perfect."""
    task = synthetic_images(train_size=2000, test_size=500)
    means = torch.stack([task.train_inputs[task.train_targets == c].mean(0) for c in range(10)])
    scores = task.test_inputs.flatten(1) @ means.flatten(1).T
    accuracy = (scores.argmax(1) == task.test_targets).float().mean()
    assert 0.1 < accuracy < 0.8, float(accuracy)


@pytest.mark.parametrize("reverse", [False, True])
def test_copy_and_reverse_for_encoder_decoder(reverse):
    task = copy_task(reverse, "seq2seq", seq_len=6, vocab_size=10, train_size=20, test_size=5)
    (source, target_in), target = task.train_inputs, task.train_targets
    assert torch.equal(target, source.flip(1) if reverse else source)
    assert torch.equal(target_in[:, 1:], target[:, :-1]) and (target_in[:, 0] == 0).all()


def test_reverse_for_causal_lm_scores_only_the_answer():
    task = copy_task(True, "lm", seq_len=9, vocab_size=10, train_size=20, test_size=5)
    seq, target = task.train_inputs[0], task.train_targets[0]
    string, answer = seq[:4], seq[5:9]
    assert seq[4] == 1 and torch.equal(answer, string.flip(0))
    assert torch.equal(target[4:8], answer) and (target[:4] == IGNORE).all() and (target[8:] == IGNORE).all()


def test_dyck_strings_close_the_innermost_open_bracket():
    kinds, fillers = 3, 2
    seqs = dyck_sequences(200, 24, kinds, fillers, torch.Generator().manual_seed(0))
    for seq in seqs.tolist():
        stack = []
        for tok in seq:
            if tok < kinds:
                stack.append(tok)
            elif tok < 2 * kinds:
                assert stack and stack.pop() == tok - kinds
            else:
                assert tok < 2 * kinds + fillers
        assert len(stack) <= 24
    assert (seqs < kinds).any() and (seqs >= 2 * kinds).any()


def test_majority_label_is_the_most_frequent_token():
    task = majority_task(seq_len=16, num_classes=5, train_size=100, test_size=10)
    for seq, label in zip(task.train_inputs, task.train_targets):
        counts = torch.bincount(seq, minlength=5)
        assert counts[label] == counts.max()


def test_task_lookup_errors():
    with pytest.raises(UnknownTaskError, match="unknown task"):
        get_task("imagenet", "image")
    with pytest.raises(UnknownTaskError, match="is for image models"):
        get_task("images", "lm")
    with pytest.raises(UnknownTaskError, match="--data-dir"):
        get_task("cifar10", "image")
    assert all(DEFAULT_TASK[kind] in TASKS for kind in DEFAULT_TASK)


def write_cifar_dir(root, n=4, files=("data_batch_1", "test_batch")):
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in files:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


def test_cifar10_reader_on_a_tiny_directory_in_the_official_format(tmp_path):
    root = write_cifar_dir(tmp_path / "cifar")
    x, y = read_batch(root / "data_batch_1")
    raw = pickle.loads((root / "data_batch_1").read_bytes())
    assert x.shape == (4, 3, 32, 32) and np.array_equal(x.reshape(4, -1), raw[b"data"])
    assert y.tolist() == raw[b"labels"]
    task = cifar10(root, train_files=("data_batch_1",))
    assert task.train_inputs.shape == (4, 3, 32, 32) and task.train_inputs.dtype == torch.float32
    assert abs(float(task.train_inputs.mean())) < 3


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_cifar10_reader_refuses_arbitrary_objects(tmp_path):
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [1]}, protocol=2))
    with pytest.raises(CifarFormatError, match="refusing to load"):
        read_batch(root / "test_batch")
    assert not (tmp_path / "PWNED").exists()


def test_cifar10_reader_names_missing_and_damaged_files(tmp_path):
    root = write_cifar_dir(tmp_path / "cifar")
    with pytest.raises(CifarFormatError, match="data_batch_2 is missing"):
        cifar10(root)
    (root / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CifarFormatError, match="test_batch is not a CIFAR-10 batch"):
        read_batch(root / "test_batch")
