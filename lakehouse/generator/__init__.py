"""Synthetic card transactions and chargeback labels for the shipped fraud example.

`generate(options)` is a pure, deterministic simulation: it yields the messages that
`lambdalake generate` sends to Kafka, in send order, each carrying its ground truth.
`produce(...)` is the thin sink that sends them with kafka-python; `TruthWriter` /
`write_truth(...)` keep the ground truth as Parquet so that later tests can judge a trained
model against the Bayes-optimal score and prove that no message was lost.

One module per job:
- `lakehouse.generator.simulation`: the synthetic world and its events (`GeneratorOptions`,
  `Message`, `generate`, the true fraud model `fraud_probability`);
- `lakehouse.generator.ground_truth`: the ground-truth Parquet file (`TRUTH_SCHEMA`,
  `TruthWriter`, `write_truth`);
- `lakehouse.generator.kafka_sink`: the paced Kafka sink (`produce`, `generate_and_produce`).

Data contracts
--------------
Messages (`Message`), in send order:
- topic `events` (`fraud.TRANSACTIONS.topic`): exactly `options.events` messages, keyed by
  user_id (UTF-8). Kinds:
  * ``valid``: a transaction that `TRANSACTIONS.parse` accepts; sent at its event time.
  * ``late``: a valid transaction sent between `late_min_ms` and `late_max_ms` after its
    event time (other events of the same user may have been sent in between).
  * ``duplicate``: a byte-identical re-send (same key, same value) of an earlier
    valid/late message.
  * ``malformed:<rule>``: a message that `TRANSACTIONS.parse` rejects with exactly one
    reason, whose rule (the text before the first ``:`` of the reason) is `<rule>`, one of
    `MALFORMED_KINDS`; the kinds are used in turn.
- topic `labels` (`fraud.CHARGEBACK_LABELS.topic`), kind ``label``: exactly one per
  valid/late transaction, keyed by user_id, sent at its label_time in simulated time
  (interleaved with the transactions; those due after the last transaction follow it).
  label_time is `label_delay_min_ms`..`label_delay_max_ms` (1-48 h) after the event time,
  log-uniform, and always after the transaction was sent (a late one's label waits for
  it). Malformed and duplicate messages get no label of their own.

Simulated time: the clock starts at `start_ms` and advances by exponential gaps (mean
`GeneratorOptions.gap_ms`), by at least 1 ms per transaction; send times (`sent_ms`) never
decrease along the stream. No wall clock and no global random state is read: the same
options (seed included) give byte-identical messages in the same order. Event ids are
``tx-<seed>-<n>``, so runs with different seeds never share one.

Ground truth (`Message` fields, and one Parquet row per `events` message, `TRUTH_SCHEMA`):
seq (send position over both topics, from 0), sent_ms (simulated send time), kind,
event_id (None when the message carries no usable one), user_id, event_time_ms (the
simulated time the transaction was made for; for duplicates the original's), label_time_ms,
p_true (NaN unless valid/late), is_fraud (None unless valid/late), compromised (the hidden
state that generated the transaction: a compromised card; False unless valid/late).

The fraud model
---------------
Hidden causes shape the data: compromised cards make bursts of 3-10 transactions within a
few minutes, mostly online, at risky merchants (risky categories and a few risky merchant
ids), for amounts several times the card holder's usual; single card-not-present frauds
look alike without the burst. Legit noise: occasional legit big purchases, legit purchases
in risky categories, busy users.

The label, however, is drawn as Bernoulli(p_true), and p_true = `fraud_probability` of the
model inputs `fraud.MODEL_INPUTS` of the transaction, computed point-in-time from the
user's earlier valid transactions by event time (the features the platform computes). So
p_true is exactly P(fraud | model inputs), the Bayes-optimal score: a model that learns it
reaches the Bayes AUC, and nothing it cannot observe (merchant ids, the hidden state) moves
the label.
"""

from lakehouse.generator.ground_truth import TRUTH_SCHEMA, TruthWriter, write_truth
from lakehouse.generator.kafka_sink import GenerateSummary, Producer, generate_and_produce, produce
from lakehouse.generator.simulation import (
    DEFAULT_START_MS,
    DEFAULT_USER_MEAN_GAP_MS,
    EVENTS_TOPIC,
    HOUR_MS,
    KIND_DUPLICATE,
    KIND_LABEL,
    KIND_LATE,
    KIND_VALID,
    LABELS_TOPIC,
    MALFORMED_KINDS,
    MALFORMED_PREFIX,
    MINUTE_MS,
    TRUE_FRAUD_MODEL,
    FraudModel,
    GeneratorOptions,
    Message,
    fraud_probability,
    generate,
)

__all__ = [
    "DEFAULT_START_MS",
    "DEFAULT_USER_MEAN_GAP_MS",
    "EVENTS_TOPIC",
    "HOUR_MS",
    "KIND_DUPLICATE",
    "KIND_LABEL",
    "KIND_LATE",
    "KIND_VALID",
    "LABELS_TOPIC",
    "MALFORMED_KINDS",
    "MALFORMED_PREFIX",
    "MINUTE_MS",
    "TRUE_FRAUD_MODEL",
    "TRUTH_SCHEMA",
    "FraudModel",
    "GenerateSummary",
    "GeneratorOptions",
    "Message",
    "Producer",
    "TruthWriter",
    "fraud_probability",
    "generate",
    "generate_and_produce",
    "produce",
    "write_truth",
]
