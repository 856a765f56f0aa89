"""Signed model bundles: what the registry stores and every scorer loads.

A bundle is a directory:

    model.pt         torch state dict of `ScoringModel` (loaded with weights_only=True)
    model.onnx       the same model exported to ONNX (raw inputs → probability)
    manifest.json    spec fingerprint, feature names, architecture, metrics, lineage and
                     the SHA-256 of every file above (a bundle without its spec fingerprint
                     and feature names is not signed)
    signature.json   Ed25519 signature over the exact bytes of manifest.json, with key id

`verify_bundle` checks the signature with the public key and then every file's digest, so a
changed byte anywhere, a missing signature or a signature by another key fails with
`ModelSignatureError` before anything is deserialized; `check_bundle_spec` then refuses a
bundle made for another spec than the scorer's (`ModelSpecError`, naming both). The
private key signs (training
only); scorers need just the public key. Keys are PEM files named by config
(`LAMBDALAKE_MODEL_SIGNING_KEY`, `LAMBDALAKE_MODEL_VERIFY_KEY`); a local platform creates a
key pair under `<state_dir>/secrets` on first use.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lakehouse.errors import PlatformError
from lakehouse.secret_files import create_secret, read_secret

FORMAT_VERSION = 1
WEIGHTS, ONNX, MANIFEST, SIGNATURE = "model.pt", "model.onnx", "manifest.json", "signature.json"
ALGORITHM = "ed25519"


class ModelSignatureError(PlatformError):
    """A model bundle is unsigned, signed by another key, or was changed after signing."""


class ModelSpecError(PlatformError):
    """A model bundle was made for another spec (fingerprint or feature names) than the
    one its scorer runs."""


# ----------------------------------------------------------------------------------- keys


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in `path` (PEM); created with mode 0600 if missing, with its
    public key beside it (`<name>.pub`). An existing key that group or others can read is
    refused (ConfigError with the `chmod` that fixes it)."""
    if path.exists():
        key = serialization.load_pem_private_key(read_secret(path), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ModelSignatureError(f"{path} holds a {type(key).__name__}, not an Ed25519 "
                                      "private key: point LAMBDALAKE_MODEL_SIGNING_KEY at one")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    create_secret(path, pem)
    public_key_path(path).write_bytes(public_pem(key.public_key()))  # public: no secret
    return key


def public_key_path(private_key: Path) -> Path:
    return private_key.with_name(private_key.name + ".pub")


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_verify_key(path: Path) -> Ed25519PublicKey:
    if not path.exists():
        raise ModelSignatureError(
            f"no model verification key at {path}: set LAMBDALAKE_MODEL_VERIFY_KEY to the "
            "public key that signs models (training creates one on a local platform)")
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ModelSignatureError(f"{path} is not an Ed25519 public key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(public_pem(key)).hexdigest()[:16]


# -------------------------------------------------------------------------------- bundles


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def spec_fingerprint_of(manifest: Mapping[str, Any]) -> str | None:
    """The spec fingerprint a manifest records: its own, or (bundles signed before it was
    recorded at the top) its lineage's."""
    found = manifest.get("spec_fingerprint") or (manifest.get("lineage") or {}).get("spec_fingerprint")
    return str(found) if found else None


def check_bundle_spec(manifest: Mapping[str, Any], *, spec_fingerprint: str,
                      feature_names: Sequence[str]) -> None:
    """Refuse a bundle whose spec fingerprint or feature names differ from the running
    spec's (ModelSpecError naming both values). The same width is not enough: a vector of
    other or reordered features would be scored without an error."""
    name = f"model {manifest['model_name']}" if manifest.get("model_name") else "the model bundle"
    found = spec_fingerprint_of(manifest)
    if found is None:
        raise ModelSpecError(f"{name} records no spec fingerprint: it cannot be checked against "
                             f"the running spec {spec_fingerprint}; retrain it")
    if found != spec_fingerprint:
        raise ModelSpecError(f"{name} was made for spec {found}, but this service runs spec "
                             f"{spec_fingerprint}: retrain on the running spec, or serve a version "
                             "made for it")
    theirs, ours = list(manifest.get("feature_names") or []), list(feature_names)
    if theirs != ours:
        at = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b),
                  min(len(theirs), len(ours)))
        raise ModelSpecError(f"{name} takes features {theirs}, but the running spec {spec_fingerprint} "
                             f"computes {ours} (first difference at position {at}): retrain on the "
                             "running spec")


def sign_bundle(directory: Path, manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Write manifest.json (with the digest of every file already in `directory`) and
    signature.json; return the manifest as written. The manifest must say which spec the
    model is for: `feature_names` and `spec_fingerprint` (or `lineage.spec_fingerprint`,
    which is then recorded at the top too)."""
    fingerprint = spec_fingerprint_of(manifest)
    if fingerprint is None or not manifest.get("feature_names"):
        raise PlatformError(f"model bundle {directory}: the manifest needs the spec_fingerprint "
                            "and the feature_names of the spec the model is for; not signed")
    files = {p.name: file_digest(p) for p in sorted(directory.iterdir())
             if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}
    full = {**manifest, "spec_fingerprint": fingerprint,
            "feature_names": list(manifest["feature_names"]), "format": FORMAT_VERSION, "files": files}
    body = json.dumps(full, sort_keys=True, indent=2).encode()
    (directory / MANIFEST).write_bytes(body)
    signature = {"algorithm": ALGORITHM, "key_id": key_id(key.public_key()),
                 "signature": base64.b64encode(key.sign(body)).decode()}
    (directory / SIGNATURE).write_text(json.dumps(signature, indent=2))
    return full


def verify_bundle(directory: Path, key: Ed25519PublicKey) -> dict[str, Any]:
    """The manifest of a bundle whose signature and file digests check out; otherwise
    ModelSignatureError saying what is wrong."""
    manifest_path, signature_path = directory / MANIFEST, directory / SIGNATURE
    if not manifest_path.exists():
        raise ModelSignatureError(f"{directory} is not a model bundle: no {MANIFEST}")
    if not signature_path.exists():
        raise ModelSignatureError(f"model bundle {directory} is unsigned: no {SIGNATURE}")
    body = manifest_path.read_bytes()
    try:
        signature = json.loads(signature_path.read_text())
        raw = base64.b64decode(signature["signature"], validate=True)
        algorithm = signature["algorithm"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelSignatureError(f"{signature_path} is unreadable: {exc}") from None
    if algorithm != ALGORITHM:
        raise ModelSignatureError(f"{signature_path}: algorithm {algorithm!r}, expected {ALGORITHM}")
    try:
        key.verify(raw, body)
    except InvalidSignature:
        raise ModelSignatureError(
            f"model bundle {directory}: the signature does not match the manifest "
            f"(signed by key {signature.get('key_id')!r}, verifying with {key_id(key)!r})"
        ) from None
    manifest: dict[str, Any] = json.loads(body)
    expected = manifest.get("files", {})
    present = {p.name for p in directory.iterdir() if p.is_file()} - {MANIFEST, SIGNATURE}
    if present != set(expected):
        raise ModelSignatureError(f"model bundle {directory}: files {sorted(present)} differ "
                                  f"from the signed list {sorted(expected)}")
    for name, digest in expected.items():
        if file_digest(directory / name) != digest:
            raise ModelSignatureError(f"model bundle {directory}: {name} was changed after signing")
    return manifest
