"""Signed model bundles: a bundle verifies only as signed, by the right key, unchanged;
the promotion rule; holdout split and metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from batch.evaluation import metrics
from batch.registry import CHALLENGER, CHAMPION, decide
from batch.train import holdout_split
from lakehouse.bundle import (
    MANIFEST,
    ONNX,
    SIGNATURE,
    WEIGHTS,
    ModelSignatureError,
    load_bundle,
    load_or_create_signing_key,
    load_verify_key,
    public_key_path,
    verify_bundle,
    write_bundle,
)
from lakehouse.model import ScoringModel, predict


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle directory, private key path) of a small signed model."""
    root = tmp_path_factory.mktemp("bundle")
    key_path = root / "keys" / "signing.pem"
    model = ScoringModel(4, (8,))
    model.fit_standardization(np.random.default_rng(0).normal(3.0, 2.0, size=(200, 4)))
    write_bundle(root / "model", model, {"feature_names": ["a", "b", "c", "d"]},
                 load_or_create_signing_key(key_path))
    return root / "model", key_path


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def test_a_signed_bundle_verifies_and_loads(signed: tuple[Path, Path]) -> None:
    bundle, key_path = signed
    assert key_path.stat().st_mode & 0o777 == 0o600
    model, manifest = load_bundle(bundle, load_verify_key(public_key_path(key_path)))
    assert manifest["feature_names"] == ["a", "b", "c", "d"]
    assert set(manifest["files"]) == {WEIGHTS, ONNX}
    assert manifest["onnx_max_abs_diff"] < 1e-5
    scores = predict(model, np.zeros((3, 4)))
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))


@pytest.mark.parametrize("name", [WEIGHTS, ONNX, MANIFEST])
def test_a_changed_byte_fails_verification(signed: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    bundle, key_path = signed
    tampered = copy_of(bundle, tmp_path)
    data = bytearray((tampered / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tampered / name).write_bytes(bytes(data))
    with pytest.raises(ModelSignatureError, match="changed after signing|signature does not match"):
        verify_bundle(tampered, load_verify_key(public_key_path(key_path)))


def test_an_unsigned_bundle_fails(signed: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, key_path = signed
    unsigned = copy_of(bundle, tmp_path)
    (unsigned / SIGNATURE).unlink()
    with pytest.raises(ModelSignatureError, match="unsigned"):
        load_bundle(unsigned, load_verify_key(public_key_path(key_path)))


def test_a_bundle_signed_by_another_key_fails(signed: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, _ = signed
    other = load_or_create_signing_key(tmp_path / "other.pem")
    with pytest.raises(ModelSignatureError, match="signature does not match"):
        verify_bundle(bundle, other.public_key())


def test_a_re_signed_manifest_cannot_hide_an_extra_file(signed: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, key_path = signed
    changed = copy_of(bundle, tmp_path)
    (changed / "backdoor.py").write_text("print('hi')\n")
    with pytest.raises(ModelSignatureError, match="differ from the signed list"):
        verify_bundle(changed, load_verify_key(public_key_path(key_path)))


def test_a_forged_manifest_with_matching_digests_still_needs_the_key(signed: tuple[Path, Path], tmp_path: Path) -> None:
    bundle, key_path = signed
    forged = copy_of(bundle, tmp_path)
    manifest = json.loads((forged / MANIFEST).read_text())
    manifest["metrics"] = {"roc_auc": 1.0}
    (forged / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=2))
    with pytest.raises(ModelSignatureError, match="signature does not match"):
        verify_bundle(forged, load_verify_key(public_key_path(key_path)))


def test_promotion_rule() -> None:
    assert decide(0.91, None).alias == CHAMPION
    assert decide(0.95, 0.94).alias == CHAMPION
    assert decide(0.94, 0.94).alias == CHALLENGER  # a tie does not unseat the champion
    assert decide(0.90, 0.94).alias == CHALLENGER


def test_holdout_is_the_latest_share_by_time() -> None:
    times = np.arange(100)[::-1].copy()
    split = holdout_split(times, 0.2)
    assert split == 80 and int((times >= split).sum()) == 20


def test_metrics_of_perfect_and_useless_scores() -> None:
    y = np.array([0, 0, 0, 1] * 50)
    perfect = metrics(y, y * 0.98 + 0.01)
    assert perfect["roc_auc"] == 1.0 and perfect["pr_auc"] == 1.0 and perfect["log_loss"] < 0.02
    flat = metrics(y, np.full(len(y), 0.25))
    assert flat["roc_auc"] == 0.5 and flat["ece"] == pytest.approx(0.0)
