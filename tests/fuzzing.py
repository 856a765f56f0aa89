"""The OpenAPI fuzz loop the unit (ASGI) and integration (HTTP) tests share: every operation,
`examples` positive and as many negative (schema-violating) cases, each answer checked."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

FUZZ_EXAMPLES = 200
INPUT = ("POST", "GET /v1/entities")  # the operations that take parameters or a body


def fuzz_operations(schema: Any, call: Callable[[Any], Any], *,
                    examples: int = FUZZ_EXAMPLES) -> tuple[Counter[str], list[str]]:
    """(requests per operation, descriptions of the answers >= 500) for a schemathesis schema;
    `call(case)` sends one case and returns the response."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    tried: Counter[str] = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case: Any) -> None:
                response = call(case)
                tried[label] += 1  # noqa: B023 (fuzz runs within this iteration)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} → "
                                    f"{response.status_code}: {response.text[:200]}")

            try:
                fuzz()
            except Unsatisfiable:  # an operation without input has nothing to violate
                assert mode is GenerationMode.NEGATIVE and not label.startswith(INPUT), label
    return tried, failures


def every_input_operation_fuzzed(tried: Counter[str], examples: int = FUZZ_EXAMPLES) -> bool:
    with_input = [label for label in tried if label.startswith(INPUT)]
    return len(with_input) == 4 and all(tried[label] >= examples for label in with_input)
