"""Sequence tasks for Transformers, generated locally.

- ``copy`` / ``reverse``: reproduce a random token string, as is or reversed. For an
  encoder-decoder the string is the source and the answer the target; for a causal LM the
  sequence is ``string SEP answer`` and only the answer's tokens are scored.
- ``dyck``: next-token prediction on a generated grammar, Dyck-k (balanced brackets of k kinds
  with filler tokens): a closing bracket must match the innermost open one, so the model has to
  track nesting, not just token frequencies.
- ``majority``: sequence classification, the most frequent of ``num_classes`` token kinds.

Target positions that are not scored hold -100, ``F.cross_entropy``'s ignore_index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradscope.lab.tasks.base import Task

IGNORE = -100


def _split(inputs, targets, test_size):
    def take(x, sl):
        return tuple(t[sl] for t in x) if isinstance(x, tuple) else x[sl]
    tr, te = slice(test_size, None), slice(0, test_size)
    return take(inputs, tr), targets[tr], take(inputs, te), targets[te]


def copy_task(reverse: bool = False, input_kind: str = "seq2seq", seq_len: int = 32, vocab_size: int = 32,
              train_size: int = 8000, test_size: int = 1000, seed: int = 0) -> Task:
    """Copy or reverse a random string; ``input_kind`` "seq2seq" or "lm" shapes the data."""
    g = torch.Generator().manual_seed(seed)
    n = train_size + test_size
    bos, sep = 0, 1  # reserved tokens; the string uses 2 .. vocab_size - 1
    name = "reverse" if reverse else "copy"
    if input_kind == "seq2seq":
        source = torch.randint(2, vocab_size, (n, seq_len), generator=g)
        answer = source.flip(1) if reverse else source
        target_in = torch.cat([torch.full((n, 1), bos), answer[:, :-1]], dim=1)  # teacher forcing
        inputs: object = (source, target_in)
        targets = answer
    elif input_kind == "lm":
        half = (seq_len - 1) // 2
        string = torch.randint(2, vocab_size, (n, half), generator=g)
        answer = string.flip(1) if reverse else string
        seq = torch.cat([string, torch.full((n, 1), sep), answer], dim=1)  # [n, 2 * half + 1]
        seq = torch.cat([seq, torch.full((n, seq_len - seq.shape[1]), sep)], dim=1)
        inputs = seq
        targets = torch.full_like(seq, IGNORE)
        targets[:, half:2 * half] = seq[:, half + 1:2 * half + 1]  # predict the answer only
    else:
        raise ValueError(f"the {name} task is for encoder-decoders (seq2seq) or causal LMs (lm), not {input_kind!r}")
    x_tr, y_tr, x_te, y_te = _split(inputs, targets, test_size)
    return Task(name, input_kind, x_tr, y_tr, x_te, y_te,
                model_overrides={"vocab_size": vocab_size, "seq_len": seq_len},
                description=f"{name} a random string of "
                            f"{seq_len if input_kind == 'seq2seq' else (seq_len - 1) // 2} tokens")


def dyck_sequences(n: int, seq_len: int, kinds: int, fillers: int, g: torch.Generator,
                   p_open: float = 0.4, p_fill: float = 0.2) -> Tensor:
    """[n, seq_len] token ids of Dyck-``kinds`` strings (open brackets 0..k-1, closes k..2k-1,
    fillers 2k..2k+fillers-1); strings are prefixes of balanced ones, depth at most seq_len/2."""
    out = torch.empty(n, seq_len, dtype=torch.long)
    u = torch.rand(n, seq_len, generator=g)
    kind = torch.randint(0, kinds, (n, seq_len), generator=g)
    fill = torch.randint(0, max(fillers, 1), (n, seq_len), generator=g)
    for i in range(n):
        stack: list[int] = []
        for t in range(seq_len):
            room = seq_len - t > len(stack)  # still time to close what is open
            r = float(u[i, t])
            if fillers and r < p_fill:
                out[i, t] = 2 * kinds + int(fill[i, t])
            elif room and (not stack or r < p_fill + p_open):
                stack.append(int(kind[i, t]))
                out[i, t] = stack[-1]
            else:
                out[i, t] = kinds + stack.pop()
    return out


def dyck_task(seq_len: int = 32, kinds: int = 3, fillers: int = 4, train_size: int = 4000,
              test_size: int = 500, seed: int = 0) -> Task:
    """Causal LM on Dyck-k strings: predict every next token."""
    g = torch.Generator().manual_seed(seed)
    seq = dyck_sequences(train_size + test_size, seq_len + 1, kinds, fillers, g)
    x, y = seq[:, :-1], seq[:, 1:]
    x_tr, y_tr, x_te, y_te = _split(x, y, test_size)
    vocab = 2 * kinds + fillers
    return Task("dyck", "lm", x_tr, y_tr, x_te, y_te,
                model_overrides={"vocab_size": vocab, "seq_len": seq_len},
                description=f"next token of Dyck-{kinds} bracket strings with {fillers} filler tokens")


def majority_task(seq_len: int = 32, num_classes: int = 10, train_size: int = 8000, test_size: int = 1000,
                  seed: int = 0) -> Task:
    """Classify a token string by its most frequent token kind (ties go to the lowest)."""
    g = torch.Generator().manual_seed(seed)
    n = train_size + test_size
    favourite = torch.randint(0, num_classes, (n,), generator=g)
    seq = torch.randint(0, num_classes, (n, seq_len), generator=g)
    boost = torch.rand(n, seq_len, generator=g) < 0.15  # nudge one kind ahead
    seq = torch.where(boost, favourite[:, None], seq)
    counts = torch.nn.functional.one_hot(seq, num_classes).sum(1)
    label = counts.argmax(1)
    x_tr, y_tr, x_te, y_te = _split(seq, label, test_size)
    return Task("majority", "tokens", x_tr, y_tr, x_te, y_te,
                model_overrides={"vocab_size": num_classes, "seq_len": seq_len, "num_classes": num_classes},
                description=f"most frequent of {num_classes} token kinds in {seq_len} tokens")
