"""The Triton kernels behind ``gradscope.kernels`` (imported only where Triton is installed).

One program reduces one chunk of one tensor; table row t holds the tensor's address, element
count and destination in the accumulator (and, for moments, its row of the parameter table).
Programs past a tensor's end do nothing; partial results are combined with atomics.
"""

import torch
import triton
import triton.language as tl

DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def max_with_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _moments_of_chunk(base, n, chunk, cell, row, row_params, acc, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                      SAMPLES: tl.constexpr):
    """Add chunk ``chunk`` of the tensor at ``base`` to accumulator row ``acc + cell``."""
    start = chunk.to(tl.int64) * (BLOCK * ITERS)
    if start < n:
        # the shift c: the mean of SAMPLES evenly spaced elements, the same in every program
        step = tl.maximum(n // SAMPLES, 1)
        spots = tl.arange(0, SAMPLES).to(tl.int64) * step
        samples = tl.load(base + spots, mask=spots < n, other=0.0).to(tl.float32)
        c = tl.sum(samples, axis=0) / tl.minimum(n, SAMPLES).to(tl.float32)
        zeros_on = tl.load(row_params + row * 4)
        bounds_on = tl.load(row_params + row * 4 + 1)
        middle = tl.load(row_params + row * 4 + 2)
        threshold = tl.load(row_params + row * 4 + 3)
        s1 = tl.zeros([BLOCK], tl.float32)
        s2 = tl.zeros([BLOCK], tl.float32)
        top = tl.zeros([BLOCK], tl.float32)
        nonzero = tl.zeros([BLOCK], tl.float32)
        saturated = tl.zeros([BLOCK], tl.float32)
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            inside = offs < n
            y = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
            d = tl.where(inside, y - c, 0.0)
            s1 += d
            s2 += d * d
            top = tl.maximum(top, tl.abs(y), propagate_nan=tl.PropagateNan.ALL)
            nonzero += tl.where(y != 0.0, 1.0, 0.0)
            saturated += tl.where(inside & (tl.abs(y - middle) >= threshold), 1.0, 0.0)
        inv_n = 1.0 / n.to(tl.float32)
        tl.atomic_add(acc + cell, tl.sum(s1, axis=0) * inv_n)
        tl.atomic_add(acc + cell + 1, tl.sum(s2, axis=0) * inv_n)
        tl.atomic_max(acc + cell + 2, tl.reduce(top, 0, max_with_nan))
        tl.atomic_add(acc + cell + 3, tl.sum(nonzero, axis=0) * zeros_on)
        tl.atomic_add(acc + cell + 4, tl.sum(saturated, axis=0) * bounds_on)
        if chunk == 0:
            tl.store(acc + cell + 5, c)


@triton.jit
def moments(table, row_params, acc, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
            SAMPLES: tl.constexpr):
    """Moments of many tensors: program (chunk, t) reads chunk ``chunk`` of table row t's tensor."""
    t = tl.program_id(1)
    base = tl.load(table + t * 4).to(tl.pointer_type(DTYPE))
    n = tl.load(table + t * 4 + 1)
    cell = tl.load(table + t * 4 + 2)
    row = tl.load(table + t * 4 + 3)
    _moments_of_chunk(base, n, tl.program_id(0), cell, row, row_params, acc, BLOCK, ITERS, SAMPLES)


@triton.jit(do_not_specialize=["n", "cell", "row"])
def moments_one(y, n, cell, row, row_params, acc, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                SAMPLES: tl.constexpr):
    """Moments of one tensor, passed directly (no table to copy to the device first)."""
    _moments_of_chunk(y, n.to(tl.int64), tl.program_id(0), cell.to(tl.int64), row, row_params, acc, BLOCK, ITERS,
                      SAMPLES)


@triton.jit
def squares(table, acc, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    chunk = tl.program_id(0)
    t = tl.program_id(1)
    n = tl.load(table + t * 3 + 1)
    start = chunk.to(tl.int64) * (BLOCK * ITERS)
    if start < n:
        base = tl.load(table + t * 3).to(tl.pointer_type(DTYPE))
        cell = tl.load(table + t * 3 + 2)
        s2 = tl.zeros([BLOCK], tl.float32)
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            g = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
            s2 += g * g
        tl.atomic_add(acc + cell, tl.sum(s2, axis=0))
