"""The scoring model: a small torch MLP over the spec's model inputs.

Inputs are standardized inside the model (mean and scale are buffers fitted on the training
rows), so every caller feeds the raw model input vector `PlatformSpec.features` returns, and
the exported ONNX graph and the torch weights behave identically. `forward` returns logits;
`probability` the fraud probability.

`write_bundle` saves a model as a signed bundle (weights, its ONNX export checked against
torch, manifest) and `load_bundle` loads one after verifying it; the signing and the
manifest's checks are `lakehouse.bundle`'s, which needs no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn

from lakehouse.bundle import ONNX, WEIGHTS, sign_bundle, spec_fingerprint_of, verify_bundle
from lakehouse.errors import PlatformError


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


def load_bundle(directory: Path, key: Ed25519PublicKey) -> tuple[Any, dict[str, Any]]:
    """(ScoringModel in eval mode, manifest) of a verified bundle."""
    manifest = verify_bundle(directory, key)
    model = ScoringModel(len(manifest["feature_names"]), manifest["hidden"])
    model.load_state_dict(torch.load(directory / WEIGHTS, weights_only=True))
    model.eval()
    return model, manifest


def write_bundle(directory: Path, model: Any, manifest: Mapping[str, Any],
                 key: Ed25519PrivateKey) -> dict[str, Any]:
    """Save weights and the ONNX export of `model`, check the export against torch on random
    inputs, and sign. Returns the signed manifest."""
    import onnxruntime

    names = list(manifest.get("feature_names") or [])
    if spec_fingerprint_of(manifest) is None or len(names) != model.n_inputs:
        raise PlatformError(f"model bundle {directory}: the manifest needs the spec_fingerprint and "
                            f"the {model.n_inputs} feature_names of the model's inputs (got "
                            f"{len(names)}); not written")
    directory.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.save(model.state_dict(), directory / WEIGHTS)
    example = torch.zeros(2, model.n_inputs)
    # the exporter logs a warning per torchvision op it cannot register; we use none
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    program = torch.onnx.export(
        ProbabilityHead(model).eval(), (example,), input_names=["features"],
        output_names=["probability"], dynamic_shapes=({0: torch.export.Dim("rows")},),
        dynamo=True, external_data=False, verbose=False)
    assert program is not None, "torch.onnx.export(dynamo=True) returns the program"
    program.save(str(directory / ONNX))
    # the export must score like the weights it came from
    probe = (model.mean + model.scale * torch.randn(256, model.n_inputs)).numpy()
    session = onnxruntime.InferenceSession(str(directory / ONNX), providers=["CPUExecutionProvider"])
    exported = session.run(["probability"], {"features": probe.astype(np.float32)})[0]
    gap = float(np.max(np.abs(exported - predict(model, probe))))
    if gap > 1e-5:
        raise PlatformError(f"the ONNX export differs from the torch model by {gap:g}")
    return sign_bundle(directory, {**manifest, "hidden": list(model.hidden),
                                   "onnx_max_abs_diff": gap}, key)
