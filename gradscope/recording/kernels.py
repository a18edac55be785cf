"""Reductions over many tensors in one launch: the statistics of every watched layer at once.

On a GPU, a small training step is bound by the host launching kernels, and a recorder that
reduces each layer's output and gradient with its own ops adds a dozen launches per layer. These
kernels take up to eight tensors per launch as arguments, with their element counts and
destinations, and reduce them together, in the spirit of PyTorch's ``_foreach`` multi-tensor
kernels (and, like them, with nothing copied to the device first). Written in Triton, which
ships with PyTorch's CUDA builds; where it is missing (CPU builds) the same arithmetic runs with
torch ops per tensor (``reduce_moments_by_torch``, ``reduce_squares_by_torch``), which is what
the tests of the batching logic use on machines without a GPU.

Per tensor, ``reduce_moments`` accumulates, in float32, the mean of d = y - c and of d^2 (c is
the mean of SHIFT_SAMPLES evenly spaced elements, ``moments.shift_of``, so the variance
E[d^2] - E[d]^2 keeps its digits when the mean is large against the spread), max |y|, the count
of nonzero elements and the count of saturated ones; ``reduce_squares`` accumulates sum(g^2).
Programs add their partial results atomically, so the low bits can differ from run to run.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradscope.recording.moments import SHIFT_SAMPLES, shift_of, shifted_variance

#: Columns of the moments accumulator: E[d], E[d^2], max |y|, #nonzero, #saturated, shift c.
M_D, M_D2, M_ABSMAX, M_NONZERO, M_SAT, M_SHIFT = range(6)
N_MOMENT_COLS = 6
#: Columns of the per-row parameter table: count zeros (0/1), has bounds (0/1), middle, threshold.
N_ROW_PARAMS = 4

_BLOCK = 1024
_ITERS = 8
_CHUNK = _BLOCK * _ITERS  # elements per program
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Widest token vector ``block_sums`` reads (one tile row); wider ones take the torch path.
MAX_TOKEN_DIM = 8192
_TOKEN_TILE = 4096  # elements of y per tile of block_sums
_TOKEN_PROGRAMS = 32  # programs per sample along the tokens: few atomic adds into each output
TOKEN_WARPS = 8  # per block_sums program: half the registers per thread of 4 (ptxas, sm_90)


def supports(t: Tensor) -> bool:
    """Whether ``t``'s elements can be read as one dense run of a supported dtype."""
    if t.dtype not in _DTYPES:
        return False
    if t.is_contiguous():
        return True
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


@functools.cache
def _triton_kernels() -> Any:
    """The module of jitted kernels, or None without Triton."""
    try:
        from gradscope.recording import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` (a CUDA GPU with Triton installed)."""
    return device.type == "cuda" and _triton_kernels() is not None


# Set by tests and benchmarks: "torch" forces batching with the torch path; "triton" runs the
# kernels on any device, which on a CPU works only in Triton's interpreter (TRITON_INTERPRET=1
# before triton is first imported); "off" turns batching off.
MODE: str | None = None


def _kernels_for(device: torch.device) -> Any:
    if MODE == "torch":
        return None
    if MODE == "triton" or device.type == "cuda":
        return _triton_kernels()
    return None


def uses_triton(device: torch.device) -> bool:
    """Whether ``reduce_moments``/``reduce_squares`` can run on ``device`` (else: the torch path)."""
    return _kernels_for(device) is not None


def _groups(tensors: Sequence[Tensor], size: int) -> list[list[int]]:
    """Indices of ``tensors`` in groups of one dtype and at most ``size`` (one launch each)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    return [idx[k:k + size] for idx in by_dtype.values() for k in range(0, len(idx), size)]


def _padded(values: list[Any], fill: Any, size: int) -> list[Any]:
    return values + [fill] * (size - len(values))


def _launches(tensors: Sequence[Tensor], columns: Sequence[Sequence[int]], k: int) -> Any:
    """(grid, arguments) of each launch over ``tensors``: up to ``k`` tensors of one dtype (unused
    slots repeat the first with n = 0), their element counts, then each column of per-tensor ints."""
    for idx in _groups(tensors, k):
        ts = [tensors[i] for i in idx]
        args = [*_padded(ts, ts[0], k), *_padded([t.numel() for t in ts], 0, k)]
        for column in columns:
            args += _padded([column[i] for i in idx], 0, k)
        yield (max(-(-t.numel() // _CHUNK) for t in ts), len(ts)), args


def reduce_moments(tensors: Sequence[Tensor], cells: Sequence[int], rows: Sequence[int],
                   row_params: Tensor, acc: Tensor) -> None:
    """Accumulate the moments of each ``tensors[i]`` into ``acc.view(-1)[cells[i]:][:6]``.

    ``acc`` is a zeroed float32 tensor on the tensors' device; ``rows[i]`` picks the row of
    ``row_params`` ([rows, 4]: count zeros, has bounds, middle, threshold) that applies.
    Every tensor must pass ``supports``, and ``uses_triton`` must hold for the device.
    """
    kernels = _kernels_for(acc.device)
    for grid, args in _launches(tensors, (cells, rows), kernels.ARGS):
        kernels.moments[grid](*args, row_params, acc, BLOCK=_BLOCK, ITERS=_ITERS, SAMPLES=SHIFT_SAMPLES)


def reduce_moment(y: Tensor, cell: int, row: int, row_params: Tensor, acc: Tensor) -> None:
    """``reduce_moments`` of one tensor, launched on its own (for outputs that cannot wait)."""
    kernels = _kernels_for(acc.device)
    chunks = -(-y.numel() // _CHUNK)
    kernels.moments_one[(chunks,)](y, y.numel(), cell, row, row_params, acc, BLOCK=_BLOCK, ITERS=_ITERS,
                                   SAMPLES=SHIFT_SAMPLES)


def reduce_squares(tensors: Sequence[Tensor], cells: Sequence[int], acc: Tensor) -> None:
    """Add sum(t^2) of each ``tensors[i]`` (float32 accumulation) to ``acc.view(-1)[cells[i]]``."""
    kernels = _kernels_for(acc.device)
    for grid, args in _launches(tensors, (cells,), kernels.ARGS):
        kernels.squares[grid](*args, acc, BLOCK=_BLOCK, ITERS=_ITERS)


def sample_squares(x: Tensor, y: Tensor, out: Tensor) -> None:
    """Add ||y_i - x_i||^2, ||x_i||^2, ||y_i||^2 of each sample i (leading dim) of two contiguous
    tensors of one shape to ``out`` [3, samples] (zeroed, float32), reading each once."""
    kernels = _kernels_for(out.device)
    samples = out.shape[1]
    per_sample = x.numel() // samples
    chunks = -(-per_sample // _CHUNK)
    kernels.sample_squares[(chunks, samples)](x, y, out, samples, per_sample, BLOCK=_BLOCK, ITERS=_ITERS)


def supports_tokens(y: Tensor) -> bool:
    """Whether ``block_sums`` can read ``y`` [batch, tokens, dim]: rows of a supported dtype,
    each contiguous (a transposed sequence-first view is fine), at most MAX_TOKEN_DIM wide."""
    return (y.dim() == 3 and y.dtype in _DTYPES and y.numel() > 0 and (y.stride(2) == 1 or y.shape[2] == 1)
            and y.shape[2] <= MAX_TOKEN_DIM)


def block_sums(x: Tensor | None, y: Tensor, squares: Tensor | None, sums: Tensor) -> None:
    """In one launch that reads each tensor once: add sum_t y[b, t] / ||y[b, t]|| of each sample b
    of ``y`` [batch, tokens, dim] to ``sums`` [batch, dim] (``identity.token_direction_sums``) and,
    given ``x`` of y's shape, ||y_b - x_b||^2, ||x_b||^2, ||y_b||^2 to ``squares`` [3, batch]
    (``identity.sample_squares``). Both outputs zeroed float32; x and y pass ``supports_tokens``."""
    kernels = _kernels_for(sums.device)
    batch, tokens, dim = y.shape
    block_d = _next_power_of_two(dim)
    rows = max(1, _TOKEN_TILE // block_d)  # tokens per tile
    # tiles per program, a power of two (few compiled variants), so that a sample has at most
    # _TOKEN_PROGRAMS programs adding into its outputs
    tiles = _next_power_of_two(-(-tokens // (rows * _TOKEN_PROGRAMS)))
    grid = (batch, -(-tokens // (rows * tiles)))
    pair = x is not None
    if not pair:  # placeholders the kernel does not read
        x, squares = y, sums
    kernels.block_sums[grid](x, y, squares, sums, tokens, dim, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                             batch, BLOCK_D=block_d, ROWS=rows, TILES=tiles, PAIR=pair, num_warps=TOKEN_WARPS)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def reduce_squares_by_torch(tensors: Sequence[Tensor], cells: Sequence[int], acc: Tensor) -> None:
    """``reduce_squares`` with torch ops, one tensor at a time (no Triton)."""
    flat = acc.view(-1)
    for t, cell in zip(tensors, cells):
        flat[cell] += torch.linalg.vector_norm(t, dtype=torch.float32).square()


def reduce_moments_by_torch(tensors: Sequence[Tensor], cells: Sequence[int], rows: Sequence[int],
                            params: Sequence[Sequence[float]], acc: Tensor) -> None:
    """``reduce_moments`` with torch ops, one tensor at a time (no Triton); ``params``: the
    parameter table as host lists."""
    flat = acc.view(-1)
    for t, cell, row in zip(tensors, cells, rows):
        y = t.detach().reshape(-1).float()
        n = y.numel()
        c = shift_of(y)
        d = y - c
        zeros_on, bounds_on, middle, threshold = params[row]
        values = torch.stack([
            flat[cell + M_D] + d.sum() / n,
            flat[cell + M_D2] + d.square().sum() / n,
            torch.maximum(flat[cell + M_ABSMAX], torch.linalg.vector_norm(y, float("inf"))),
            flat[cell + M_NONZERO] + (torch.count_nonzero(y).float() if zeros_on else 0.0),
            flat[cell + M_SAT] + (((y - middle).abs() >= threshold).sum().float() if bounds_on else 0.0),
            c,
        ])
        flat[cell: cell + N_MOMENT_COLS] = values


def finish_moments(acc: Tensor) -> Tensor:
    """[N, 5] float32 (mean, variance, max |y|, #nonzero, #saturated) from an accumulator [N, 6]."""
    m1, m2 = acc[:, M_D], acc[:, M_D2]
    mean = acc[:, M_SHIFT] + m1
    var = shifted_variance(m1, m2)
    return torch.cat([mean[:, None], var[:, None], acc[:, M_ABSMAX:M_SAT + 1]], dim=1)
