"""The Triton kernels behind ``recording.kernels`` (imported only where Triton is installed).

One program reduces one chunk of one tensor. A launch takes up to ARGS tensors as arguments,
with their element counts and destinations in the accumulator (and, for moments, their rows of
the parameter table); programs past a tensor's end do nothing, and partial results are combined
with atomics.
"""

import triton
import triton.language as tl

ARGS = 8  # tensors per launch of ``moments`` and ``squares``


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


@triton.jit(do_not_specialize=[f"{arg}{i}" for arg in "ncr" for i in range(ARGS)])
def moments(
    y0, y1, y2, y3, y4, y5, y6, y7,
    n0, n1, n2, n3, n4, n5, n6, n7,
    c0, c1, c2, c3, c4, c5, c6, c7,
    r0, r1, r2, r3, r4, r5, r6, r7,
    row_params, acc, BLOCK: tl.constexpr, ITERS: tl.constexpr, SAMPLES: tl.constexpr,
):
    """Moments of up to 8 tensors of one dtype: program (chunk, t) reads chunk ``chunk`` of
    tensor ``y<t>`` (n elements, accumulator row at ``c``, parameter row ``r``). The tensors
    are kernel arguments, so nothing is copied to the device before the launch; unused
    slots repeat ``y0`` with n = 0."""
    t = tl.program_id(1)
    base, n, cell, row = y0, n0.to(tl.int64), c0.to(tl.int64), r0.to(tl.int64)
    if t == 1:
        base, n, cell, row = y1, n1.to(tl.int64), c1.to(tl.int64), r1.to(tl.int64)
    if t == 2:
        base, n, cell, row = y2, n2.to(tl.int64), c2.to(tl.int64), r2.to(tl.int64)
    if t == 3:
        base, n, cell, row = y3, n3.to(tl.int64), c3.to(tl.int64), r3.to(tl.int64)
    if t == 4:
        base, n, cell, row = y4, n4.to(tl.int64), c4.to(tl.int64), r4.to(tl.int64)
    if t == 5:
        base, n, cell, row = y5, n5.to(tl.int64), c5.to(tl.int64), r5.to(tl.int64)
    if t == 6:
        base, n, cell, row = y6, n6.to(tl.int64), c6.to(tl.int64), r6.to(tl.int64)
    if t == 7:
        base, n, cell, row = y7, n7.to(tl.int64), c7.to(tl.int64), r7.to(tl.int64)
    _moments_of_chunk(base, n, tl.program_id(0), cell, row, row_params, acc, BLOCK, ITERS, SAMPLES)


@triton.jit(do_not_specialize=["n", "cell", "row"])
def moments_one(y, n, cell, row, row_params, acc, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                SAMPLES: tl.constexpr):
    """Moments of one tensor, passed directly (no table to copy to the device first)."""
    _moments_of_chunk(y, n.to(tl.int64), tl.program_id(0), cell.to(tl.int64), row, row_params, acc, BLOCK, ITERS,
                      SAMPLES)


@triton.jit(do_not_specialize=[f"{arg}{i}" for arg in "nc" for i in range(ARGS)])
def squares(
    g0, g1, g2, g3, g4, g5, g6, g7,
    n0, n1, n2, n3, n4, n5, n6, n7,
    c0, c1, c2, c3, c4, c5, c6, c7,
    acc, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    """Adds sum(g^2) of up to 8 tensors of one dtype to ``acc + c<t>``, like ``moments``."""
    t = tl.program_id(1)
    base, n, cell = g0, n0.to(tl.int64), c0.to(tl.int64)
    if t == 1:
        base, n, cell = g1, n1.to(tl.int64), c1.to(tl.int64)
    if t == 2:
        base, n, cell = g2, n2.to(tl.int64), c2.to(tl.int64)
    if t == 3:
        base, n, cell = g3, n3.to(tl.int64), c3.to(tl.int64)
    if t == 4:
        base, n, cell = g4, n4.to(tl.int64), c4.to(tl.int64)
    if t == 5:
        base, n, cell = g5, n5.to(tl.int64), c5.to(tl.int64)
    if t == 6:
        base, n, cell = g6, n6.to(tl.int64), c6.to(tl.int64)
    if t == 7:
        base, n, cell = g7, n7.to(tl.int64), c7.to(tl.int64)
    start = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    if start < n:
        s2 = tl.zeros([BLOCK], tl.float32)
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            g = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
            s2 += g * g
        tl.atomic_add(acc + cell, tl.sum(s2, axis=0))


@triton.jit(do_not_specialize=["samples", "per_sample"])
def sample_squares(x, y, out, samples, per_sample, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Per sample s: sum((y - x)^2), sum(x^2), sum(y^2) into out[0, s], out[1, s], out[2, s];
    program (chunk, s) reads one chunk of sample s of both tensors."""
    s = tl.program_id(1)
    n = per_sample.to(tl.int64)
    start = tl.program_id(0).to(tl.int64) * (BLOCK * ITERS)
    if start < n:
        base = s.to(tl.int64) * n
        diff = tl.zeros([BLOCK], tl.float32)
        xx = tl.zeros([BLOCK], tl.float32)
        yy = tl.zeros([BLOCK], tl.float32)
        for i in range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            inside = offs < n
            a = tl.load(x + base + offs, mask=inside, other=0.0).to(tl.float32)
            b = tl.load(y + base + offs, mask=inside, other=0.0).to(tl.float32)
            d = b - a
            diff += d * d
            xx += a * a
            yy += b * b
        tl.atomic_add(out + s, tl.sum(diff, axis=0))
        tl.atomic_add(out + samples + s, tl.sum(xx, axis=0))
        tl.atomic_add(out + 2 * samples + s, tl.sum(yy, axis=0))


@triton.jit(do_not_specialize=["tokens", "dim", "x_b", "x_t", "y_b", "y_t", "samples"])
def block_sums(x, y, squares, sums, tokens, dim, x_b, x_t, y_b, y_t, samples, BLOCK_D: tl.constexpr,
               ROWS: tl.constexpr, TILES: tl.constexpr, PAIR: tl.constexpr):
    """What a block's call needs of its output y [batch, tokens, dim] (and, with PAIR, its input
    x of the same shape), reading each once: program (b, chunk) takes TILES tiles of ROWS tokens
    of sample b and adds sum_t y_t / ||y_t|| to sums[b, :] and, with PAIR, sum((y - x)^2),
    sum(x^2), sum(y^2) to squares[0, b], squares[1, b], squares[2, b]. Token vectors (the last
    dimension) are contiguous; the other strides are arguments (a sequence-first view is fine)."""
    b = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * (ROWS * TILES)
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], tl.float32)
    diff = tl.zeros([ROWS], tl.float32)  # per token row, summed at the end
    xx = tl.zeros([ROWS], tl.float32)
    yy = tl.zeros([ROWS], tl.float32)
    for i in range(TILES):
        t = first + i * ROWS + tl.arange(0, ROWS).to(tl.int64)
        inside = (t[:, None] < tokens) & (cols[None, :] < dim)
        v = tl.load(y + b * y_b + t[:, None] * y_t + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        row_squares = tl.sum(v * v, axis=1)
        acc += tl.sum(v / tl.maximum(tl.sqrt(row_squares), 1e-12)[:, None], axis=0)
        if PAIR:
            u = tl.load(x + b * x_b + t[:, None] * x_t + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            d = v - u
            diff += tl.sum(d * d, axis=1)
            xx += tl.sum(u * u, axis=1)
            yy += row_squares
    tl.atomic_add(sums + b * dim + cols, acc, mask=cols < dim)
    if PAIR:
        tl.atomic_add(squares + b, tl.sum(diff, axis=0))
        tl.atomic_add(squares + samples + b, tl.sum(xx, axis=0))
        tl.atomic_add(squares + 2 * samples + b, tl.sum(yy, axis=0))
