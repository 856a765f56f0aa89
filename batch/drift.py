"""Feature drift: what the speed layer scores now against what the champion learnt from.

The reference is the champion's training rows: its MLflow run records the training set's
Delta path and version and the holdout split time (lineage tags), and the rows before the
split are what it was fitted on. The current sample is the feature vectors of the events the
speed layer scored in the last `window_hours` (`speed/scored_events`). Per feature:

- PSI (population stability index) over ten bins at the reference's deciles, with a small
  floor on empty bins: sum((cur - ref) * ln(cur / ref)). Above 0.2 is the usual "act" line;
- the two-sample Kolmogorov-Smirnov statistic and its p-value.

Drift is declared when some feature's PSI exceeds the threshold and the window holds enough
events to judge. A PNG per feature (reference and current histograms) goes to the report's
folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from batch.train import read_rows
from lakehouse import registry
from lakehouse.config import Settings
from lakehouse.errors import BatchError
from lakehouse.spec import PlatformSpec
from lakehouse.tables import Lakehouse

BINS = 10
FLOOR = 1e-4  # share given to an empty bin, so the logarithm stays finite


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    psi: float
    ks: float
    ks_pvalue: float


@dataclass(frozen=True)
class DriftReport:
    model_version: int
    reference_rows: int
    current_rows: int
    window_hours: float
    threshold: float
    features: list[FeatureDrift]
    drifted: bool
    reason: str
    plots_dir: str

    @property
    def max_psi(self) -> float:
        return max((f.psi for f in self.features), default=0.0)

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "max_psi": round(self.max_psi, 6)}


def psi(reference: np.ndarray, current: np.ndarray, bins: int = BINS) -> float:
    """Population stability index of `current` against `reference`. Bins are (-inf, e1],
    (e1, e2], ..., (ek, inf) at the reference's deciles, so a constant (or two-valued)
    reference still separates values above it."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="left"), minlength=len(edges) + 1)
    cur = np.bincount(np.searchsorted(edges, current, side="left"), minlength=len(edges) + 1)
    ref_share = np.maximum(ref / max(1, len(reference)), FLOOR)
    cur_share = np.maximum(cur / max(1, len(current)), FLOOR)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def ks(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    result = ks_2samp(reference, current)
    return float(result.statistic), float(result.pvalue)


def champion_reference(settings: Settings, spec: PlatformSpec) -> tuple[int, np.ndarray]:
    """(champion version, its training rows' features) from the registry's lineage."""
    client = registry.client(settings.mlflow_uri)
    version = registry.version_by_alias(client, settings.model_name, registry.CHAMPION)
    if version is None:
        raise BatchError(f"model {settings.model_name!r} has no champion: train one first")
    tags = client.get_run(version.run_id).data.tags
    try:
        path, table_version = tags["lineage.training_set_path"], int(tags["lineage.training_set_version"])
        split = datetime.fromisoformat(tags["lineage.split_time"])
    except KeyError as missing:
        raise BatchError(f"champion v{version.version} has no lineage tag {missing}: it was not "
                         "trained by `lambdalake batch train`") from None
    x, _, times = read_rows(path, table_version, list(spec.feature_names))
    return int(version.version), x[times < split.timestamp() * 1000]


def recent_features(lakehouse: Lakehouse, spec: PlatformSpec, *, since: datetime) -> np.ndarray:
    """Feature vectors of the events scored at or after `since`."""
    from deltalake import DeltaTable

    path = lakehouse.scored_events
    width = len(spec.feature_names)
    if not DeltaTable.is_deltatable(path):
        return np.empty((0, width))
    table = DeltaTable(path).to_pyarrow_table(columns=["features"], filters=[("scored_at", ">=", since)])
    if table.num_rows == 0:
        return np.empty((0, width))
    flat: np.ndarray = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(table.num_rows, width)


def write_plots(folder: Path, names: tuple[str, ...], reference: np.ndarray, current: np.ndarray,
                found: list[FeatureDrift]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, drift) in enumerate(zip(names, found, strict=True)):
        figure, axes = plt.subplots(figsize=(5, 3.2))
        both = np.concatenate([reference[:, i], current[:, i]])
        edges = np.histogram_bin_edges(both, bins=40).tolist()
        axes.hist(reference[:, i], bins=edges, density=True, alpha=0.5, label="champion's training rows")
        axes.hist(current[:, i], bins=edges, density=True, alpha=0.5, label="scored in the window")
        axes.set_title(f"{name}: PSI {drift.psi:.3f}, KS {drift.ks:.3f}", fontsize=9)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(folder / f"{name}.png", dpi=80)
        plt.close(figure)


def detect_drift(settings: Settings, spec: PlatformSpec, *, lakehouse: Lakehouse | None = None,
                 now: datetime | None = None) -> DriftReport:
    """Compare the last `drift_window_hours` of scored events with the champion's training
    rows; write the plots and a JSON report under <state_dir>/drift/<time>/."""
    lakehouse = lakehouse or Lakehouse(settings.delta_uri)
    now = now or datetime.now(UTC)
    version, reference = champion_reference(settings, spec)
    current = recent_features(lakehouse, spec, since=now - timedelta(hours=settings.drift_window_hours))
    folder = settings.state_path / "drift" / now.strftime("%Y%m%dT%H%M%S")
    found: list[FeatureDrift] = []
    if len(current) and len(reference):
        for i, name in enumerate(spec.feature_names):
            statistic, pvalue = ks(reference[:, i], current[:, i])
            found.append(FeatureDrift(name, round(psi(reference[:, i], current[:, i]), 6),
                                      round(statistic, 6), pvalue))
        write_plots(folder, spec.feature_names, reference, current, found)
    worst = max(found, key=lambda f: f.psi, default=None)
    if len(current) < settings.drift_min_events:
        drifted, reason = False, (f"only {len(current)} events scored in the last "
                                  f"{settings.drift_window_hours:g} h (< {settings.drift_min_events}): "
                                  "too few to judge")
    elif worst is not None and worst.psi > settings.drift_psi_threshold:
        drifted, reason = True, f"{worst.name} PSI {worst.psi:.3f} > {settings.drift_psi_threshold}"
    else:
        drifted, reason = False, (f"largest PSI {worst.psi if worst else 0:.3f} "
                                  f"≤ {settings.drift_psi_threshold}")
    report = DriftReport(version, len(reference), len(current), settings.drift_window_hours,
                         settings.drift_psi_threshold, found, drifted, reason, str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report.summary(), indent=2, default=_finite))
    return report


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)
