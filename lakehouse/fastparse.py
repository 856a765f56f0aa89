"""The fast path of the one validation routine: a validator compiled from a record schema.

`RecordSchema.inspect`/`parse` (lakehouse/spec.py) first try the function `compile_fast_path`
builds for the schema: one `msgspec` decode into a Struct generated from the fields (types,
allowed values and lengths checked in C), then straight-line Python generated from the
same fields (ranges, cents, timestamps, the Kafka envelope). It returns the typed values of
a record the full routine (`RecordSchema.inspect_slow`, the reference) accepts, with values
identical to the full routine's, or None for anything else: an error of any kind, or any input
whose judgement it does not reproduce exactly. The full routine then judges the record and
names the reasons, so the fast path never decides a refusal; it only has to never accept
what the full routine refuses, and `tests/unit/test_fast_validator.py` checks both agree.

What the fast path accepts, and why the full routine accepts the same with the same values:
- bytes (str is encoded, bytearray and memoryview copied) of at most `max_bytes`, without a
  backslash: no escapes, so no lone surrogate (the only way to one in valid UTF-8 is an
  escape), and every `"` opens or closes a string; non-ASCII must decode as strict UTF-8
  (msgspec also refuses invalid UTF-8 inside strings). A document with an escape (`\\u00e9`,
  `\\/`, `\\"`) is valid JSON all the same: the full routine reads it;
- exactly the schema's fields and no others (`forbid_unknown_fields`; missing or null
  required fields fail the Struct's types), and no duplicate key: msgspec keeps the last
  copy of a key silently, so the number of `"` must equal two per key and per string value
  the Struct holds, which a second copy of any key exceeds;
- JSON grammar: msgspec refuses what Python's `json` refuses (NaN, Infinity, leading zeros,
  `+1`, `.5`, `1.`, trailing commas or data, control characters in strings, a BOM) and
  parses floats to the same correctly rounded double (a literal beyond the double range is a
  msgspec error, an infinity for `json`: refused either way);
- no number literal longer than `max_number_length`: every byte of the document that is not
  a key, a string value, a `true`/`false`/`null`, a brace, a colon or a comma belongs to a
  number or whitespace; when those bytes together are more than `max_number_length`
  (whitespace, pretty-printing), no run of the bytes a number is written with may be longer
  (nesting needs no check: an accepted document is flat);
- field values: strings whose length and allowed values msgspec checks (`max_length`
  counts code points, as `len` does); booleans; numbers as int or float (never bool) whose
  range is compared in Python exactly as the full routine compares it; money as cents
  `round(v * 100)` only when that is exact (an int's `v * 100`, or a float of magnitude below
  1e13 for which `c / 100 == v`: then the shortest repr of `v` has at most two decimals and
  the full routine's `Decimal(str(v)) * 100` is the same `c`), within 64 bits; timestamps
  through the same `datetime.fromisoformat` and epoch arithmetic as the full routine;
- the envelope: the Kafka key (bytes or str) equal to the key field and the event time
  within the skew limits, tested as the full routine tests them; anything else is left to it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Protocol

import msgspec

FastPath = Callable[[Any, Any, Any], "dict[str, Any] | None"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MONEY_FLOAT_BOUND = 1e13  # below it, a double's cents are exact (see the module docstring)


class FieldLike(Protocol):
    """What the compiler reads of a `lakehouse.spec.FieldSpec`."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def required(self) -> bool: ...
    @property
    def minimum(self) -> float | None: ...
    @property
    def maximum(self) -> float | None: ...
    @property
    def allowed(self) -> tuple[str, ...] | None: ...
    @property
    def max_length(self) -> int | None: ...


def _never(raw: Any, key: Any, arrival_ms: Any) -> dict[str, Any] | None:
    return None


def compile_fast_path(fields: Sequence[FieldLike], *, key_field: str, time_field: str,
                      max_bytes: int, max_number_length: int, max_future_skew_ms: int,
                      max_past_skew_ms: int | None, unchecked: Any) -> FastPath:
    """`fast(raw, key, arrival_ms)`: the typed values of a record the full routine accepts
    with these rules (`key` is `unchecked` when there is no Kafka key to check), or None
    when the full routine has to judge it. Never raises, nor does compiling it: a schema
    this compiler cannot express (two fields of one name, say) gets a fast path that takes
    nothing, so the full routine judges every record."""
    if len({f.name for f in fields}) != len(fields):
        return _never
    try:
        return _compile(fields, key_field, time_field, max_bytes, max_number_length,
                        max_future_skew_ms, max_past_skew_ms, unchecked)
    except Exception:  # noqa: BLE001 (the full routine stays correct without a fast path)
        return _never


def _compile(fields: Sequence[FieldLike], key_field: str, time_field: str, max_bytes: int,
             max_number_length: int, max_future_skew_ms: int, max_past_skew_ms: int | None,
             unchecked: Any) -> FastPath:
    namespace: dict[str, Any] = {
        "UNSET": msgspec.UNSET, "unchecked": unchecked, "fromisoformat": datetime.fromisoformat,
        "EPOCH": datetime(1970, 1, 1, tzinfo=UTC), "ONE_MS": timedelta(milliseconds=1),
        "isfinite": math.isfinite,
    }
    struct_fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    rename: dict[str, str] = {}
    lines: list[str] = []
    # `rest`: the bytes of the document not accounted for by braces, keys, colons, commas,
    # strings, true/false/null, i.e. those of number literals and whitespace. One comma
    # fewer than fields present is subtracted only as an over-estimate of `rest` (safe).
    fixed = 2 - 1
    quotes = 0  # two per key and per string value of the required fields
    for i, spec in enumerate(fields):
        attr, var = f"f{i}", f"v{i}"
        rename[attr] = spec.name
        kind = _struct_type(spec)
        if kind is None:  # no value of this field is ever valid: only the full routine judges
            if spec.required:
                return _never
            kind = type(None)
        key_bytes = len(spec.name.encode("utf-8", "surrogatepass")) + 2 + 1 + 1  # "name":,
        text = spec.type in ("string", "timestamp")
        lines.append(f"{var} = r.{attr}")
        if spec.required:
            struct_fields.append((attr, kind))
            fixed += key_bytes
            quotes += 4 if text else 2
            lines.extend(_value_lines(spec, var, i, namespace))
        else:
            struct_fields.append((attr, kind | None | msgspec.UnsetType, msgspec.UNSET))
            lines += [f"if {var} is UNSET:", f"    {var} = None", "else:",
                      f"    rest -= {key_bytes}", f"    if {var} is None:", "        q += 2",
                      "        rest -= 4", "    else:", f"        q += {4 if text else 2}"]
            lines.extend("        " + line for line in _value_lines(spec, var, i, namespace))
    struct = msgspec.defstruct("Record", struct_fields, rename=rename, forbid_unknown_fields=True,
                               gc=False, module=__name__)
    namespace["decode"] = msgspec.json.Decoder(struct).decode
    lines.append(f"if raw.count(b'\"') != q + {quotes}:")
    lines.append("    return None")
    # a literal is a run of these bytes: with no run longer than the limit, none is longer
    namespace["long_run"] = re.compile(rb"[-+.0-9Ee]{%d}" % (max_number_length + 1)).search
    lines.append(f"if rest > {max_number_length} and long_run(raw) is not None:")
    lines.append("    return None")
    key_index = next(i for i, f in enumerate(fields) if f.name == key_field)
    lines += ["if key is not unchecked:", "    if not key:", "        return None"]
    if fields[key_index].type == "string":
        kv = f"v{key_index}"
        lines += [f"    if {kv} is not None:", "        tk = type(key)", "        if tk is bytes:",
                  f"            if key != {kv}.encode('utf-8'):", "                return None",
                  f"        elif tk is not str or key != {kv}:", "            return None"]
    tv = f"v{next(i for i, f in enumerate(fields) if f.name == time_field)}"
    namespace["future"], namespace["past"] = max_future_skew_ms, max_past_skew_ms
    lines += [f"if arrival_ms is not None and isinstance({tv}, int):",
              f"    if {tv} - arrival_ms > future:", "        return None"]
    if max_past_skew_ms is not None:
        lines += [f"    if arrival_ms - {tv} > past:", "        return None"]
    typed = ", ".join(f"{spec.name!r}: v{i}" for i, spec in enumerate(fields))
    lines.append(f"return {{{typed}}}")
    body = "\n".join("        " + line for line in lines)
    source = f"""
def fast(raw, key, arrival_ms):
    try:
        t = type(raw)
        if t is not bytes:
            if t is str:
                raw = raw.encode("utf-8")
            elif t is bytearray or t is memoryview:
                raw = bytes(raw)
            else:
                return None
        if len(raw) > {max_bytes} or b"\\\\" in raw:
            return None
        if not raw.isascii():
            raw.decode("utf-8")
        r = decode(raw)
        q = 0
        rest = len(raw) - {fixed}
{body}
    except Exception:
        return None
"""
    exec(compile(source, "<lakehouse.fastparse>", "exec"), namespace)  # noqa: S102 (generated here)
    fast: FastPath = namespace["fast"]
    fast.__doc__ = source  # the generated code, for whoever debugs it
    return fast


def _struct_type(spec: FieldLike) -> Any:
    """The msgspec type a valid value of the field has (None: no value is valid)."""
    if spec.type == "string":
        if spec.allowed is not None:
            allowed = tuple(v for v in spec.allowed if _unescaped_text(v)
                            and (spec.max_length is None or len(v) <= spec.max_length))
            return Literal[allowed] if allowed else None
        if spec.max_length is not None:
            return Annotated[str, msgspec.Meta(max_length=spec.max_length)]
        return str
    if spec.type == "boolean":
        return bool
    if spec.type == "timestamp":
        return str
    if spec.type == "long":
        return int
    return int | float  # money, double: the literal's own kind, as Python's json gives it


def _unescaped_text(value: str) -> bool:
    """A string the fast path can read: valid UTF-8 written without escapes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\\" not in value and '"' not in value and all(c >= " " for c in value)


def _value_lines(spec: FieldLike, var: str, i: int, namespace: dict[str, Any]) -> list[str]:
    """Lines that check `var`, the field's decoded value, and turn it into its typed value,
    counting its bytes off `rest` (see `compile_fast_path`)."""
    out: list[str] = []
    if spec.type in ("string", "timestamp"):
        out.append(f"rest -= len({var}) + 2")  # characters <= bytes: `rest` over-estimated
    elif spec.type == "boolean":
        out.append(f"rest -= 4 if {var} else 5")
    if spec.type == "timestamp":
        out += [f"m = fromisoformat({var})", "if m.tzinfo is None:", "    return None",
                f"{var} = (m - EPOCH) // ONE_MS"]
    if spec.type not in ("long", "money", "double"):
        return out
    if spec.type != "long":
        out += [f"if type({var}) is float and not isfinite({var}):", "    return None"]
    if spec.minimum is not None:
        namespace[f"lo{i}"] = spec.minimum
        out += [f"if {var} < lo{i}:", "    return None"]
    if spec.maximum is not None:
        namespace[f"hi{i}"] = spec.maximum
        out += [f"if {var} > hi{i}:", "    return None"]
    if spec.type == "double":
        return [*out, f"{var} = float({var})"]
    if spec.type == "money":
        out += [f"if type({var}) is int:", f"    {var} = {var} * 100", "else:",
                f"    if not -{_MONEY_FLOAT_BOUND!r} < {var} < {_MONEY_FLOAT_BOUND!r}:",
                "        return None", f"    c = round({var} * 100)", f"    if c / 100 != {var}:",
                "        return None", f"    {var} = c"]
    return [*out, f"if not {_INT64_MIN} <= {var} <= {_INT64_MAX}:", "    return None"]
