"""Signed model bundles: a bundle verifies only as signed, by the right key, unchanged;
the promotion rule; holdout split and metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from batch.evaluation import metrics
from batch.promotion import decide
from batch.train import holdout_split
from lakehouse.bundle import (
    MANIFEST,
    ONNX,
    SIGNATURE,
    WEIGHTS,
    ModelSignatureError,
    ModelSpecError,
    check_bundle_spec,
    load_or_create_signing_key,
    load_verify_key,
    public_key_path,
    verify_bundle,
)
from lakehouse.errors import PlatformError
from lakehouse.model import ScoringModel, load_bundle, predict, write_bundle
from lakehouse.registry import CHALLENGER, CHAMPION, move_alias, publish_bundle


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle directory, private key path) of a small signed model."""
    root = tmp_path_factory.mktemp("bundle")
    key_path = root / "keys" / "signing.pem"
    model = ScoringModel(4, (8,))
    model.fit_standardization(np.random.default_rng(0).normal(3.0, 2.0, size=(200, 4)))
    write_bundle(root / "model", model, {"feature_names": ["a", "b", "c", "d"],
                                         "lineage": {"spec_fingerprint": "f00dfeedf00dfeed"}},
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


# --------------------------------------------------------------- model governance: spec


def test_the_signed_manifest_records_the_spec_fingerprint_and_feature_names(signed: tuple[Path, Path]) -> None:
    bundle, key_path = signed
    manifest = verify_bundle(bundle, load_verify_key(public_key_path(key_path)))
    assert manifest["spec_fingerprint"] == "f00dfeedf00dfeed"  # lifted from the lineage
    assert manifest["feature_names"] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("manifest", [
    {"lineage": {"spec_fingerprint": "f00dfeedf00dfeed"}},  # no feature names
    {"feature_names": ["a", "b", "c", "d"]},  # no spec fingerprint
    {"feature_names": ["a", "b", "c"], "spec_fingerprint": "f00dfeedf00dfeed"},  # not the width
])
def test_a_bundle_without_its_spec_is_not_signed(tmp_path: Path, manifest: dict[str, Any]) -> None:
    model = ScoringModel(4, (8,))
    with pytest.raises(PlatformError, match="spec_fingerprint|feature_names"):
        write_bundle(tmp_path / "model", model, manifest, load_or_create_signing_key(tmp_path / "k.pem"))
    assert not (tmp_path / "model" / SIGNATURE).exists()


RUNNING = {"spec_fingerprint": "f00dfeedf00dfeed", "feature_names": ["a", "b", "c", "d"]}


def test_a_bundle_of_the_running_spec_is_accepted() -> None:
    check_bundle_spec(dict(RUNNING), **RUNNING)
    # bundles signed before the fingerprint was lifted keep it in their lineage only
    check_bundle_spec({"feature_names": ["a", "b", "c", "d"],
                       "lineage": {"spec_fingerprint": "f00dfeedf00dfeed"}}, **RUNNING)


def test_another_spec_fingerprint_is_refused_naming_both() -> None:
    with pytest.raises(ModelSpecError) as refused:
        check_bundle_spec({**RUNNING, "spec_fingerprint": "0123456789abcdef"}, **RUNNING)
    assert "0123456789abcdef" in str(refused.value) and "f00dfeedf00dfeed" in str(refused.value)


@pytest.mark.parametrize("names", [["a", "b", "d", "c"], ["a", "b", "c", "x"], ["a", "b", "c"]])
def test_other_feature_names_are_refused_naming_both(names: list[str]) -> None:
    """Same fingerprint, other inputs (a hand-made or mislabelled bundle): today only the
    width is checked, so a reordered vector of the same width would be scored silently."""
    with pytest.raises(ModelSpecError) as refused:
        check_bundle_spec({**RUNNING, "feature_names": names}, **RUNNING)
    message = str(refused.value)
    assert str(names) in message and str(RUNNING["feature_names"]) in message


def test_a_manifest_without_a_fingerprint_is_refused() -> None:
    with pytest.raises(ModelSpecError, match="no spec fingerprint"):
        check_bundle_spec({"feature_names": RUNNING["feature_names"]}, **RUNNING)


def test_the_model_service_refuses_a_bundle_of_another_spec(signed: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    """What each replica runs on a downloaded bundle: verify, load, check against the spec
    the service runs (its ServiceArgs)."""
    from speed.model_service import ServiceArgs, open_bundle

    bundle, key_path = signed
    pem = public_key_path(key_path).read_text()
    matching = ServiceArgs(tracking_uri="http://x", model_name="m", verify_key_pem=pem, **RUNNING)
    model, manifest = open_bundle(bundle, matching)
    assert manifest["spec_fingerprint"] == "f00dfeedf00dfeed"
    other = ServiceArgs(tracking_uri="http://x", model_name="m", verify_key_pem=pem,
                        spec_fingerprint="0123456789abcdef", feature_names=["a", "b", "c", "d"])
    with pytest.raises(ModelSpecError, match="0123456789abcdef"):
        open_bundle(bundle, other)
    reordered = ServiceArgs(tracking_uri="http://x", model_name="m", verify_key_pem=pem,
                            spec_fingerprint="f00dfeedf00dfeed", feature_names=["d", "c", "b", "a"])
    with pytest.raises(ModelSpecError, match="feature"):
        open_bundle(bundle, reordered)


def test_the_service_runs_the_platform_spec_unless_told_otherwise(tmp_path: Path) -> None:
    import yaml

    from lakehouse.fraud import FRAUD_SPEC
    from speed.model_service import ServiceArgs, serve_config

    args = ServiceArgs(tracking_uri="http://x", model_name="m", verify_key_pem="pem")
    assert args.spec_fingerprint == FRAUD_SPEC.fingerprint()
    assert list(args.feature_names) == list(FRAUD_SPEC.feature_names)
    written = yaml.safe_load(serve_config(args))["applications"][0]["args"]
    assert ServiceArgs(**written) == args  # a Serve config file carries the spec it checks


# -------------------------------------------------------------- model governance: aliases


class FakeRegistry:
    """The part of MlflowClient that aliases use."""

    def __init__(self, aliases: dict[str, int] | None = None) -> None:
        self.aliases = dict(aliases or {})
        self.versions = 0

    def get_model_version_by_alias(self, name: str, alias: str) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

        if alias not in self.aliases:  # as the registry answers
            raise MlflowException(f"alias {alias} not found", error_code=RESOURCE_DOES_NOT_EXIST)
        return SimpleNamespace(name=name, version=str(self.aliases[alias]))

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.aliases[alias] = int(version)

    # what publish_bundle needs besides
    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str) -> None:
        pass

    def create_registered_model(self, name: str, description: str = "") -> None:
        pass

    def get_run(self, run_id: str) -> Any:
        return SimpleNamespace(info=SimpleNamespace(artifact_uri=f"mlflow-artifacts:/{run_id}"))

    def create_model_version(self, name: str, **kwargs: Any) -> Any:
        self.versions += 1
        return SimpleNamespace(name=name, version=str(self.versions))


def audited(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "lambdalake.audit"]


def test_an_alias_move_is_one_audit_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="lambdalake.audit")
    fake = FakeRegistry({CHAMPION: 3})
    move_alias(fake, "fraud", CHAMPION, 5, why="roc_auc 0.95 beats the champion's 0.94",
               who="trainer@host")
    assert fake.aliases[CHAMPION] == 5
    [entry] = audited(caplog)
    assert entry == {"event": "model_alias_moved", "model": "fraud", "alias": CHAMPION, "version": 5,
                     "previous_version": 3, "who": "trainer@host",
                     "why": "roc_auc 0.95 beats the champion's 0.94", "at": entry["at"]}


def test_a_first_alias_has_no_previous_version_and_a_default_who(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="lambdalake.audit")
    move_alias(FakeRegistry(), "fraud", CHALLENGER, 1, why="first")
    [entry] = audited(caplog)
    assert entry["previous_version"] is None and entry["version"] == 1
    assert entry["who"]  # the OS user and host when the caller names nobody


def test_publishing_a_version_audits_its_alias(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="lambdalake.audit")
    fake = FakeRegistry({CHAMPION: 7})
    fake.versions = 7
    publish_bundle(fake, "fraud", "run-1", Path("."), tags={}, description="beats v7", alias=CHAMPION)
    publish_bundle(fake, "fraud", "run-2", Path("."), tags={}, description="no alias", alias=None)
    [entry] = audited(caplog)
    assert (entry["version"], entry["previous_version"], entry["why"]) == (8, 7, "beats v7")
    assert entry["mlflow_run_id"] == "run-1"


def test_every_alias_move_goes_through_the_audited_function() -> None:
    """No module sets an alias behind the audit's back."""
    root = Path(__file__).resolve().parents[2]
    callers = sorted(str(path.relative_to(root)) for folder in ("lakehouse", "batch", "speed", "serving",
                                                                 "infra", "dags")
                     for path in (root / folder).rglob("*.py")
                     if "set_registered_model_alias" in path.read_text())
    assert callers == ["lakehouse/registry.py"]
