"""Training: the latest published batch run → a signed, registered, evaluated model version.

Steps (`train_model`):
1. build the point-in-time training set of the latest published batch run
   (`batch.training_set`), a Delta table version;
2. split it by event time: the latest `holdout_fraction` of labelled events is the holdout;
3. train `ScoringModel` with Spark's `TorchDistributor` (local mode on a local master, Spark
   barrier tasks on a cluster, GPUs and NCCL when `use_gpu`); each worker reads the training
   rows from the Delta version itself (delta-rs), so nothing large passes through the driver;
4. evaluate on the holdout (ROC AUC, PR AUC, log loss, Brier, calibration error) and draw
   ROC, PR, calibration and loss plots;
5. score the current champion on the same holdout; `promotion.decide` says champion or
   challenger;
6. write the signed bundle (torch weights + ONNX), log parameters, metrics, lineage and
   artifacts to MLflow, register a new version and set its alias.
"""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batch import promotion
from batch.evaluation import metrics, write_plots
from batch.training_set import LABEL, TrainingSet, build_training_set
from lakehouse import registry
from lakehouse.bundle import load_or_create_signing_key, load_verify_key
from lakehouse.config import Settings, options_from_settings, setting_field
from lakehouse.errors import BatchError
from lakehouse.model import ScoringModel, load_bundle, predict, write_bundle
from lakehouse.spec import PlatformSpec
from lakehouse.tables import EVENT_TIME_MS, Lakehouse, latest_run

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


@dataclass(frozen=True)
class TrainOptions:
    """How to train; the defaults of `setting_field`s are those of the settings named."""

    epochs: int = setting_field("train_epochs")
    batch_size: int = 1024
    learning_rate: float = 3e-3
    hidden: tuple[int, ...] = (64, 32)
    holdout_fraction: float = setting_field("train_holdout_fraction")
    max_train_rows: int | None = None  # a random sample of the training rows, for quick runs
    seed: int = 0
    num_processes: int = setting_field("train_num_processes")
    use_gpu: bool = setting_field("train_use_gpu")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TrainOptions:
        """Options for `settings`; an override of None (an option not given) is ignored."""
        return options_from_settings(cls, settings, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class TrainResult:
    model_name: str
    version: int
    alias: str
    reason: str
    metrics: dict[str, float]
    champion_before: dict[str, Any] | None
    mlflow_run_id: str
    batch_run_id: str
    training_set: dict[str, Any]
    split_time_ms: int
    bundle_dir: str
    durations_s: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ the training worker


def read_rows(path: str, version: int, feature_names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features float32 [n, k], labels float32 [n], event time ms [n]) of a training set."""
    from deltalake import DeltaTable

    table = DeltaTable(path, version=version).to_pyarrow_table(
        columns=[*feature_names, LABEL, EVENT_TIME_MS])
    x = np.column_stack([table.column(n).to_numpy().astype(np.float32) for n in feature_names])
    y = table.column(LABEL).to_numpy().astype(np.float32)
    return x, y, table.column(EVENT_TIME_MS).to_numpy()


def train_worker(job: dict[str, Any]) -> dict[str, Any] | None:
    """One TorchDistributor process: read the training rows (event time before the split),
    fit standardization on all of them, train on this rank's shard (DDP when several), and
    return the weights and per-epoch losses from rank 0."""
    import torch
    import torch.distributed as dist
    from torch import nn

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    use_gpu = bool(job["use_gpu"])
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_gpu else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if use_gpu else "gloo")
    x, y, times = read_rows(job["path"], job["version"], job["feature_names"])
    keep = times < job["split_time_ms"]
    x, y = x[keep], y[keep]
    rng = np.random.default_rng(job["seed"])
    if job["max_train_rows"] is not None and len(x) > job["max_train_rows"]:
        sample = np.sort(rng.choice(len(x), job["max_train_rows"], replace=False))
        x, y = x[sample], y[sample]
    torch.manual_seed(job["seed"])
    model = ScoringModel(x.shape[1], job["hidden"])
    model.fit_standardization(x)
    per_rank = len(x) // world  # equal shards: every rank takes the same number of steps
    xs = torch.from_numpy(x[rank::world][:per_rank]).to(device)
    ys = torch.from_numpy(y[rank::world][:per_rank]).to(device)
    model.to(device)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.Adam(net.parameters(), lr=job["learning_rate"])
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(job["seed"] + rank)
    batch, losses, started = job["batch_size"], [], time.monotonic()
    for epoch in range(job["epochs"]):
        net.train()
        order = torch.randperm(per_rank, generator=generator).to(device)
        total = torch.zeros((), device=device)
        for start in range(0, per_rank, batch):
            index = order[start:start + batch]
            loss = loss_fn(net(xs[index]), ys[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(index)
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / (per_rank * world))
        if rank == 0:
            print(f"epoch {epoch + 1}/{job['epochs']}: log loss {losses[-1]:.5f} "
                  f"({time.monotonic() - started:.1f}s, {per_rank * world} rows)", flush=True)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return None
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "losses": losses, "rows": per_rank * world, "positives": int(y.sum())}


def run_distributed(spark: SparkSession, options: TrainOptions, job: dict[str, Any]) -> dict[str, Any]:
    from pyspark.ml.torch.distributor import TorchDistributor

    local = (spark.conf.get("spark.master", "local") or "local").startswith("local")
    distributor = TorchDistributor(num_processes=options.num_processes, local_mode=local,
                                   use_gpu=options.use_gpu)
    with warnings.catch_warnings():
        # pyspark leaves the torchrun pipe for the garbage collector to close
        warnings.simplefilter("ignore", ResourceWarning)
        result = distributor.run(train_worker, job)
        gc.collect()
    if not isinstance(result, dict):
        raise BatchError(f"training returned {type(result).__name__}, not the model weights")
    return result


# --------------------------------------------------------------------------- the job


def holdout_split(times: np.ndarray, fraction: float) -> int:
    """The event time from which rows belong to the holdout: the latest `fraction` of them
    (ties at the split all go to the holdout)."""
    ordered = np.sort(times)
    return int(ordered[min(len(ordered) - 1, int(math.floor(len(ordered) * (1 - fraction))))])


def score_champion(client: Any, settings: Settings, spec: PlatformSpec, x: np.ndarray,
                   y: np.ndarray, echo: Callable[[str], None]) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """The current champion's metrics on this holdout, or None when there is none or its
    inputs differ from this spec's (then it cannot be compared)."""
    version = registry.version_by_alias(client, settings.model_name, registry.CHAMPION)
    if version is None:
        return None, None
    with tempfile.TemporaryDirectory(prefix="lambdalake-champion-") as scratch:
        bundle = registry.download_bundle(client, version, Path(scratch))
        model, manifest = load_bundle(bundle, load_verify_key(settings.verify_key_path))
    if manifest["feature_names"] != list(spec.feature_names):
        echo(f"champion v{version.version} takes other inputs ({manifest['spec_fingerprint']}); "
             "not comparable")
        return None, None
    scores = predict(model, x)
    found = {"version": int(version.version), **metrics(y, scores)}
    echo(f"champion v{version.version} on the same holdout: ROC AUC {found['roc_auc']:.4f}")
    return found, scores


def train_model(
    spark: SparkSession,
    settings: Settings,
    spec: PlatformSpec,
    *,
    lakehouse: Lakehouse | None = None,
    options: TrainOptions | None = None,
    label_cutoff_ms: int | None = None,
    training_set: TrainingSet | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> TrainResult:
    """Train, evaluate, sign, register and promote one model version (see module doc).
    Pass `training_set` to reuse one already built from the latest run."""
    options = options or TrainOptions.from_settings(settings)
    lakehouse = lakehouse or Lakehouse(settings.delta_uri)
    durations: dict[str, float] = {}
    started = time.monotonic()
    run = latest_run(lakehouse)
    if run is None:
        raise BatchError("no published batch run: run `lambdalake batch views` first")
    if training_set is not None and training_set.batch_run_id != run.run_id:
        raise BatchError(f"the training set was built from batch run {training_set.batch_run_id}, "
                         f"but the latest published run is {run.run_id}: rebuild it")
    if training_set is None:
        training_set = build_training_set(spark, lakehouse, spec, run, label_cutoff_ms=label_cutoff_ms,
                                          group=settings.speed_group, echo=echo)
    durations["training_set"] = round(time.monotonic() - started, 3)

    x_all, y_all, times = read_rows(training_set.path, training_set.version, list(spec.feature_names))
    split_ms = holdout_split(times, options.holdout_fraction)
    holdout = times >= split_ms
    x_hold, y_hold = x_all[holdout], y_all[holdout]
    if y_hold.min(initial=1) == y_hold.max(initial=0) or y_all[~holdout].sum() == 0:
        raise BatchError(
            f"cannot train: the training set's {len(y_all)} labelled events hold "
            f"{int(y_all.sum())} positives; both the training rows and the holdout need both labels")
    echo(f"holdout: {int(holdout.sum())} events from {_iso(split_ms)} "
         f"({int(y_hold.sum())} positive); training on the {int((~holdout).sum())} before")
    del x_all, y_all

    job = {"path": training_set.path, "version": training_set.version,
           "feature_names": list(spec.feature_names), "split_time_ms": split_ms,
           **{k: v for k, v in asdict(options).items() if k not in ("holdout_fraction", "num_processes")}}
    echo(f"training with TorchDistributor ({options.num_processes} process(es), "
         f"{'GPU' if options.use_gpu else 'CPU'}, {options.epochs} epochs)")
    phase = time.monotonic()
    trained = run_distributed(spark, options, job)
    durations["train"] = round(time.monotonic() - phase, 3)

    model = ScoringModel(len(spec.feature_names), options.hidden)
    model.load_state_dict(trained["state_dict"])
    scores = predict(model, x_hold)
    found = metrics(y_hold, scores)
    echo(f"holdout: ROC AUC {found['roc_auc']:.4f}, PR AUC {found['pr_auc']:.4f}, "
         f"log loss {found['log_loss']:.4f}, ECE {found['ece']:.4f}")

    client = registry.client(settings.mlflow_uri)
    champion, champion_scores = score_champion(client, settings, spec, x_hold, y_hold, echo)
    decision = promotion.decide(found["roc_auc"], champion["roc_auc"] if champion else None)

    experiment = f"lambdalake-{spec.name}"
    experiment_id = (client.get_experiment_by_name(experiment) or
                     client.get_experiment(client.create_experiment(experiment))).experiment_id
    lineage = {
        "batch_run_id": run.run_id,
        "spec_fingerprint": spec.fingerprint(),
        "boundary": json.dumps({str(p): o for p, o in sorted(run.boundary.items())}),
        "source_versions": json.dumps(run.source_versions, sort_keys=True),
        "training_set_path": training_set.path,
        "training_set_version": str(training_set.version),
        "labels_version": str(training_set.labels_version),
        "label_cutoff": _iso(training_set.label_cutoff_ms) if training_set.label_cutoff_ms else "all arrived",
        "split_time": _iso(split_ms),
    }
    mlrun = client.create_run(experiment_id, run_name=f"train-{run.run_id}",
                              tags={f"lineage.{k}": v for k, v in lineage.items()})
    run_id = mlrun.info.run_id
    work = settings.models_dir / run_id
    try:
        _log_run(client, run_id, options, training_set, trained, found, champion)
        plot_scores = {f"new model (AUC {found['roc_auc']:.3f})": scores}
        if champion is not None and champion_scores is not None:
            plot_scores[f"champion v{champion['version']} (AUC {champion['roc_auc']:.3f})"] = champion_scores
        write_plots(work / "plots", y_hold, plot_scores, trained["losses"])
        client.log_artifacts(run_id, str(work / "plots"), "plots")

        manifest = {"model_name": settings.model_name, "spec": spec.name,
                    "feature_names": list(spec.feature_names), "metrics": found,
                    "mlflow_run_id": run_id, "lineage": lineage,
                    "created_at": datetime.now(UTC).isoformat()}
        phase = time.monotonic()
        write_bundle(work / registry.BUNDLE_ARTIFACT_PATH, model, manifest,
                     load_or_create_signing_key(settings.signing_key_path))
        durations["bundle"] = round(time.monotonic() - phase, 3)
        version = registry.publish_bundle(
            client, settings.model_name, run_id, work / registry.BUNDLE_ARTIFACT_PATH,
            tags={"spec_fingerprint": spec.fingerprint(), "batch_run_id": run.run_id,
                  "roc_auc": f"{found['roc_auc']:.6f}", "promotion": decision.alias},
            description=decision.reason, alias=decision.alias)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    echo(f"registered {settings.model_name} v{version.version} as {decision.alias}: {decision.reason}")
    durations["total"] = round(time.monotonic() - started, 3)
    return TrainResult(
        model_name=settings.model_name, version=int(version.version), alias=decision.alias,
        reason=decision.reason, metrics=found, champion_before=champion, mlflow_run_id=run_id,
        batch_run_id=run.run_id,
        training_set={"path": training_set.path, "version": training_set.version,
                      "rows": training_set.rows, "positives": training_set.positives,
                      "train_rows": trained["rows"]},
        split_time_ms=split_ms, bundle_dir=str(work / registry.BUNDLE_ARTIFACT_PATH),
        durations_s=durations,
    )


def _log_run(client: Any, run_id: str, options: TrainOptions, training_set: TrainingSet,
             trained: dict[str, Any], found: dict[str, float], champion: dict[str, Any] | None) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    params = {**{k: str(v) for k, v in asdict(options).items()},
              "training_rows": str(trained["rows"]), "training_positives": str(trained["positives"]),
              "training_set_rows": str(training_set.rows)}
    values = [Metric(f"holdout_{k}", v, now, 0) for k, v in found.items()]
    values += [Metric("train_log_loss", loss, now, step) for step, loss in enumerate(trained["losses"], 1)]
    if champion:
        values.append(Metric("champion_holdout_roc_auc", champion["roc_auc"], now, 0))
    client.log_batch(run_id, metrics=values, params=[Param(k, v) for k, v in params.items()])


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat()
