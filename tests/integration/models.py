"""Signed model versions for integration tests, registered the way training does it (real
MLflow, real signatures), without training: small random models of the spec's width."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lakehouse import registry
from lakehouse.bundle import load_or_create_signing_key
from lakehouse.config import Settings
from lakehouse.fraud import FRAUD_SPEC
from lakehouse.model import ScoringModel, write_bundle

WIDTH = len(FRAUD_SPEC.feature_names)


def random_model(seed: int) -> ScoringModel:
    import torch

    torch.manual_seed(seed)
    model = ScoringModel(WIDTH, (8,))
    model.fit_standardization(np.random.default_rng(seed).normal(1.0, 3.0, size=(100, WIDTH)))
    return model


def publish(settings: Settings, model: ScoringModel, root: Path, *, tamper: bool = False,
            alias: str | None = "champion", spec_fingerprint: str = FRAUD_SPEC.fingerprint(),
            feature_names: list[str] | None = None) -> int:
    """Sign and register a model version the way training does (real MLflow); the manifest
    says it is for FRAUD_SPEC unless `spec_fingerprint`/`feature_names` say otherwise."""
    client = registry.client(settings.mlflow_uri)
    experiment = client.get_experiment_by_name("model-service-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("model-service-tests")
    run_id = client.create_run(experiment_id).info.run_id
    bundle = root / run_id
    names = list(FRAUD_SPEC.feature_names) if feature_names is None else feature_names
    write_bundle(bundle, model, {"feature_names": names,
                                 "lineage": {"spec_fingerprint": spec_fingerprint}},
                 load_or_create_signing_key(settings.signing_key_path))
    if tamper:
        weights = bundle / "model.pt"
        data = bytearray(weights.read_bytes())
        data[-20] ^= 0x01
        weights.write_bytes(bytes(data))
    version = registry.publish_bundle(client, settings.model_name, run_id, bundle, tags={},
                                      description="test", alias=alias)
    client.set_terminated(run_id)
    return int(version.version)


