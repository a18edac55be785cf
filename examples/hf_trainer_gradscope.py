"""Record a Hugging Face Trainer run with gradscope: one callback, no change to the model or the Trainer.

A small GPT-2 built from a config (nothing is downloaded) learns a synthetic token sequence on
the CPU. Run (``pip install gradscope[hf]``):

    python examples/hf_trainer_gradscope.py [--run runs/hf] [--steps 10] [--accumulate 2]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import gradscope
from gradscope.integrations.hf import GradScopeCallback


class Sequences(torch.utils.data.Dataset):
    """Token sequences counting up from a random start: the next token is predictable."""

    def __init__(self, n: int = 256, length: int = 32, vocab: int = 64, seed: int = 0) -> None:
        start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/hf")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--clip", type=float, default=1.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=4, n_head=4))
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
                                     gradient_accumulation_steps=args.accumulate, max_grad_norm=args.clip,
                                     learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                     use_cpu=True, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=training, train_dataset=Sequences(),
                          callbacks=[GradScopeCallback(args.run, overwrite=True)])  # the one line gradscope adds
        trainer.train()

    run = gradscope.load_run(args.run)
    print(run.scalars[["step", "loss", "grad_norm_pre_clip", "grad_norm_post_clip"]].tail().to_string(index=False))
    for finding in gradscope.diagnose([run]):
        print("-", finding)


if __name__ == "__main__":
    main()
