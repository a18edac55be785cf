"""Xiong et al. 2020, Theorem 1, on the reference Transformers: at initialisation the last FFN's
weight gradient is independent of depth for Post-LN and shrinks like 1/sqrt(depth) for Pre-LN.

The theorem is about the gradient of one token's loss. A recorded run sees the batch gradient,
a sum over tokens, which also grows as token representations become alike (rank collapse) and
the per-token gradients stop cancelling. This script measures both, with the two causes next to
them (rms of the residual stream, which Pre-LN's final LayerNorm divides by, and token cosine),
so the depth trend can be told apart from collapse.

    python experiments/xiong_depth.py [--depths 3 6 12 24] [--seeds 3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from gradscope.lab.train import build, loss_and_accuracy

MODELS = ("transformer_lm_post", "transformer_lm_pre")
POSITIONS = (5, 15, 25)  # scored tokens whose single-token gradients are averaged


def measure(model_name: str, depth: int, seed: int, batch_size: int = 32) -> dict[str, float]:
    """Last FFN weight gradient at initialisation: per token and for the batch loss."""
    model, task = build(model_name, "dyck", seed=seed, overrides={"depth": depth})
    ids, targets = next(task.batches(batch_size, seed=seed))
    last = model.layers[-1]
    weight = last.ffn.fn[-1].weight
    captured: dict[str, torch.Tensor] = {}
    handle = last.register_forward_hook(lambda m, i, o: captured.__setitem__("stream", o.detach()))
    try:
        logits = model(ids)
    finally:
        handle.remove()
    token_grads = [torch.autograd.grad(F.cross_entropy(logits[b, t], targets[b, t]), weight,
                                       retain_graph=True)[0].norm()
                   for b in range(4) for t in POSITIONS if targets[b, t] >= 0]
    batch_grad = torch.autograd.grad(loss_and_accuracy(logits, targets)[0], weight)[0].norm()
    stream = captured["stream"]
    unit = F.normalize(stream, dim=-1)
    return {"token_grad": torch.stack(token_grads).mean().item(), "batch_grad": batch_grad.item(),
            "stream_rms": stream.pow(2).mean().sqrt().item(),
            "token_cos": (unit @ unit.transpose(1, 2)).mean().item()}


def sweep(depths: tuple[int, ...], seeds: int) -> dict[tuple[str, int], dict[str, float]]:
    """Mean over seeds of ``measure`` for every model and depth."""
    out = {}
    for name in MODELS:
        for depth in depths:
            rows = [measure(name, depth, s) for s in range(seeds)]
            out[name, depth] = {k: sum(r[k] for r in rows) / seeds for k in rows[0]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[3, 6, 12, 24])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = sweep(tuple(args.depths), args.seeds)
    print(f"{'model':22} {'depth':>5} {'per-token grad':>14} {'batch grad':>10} {'stream rms':>10} {'token cos':>9}")
    for (name, depth), r in results.items():
        print(f"{name:22} {depth:5d} {r['token_grad']:14.3f} {r['batch_grad']:10.3f} "
              f"{r['stream_rms']:10.2f} {r['token_cos']:9.3f}")


if __name__ == "__main__":
    main()
