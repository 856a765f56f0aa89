"""The scoring model: a small torch MLP over the spec's model inputs.

Inputs are standardized inside the model (mean and scale are buffers fitted on the training
rows), so every caller feeds the raw model input vector `PlatformSpec.features` returns, and
the exported ONNX graph and the torch weights behave identically. `forward` returns logits;
`probability` the fraud probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class ScoringModel(nn.Module):
    mean: torch.Tensor  # buffers (register_buffer): the input standardization
    scale: torch.Tensor

    def __init__(self, n_inputs: int, hidden: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        self.n_inputs = n_inputs
        self.hidden = tuple(hidden)
        self.register_buffer("mean", torch.zeros(n_inputs))
        self.register_buffer("scale", torch.ones(n_inputs))
        layers: list[nn.Module] = []
        width = n_inputs
        for size in self.hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.body = nn.Sequential(*layers)

    def fit_standardization(self, x: np.ndarray) -> None:
        """Set the input mean and scale from training rows (constant columns get scale 1)."""
        std = x.std(axis=0)
        self.mean.copy_(torch.as_tensor(x.mean(axis=0), dtype=torch.float32))
        self.scale.copy_(torch.as_tensor(np.where(std > 0, std, 1.0), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.body((x - self.mean) / self.scale)
        return logits.squeeze(-1)

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))


class ProbabilityHead(nn.Module):
    """The model as exported: raw inputs in, probabilities out."""

    def __init__(self, model: ScoringModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.probability(features)


@torch.no_grad()
def predict(model: ScoringModel, x: np.ndarray, batch_size: int = 65_536) -> np.ndarray:
    """Probabilities for rows of raw model inputs (float64 or float32)."""
    model.eval()
    out = [model.probability(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32)).numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
