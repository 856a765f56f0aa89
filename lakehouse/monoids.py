"""Commutative monoids: the one way lambdalake writes an aggregation.

Each aggregation lifts one event to a state and adds states with an associative,
commutative `plus` that has an identity (`zero`). Batch views, speed increments and
merged views are all built from these states, so merge(batch, speed) equals a full
recomputation whatever the split point or order (Summingbird's lesson, see docs/architecture.md).

States are exact: integers (Python ints are unbounded; the batch layer stores them as
DECIMAL(38,0)/BIGINT) or (time, value) pairs. Money enters as integer cents, never floats,
so sums do not depend on the order of addition. Derived features (means, deviations) are
computed from states at read time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

State = Any


@dataclass(frozen=True)
class Aggregation(ABC):
    """One monoid over one (optional) numeric field of an event."""

    field: str | None = None
    kind: ClassVar[str]
    spark_type: ClassVar[str] = "bigint"  # SQL type of the state column
    sql_plus: ClassVar[str] = "SUM"  # the SQL aggregate that adds states (serving's merge)

    @property
    def zero(self) -> State:
        return 0

    @abstractmethod
    def lift(self, event: Mapping[str, Any]) -> State:
        """The state of a single event."""

    @abstractmethod
    def plus(self, left: State, right: State) -> State:
        """Associative, commutative; `plus(zero, s) == s`."""

    @abstractmethod
    def spark_aggregate(self) -> Any:
        """The same monoid as a Spark aggregate expression over a DataFrame of events."""

    def sql_lift(self, quote: Callable[[str], str]) -> str:
        """`lift` as a SQL expression over a relation of typed events (any engine)."""
        return quote(str(self.field))

    def sum(self, states: Iterable[State]) -> State:
        total = self.zero
        for state in states:
            total = self.plus(total, state)
        return total

    def _value(self, event: Mapping[str, Any]) -> int:
        assert self.field is not None, f"{self.kind} needs a field"
        return int(event[self.field])


@dataclass(frozen=True)
class Count(Aggregation):
    """Number of events."""

    kind: ClassVar[str] = "count"

    def lift(self, event: Mapping[str, Any]) -> int:
        return 1

    def sql_lift(self, quote: Callable[[str], str]) -> str:
        return "1"

    def plus(self, left: int, right: int) -> int:
        return left + right

    def spark_aggregate(self) -> Any:
        from pyspark.sql import functions as F

        return F.count(F.lit(1)).cast("bigint")


@dataclass(frozen=True)
class Sum(Aggregation):
    """Sum of an integer field (e.g. amount in cents)."""

    kind: ClassVar[str] = "sum"

    def lift(self, event: Mapping[str, Any]) -> int:
        return self._value(event)

    def plus(self, left: int, right: int) -> int:
        return left + right

    def spark_aggregate(self) -> Any:
        from pyspark.sql import functions as F

        return F.sum(F.col(str(self.field)).cast("bigint")).cast("bigint")


@dataclass(frozen=True)
class SumOfSquares(Aggregation):
    """Sum of the squares of an integer field, for exact variances."""

    kind: ClassVar[str] = "sum_sq"
    spark_type: ClassVar[str] = "decimal(38,0)"

    def lift(self, event: Mapping[str, Any]) -> int:
        value = self._value(event)
        return value * value

    def sql_lift(self, quote: Callable[[str], str]) -> str:
        value = f"CAST({quote(str(self.field))} AS DECIMAL(38,0))"
        return f"{value} * {value}"

    def plus(self, left: int, right: int) -> int:
        return left + right

    def spark_aggregate(self) -> Any:
        from pyspark.sql import functions as F

        value = F.col(str(self.field)).cast("decimal(38,0)")
        return F.sum(value * value).cast("decimal(38,0)")  # exact beyond 64 bits


@dataclass(frozen=True)
class Max(Aggregation):
    """Largest value of an integer field; None is the identity."""

    kind: ClassVar[str] = "max"
    sql_plus: ClassVar[str] = "MAX"

    @property
    def zero(self) -> None:
        return None

    def lift(self, event: Mapping[str, Any]) -> int:
        return self._value(event)

    def plus(self, left: int | None, right: int | None) -> int | None:
        if left is None:
            return right
        if right is None:
            return left
        return max(left, right)

    def spark_aggregate(self) -> Any:
        from pyspark.sql import functions as F

        return F.max(F.col(str(self.field)).cast("bigint"))


@dataclass(frozen=True)
class Min(Max):
    """Smallest value of an integer field; None is the identity."""

    kind: ClassVar[str] = "min"
    sql_plus: ClassVar[str] = "MIN"

    def plus(self, left: int | None, right: int | None) -> int | None:
        if left is None:
            return right
        if right is None:
            return left
        return min(left, right)

    def spark_aggregate(self) -> Any:
        from pyspark.sql import functions as F

        return F.min(F.col(str(self.field)).cast("bigint"))


AGGREGATIONS: dict[str, type[Aggregation]] = {
    cls.kind: cls for cls in (Count, Sum, SumOfSquares, Max, Min)
}
