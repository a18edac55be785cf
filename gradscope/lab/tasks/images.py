"""Synthetic CIFAR-shaped image classification: 32x32x3, 10 classes, made locally.

Each class is a fixed random texture of a few coloured sinusoidal gratings. A sample is its
class texture, randomly shifted and scaled, plus a weaker texture of another class as a
distractor and Gaussian noise. A convolutional net learns it well within a few hundred steps,
but not at once: shifts need translation-invariant features, and distractors plus noise keep a
linear read-out of the pixels from solving it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradscope.lab.tasks.base import Task


def _class_textures(classes: int, size: int, g: torch.Generator, gratings: int = 4) -> Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    textures = torch.zeros(classes, 3, size, size)
    for c in range(classes):
        for _ in range(gratings):
            angle = torch.rand(1, generator=g).item() * math.pi
            cycles = 1 + torch.rand(1, generator=g).item() * 3  # 1 to 4 cycles across the image
            phase = torch.rand(1, generator=g).item() * 2 * math.pi
            colour = torch.randn(3, generator=g)
            wave = torch.sin(2 * math.pi * cycles * (xx * math.cos(angle) + yy * math.sin(angle)) / size + phase)
            textures[c] += colour[:, None, None] * wave
    return textures / textures.std()


def _samples(textures: Tensor, n: int, g: torch.Generator, noise: float, max_shift: int) -> tuple[Tensor, Tensor]:
    classes = textures.shape[0]
    labels = torch.randint(0, classes, (n,), generator=g)
    distractors = (labels + torch.randint(1, classes, (n,), generator=g)) % classes
    scale = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    weight = 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    images = scale * textures[labels] + weight * textures[distractors]
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g)
    for i in range(n):  # per-sample translation (wraps around)
        images[i] = torch.roll(images[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
    images += noise * torch.randn(images.shape, generator=g)
    return images, labels


def synthetic_images(train_size: int = 5000, test_size: int = 1000, classes: int = 10, size: int = 32,
                     noise: float = 1.0, max_shift: int = 8, seed: int = 0) -> Task:
    """The built-in image task (see the module docstring); the seed fixes textures and samples."""
    g = torch.Generator().manual_seed(seed)
    textures = _class_textures(classes, size, g)
    x_train, y_train = _samples(textures, train_size, g, noise, max_shift)
    x_test, y_test = _samples(textures, test_size, g, noise, max_shift)
    return Task(
        name="images", input_kind="image",
        train_inputs=x_train, train_targets=y_train, test_inputs=x_test, test_targets=y_test,
        model_overrides={"num_classes": classes, "in_channels": 3, "input_size": size},
        description=f"synthetic CIFAR-shaped images: {classes} textures, shifted, mixed, noisy",
    )
