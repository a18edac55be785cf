"""Identity closeness of a block call on the device: per-sample terms and token cosines.

What a block's input x and output y [batch, ...] contribute to ``id_rel_residual``, ``id_cos``
and ``token_cos`` (docs/design.md, "Metrics"). The per-call parts (``sample_squares``,
``token_direction_sums``) run in the block's hook; the rest (``identity_terms``,
``token_direction_norms``, ``token_cosines``) once per step for every block, launches being
what a GPU step pays for. On a GPU with Triton, ``recording.kernels.block_sums`` does a call's
parts in one launch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradscope.recording.moments import Scratch


def sample_squares(x: Tensor, y: Tensor, scratch: Scratch | None = None) -> Tensor:
    """[3, samples] float32: ||y_i - x_i||^2, ||x_i||^2 and ||y_i||^2 for each sample (leading dim).

    ``y - x`` is formed explicitly, so an exact identity gives exactly 0. On CUDA the three
    reductions are one kernel over a stacked copy (launches cost more than bytes there; with
    Triton, ``kernels.sample_squares`` reads x and y once instead); on the CPU three separate
    reductions avoid the copy, and ``y - x`` goes into ``scratch`` if given.
    """
    n = x.shape[0] if x.dim() > 0 else 1
    x2, y2 = x.reshape(n, -1), y.reshape(n, -1)
    if x2.dtype != torch.float32 or y2.dtype != torch.float32:
        x2, y2 = x2.float(), y2.float()
    if x2.is_cuda:
        return torch.linalg.vector_norm(torch.stack([y2 - x2, x2, y2]), dim=-1).square_()
    diff = y2 - x2 if scratch is None else torch.sub(y2, x2, out=scratch.take(y2.numel(), y2).view(y2.shape))
    return torch.stack([torch.linalg.vector_norm(diff, dim=1), torch.linalg.vector_norm(x2, dim=1),
                        torch.linalg.vector_norm(y2, dim=1)]).square_()


def identity_terms(squares: Tensor) -> Tensor:
    """[samples, 3] float32 from ``sample_squares`` (of any number of blocks, concatenated):
    ||y - x||^2, ||x||^2 and cos(x, y) per sample, to be summed into the block buffer.

    The cosine needs no extra pass: x.y = (|x|^2 + |y|^2 - |y - x|^2) / 2.
    """
    sq = squares
    cos = (sq[1] + sq[2] - sq[0]) / (2 * sq[1].sqrt() * sq[2].sqrt()).clamp_min(1e-30)
    return torch.stack([sq[0], sq[1], cos.clamp(-1, 1)], dim=1)


def token_direction_sums(y: Tensor) -> Tensor:
    """[batch, dim] float32 sum_i u_i for ``y`` [batch, tokens, dim], with u_i the tokens' unit
    vectors: the part of ``token_cosines`` that needs ``y``.

    sum_i u_i is a weighted sum of the rows of ``y`` (weights 1/||y_i||), one batched matmul,
    so no normalised copy of ``y`` is made. Four kernels per call (on a GPU with Triton one, which
    gives ``sample_squares`` too: ``kernels.block_sums``); the norms and the rest of the formula
    run once per step for every block (``token_direction_norms``, ``token_cosines``), launches
    being what a GPU step pays for.
    """
    yf = y if y.dtype == torch.float32 else y.float()
    inverse = torch.linalg.vector_norm(yf, dim=-1).clamp_min_(1e-12).reciprocal_()  # [batch, tokens]
    # under autocast bmm would round to bfloat16/float16 (and hand the buffer a narrower dtype)
    with torch.autocast(y.device.type, enabled=False):
        return torch.bmm(inverse.unsqueeze(1), yf).squeeze(1)


def token_direction_norms(sums: list[Tensor]) -> Tensor:
    """||sum_i u_i|| of every sample of several ``token_direction_sums`` results, concatenated
    (one kernel for all when they share a width)."""
    if len({z.shape[-1] for z in sums}) == 1:
        return torch.linalg.vector_norm(torch.cat(sums) if len(sums) > 1 else sums[0], dim=-1)
    return torch.cat([torch.linalg.vector_norm(z, dim=-1) for z in sums])


def token_cosines(norms: Tensor, tokens: float | Tensor) -> Tensor:
    """Mean pairwise cosine between the tokens of each sample, from ``token_direction_norms``.

    With unit vectors u_i, the mean over pairs i != j of u_i . u_j is
    (||sum_i u_i||^2 - T) / (T (T - 1)); near 1 means the tokens collapsed to one direction.
    ``tokens`` is T, a number or a tensor with one per sample.
    """
    return (norms.square() - tokens) / (tokens * (tokens - 1))
