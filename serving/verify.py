"""The exact-merge check (docs/architecture.md, invariant 1), runnable against a live platform.

Reads the events topic itself from the beginning up to the merged views' coverage, keeps
the valid, first-seen events (the spec's validation with each record's Kafka key and
timestamp, deduplicated by (key entity, id) in arrival order within the dedup horizon,
`lakehouse.dedup`, as the batch and speed layers do), recomputes their states per (entity,
bucket) in plain Python (`lakehouse.recompute`, not the monoids' fold that the layers share,
so a bug in that fold cannot hide itself here), and compares every state with
`merged.<view>_states` of a fresh DuckDB snapshot. Any difference is reported; there should
be none, whatever the boundary, the speed layer's lag or the crashes before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lakehouse.config import Settings
from lakehouse.dedup import Dedup
from lakehouse.errors import MergeCheckError, ValidationError
from lakehouse.online import open_store
from lakehouse.recompute import states_by_view
from lakehouse.spec import PlatformSpec
from lakehouse.streams import kafka_client_config, topic_partitions
from lakehouse.tables import BUCKET, Lakehouse
from serving.duck import DuckEngine


def topic_prefix(settings: Settings, topic: str, until: dict[int, int],
                 echo: Callable[[str], None] = lambda line: None) -> list[tuple[int, int, Any]]:
    """(partition, offset, record) of every record at or below `until[partition]`;
    MergeCheckError if some partition is not read that far within 10 minutes."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**kafka_client_config(settings), enable_auto_commit=False,
                             max_poll_records=5000)
    wanted = {p: o for p, o in until.items() if o >= 0}
    partitions = [TopicPartition(topic, p) for p in sorted(wanted)]
    consumer.assign(partitions)
    for tp in partitions:
        consumer.seek_to_beginning(tp)
    out: list[tuple[int, int, Any]] = []
    pending = set(wanted)
    deadline = time.monotonic() + 600
    while pending and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=1000).items():
            for r in records:
                if r.offset <= wanted[tp.partition]:
                    out.append((tp.partition, r.offset, r))
            if records and records[-1].offset >= wanted[tp.partition]:
                pending.discard(tp.partition)
                consumer.pause(tp)
    consumer.close()
    if pending:
        raise MergeCheckError(f"partitions {sorted(pending)} of {topic} were not read up to the coverage")
    echo(f"read {len(out)} records of {topic} up to the coverage")
    return out


def check_exact_merge(settings: Settings, spec: PlatformSpec, *, lakehouse: Lakehouse | None = None,
                      echo: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    lakehouse = lakehouse or Lakehouse(settings.delta_uri)
    engine = DuckEngine(spec, lakehouse, store=open_store(settings, spec, root=lakehouse.root),
                        partitions=max(settings.kafka_partitions, topic_partitions(settings, spec.events.topic)),
                        memory_limit=settings.duckdb_memory_limit)
    snapshot = engine.refresh()
    records = topic_prefix(settings, spec.events.topic, snapshot.coverage, echo)
    records.sort(key=lambda r: (r[0], r[1]))
    rules: dict[int, Dedup] = {}
    events: list[dict[str, Any]] = []
    for partition, _, record in records:
        try:
            event = spec.events.parse(record.value, key=record.key,
                                      arrival_ms=record.timestamp if record.timestamp >= 0 else None)
        except ValidationError:
            continue
        rule = rules.setdefault(partition, Dedup(spec.events.dedup_horizon_ms))
        if rule.judge(spec.events.dedup_key(event), record.timestamp) is not None:
            events.append(event)
    valid = len(events)
    recomputed = states_by_view(spec.views, events, spec.events.time_field)
    views: dict[str, Any] = {}
    for view in spec.views:
        names = list(view.aggregations)
        merged = {
            (r[view.entity], r[BUCKET]): {n: None if r[n] is None else int(r[n]) for n in names}
            for r in engine.query(f"SELECT * FROM merged.{view.name}_states", row_cap=10**9).table.to_pylist()}
        expected = recomputed[view.name]
        differing = [k for k in expected.keys() | merged.keys() if expected.get(k) != merged.get(k)]
        views[view.name] = {"states": len(expected), "mismatches": len(differing),
                            "examples": [str(k) for k in differing[:3]]}
    engine.close()
    ok = all(v["mismatches"] == 0 for v in views.values())
    echo(f"exact merge: {'passed' if ok else 'FAILED'} over {valid} valid events "
         f"({sum(v['states'] for v in views.values())} states)")
    return {"ok": ok, "records": len(records), "valid_events": valid, **snapshot.to_json(), "views": views}
