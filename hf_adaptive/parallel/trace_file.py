"""Parse a JSONL request trace, checking every field where it enters.

Contract: pure (no torch). ``trace_rows(path)`` yields one ``dict`` of ``Request`` keyword arguments per non-blank
line, or raises one ``ValueError`` / ``TypeError`` whose single line names the file, the line, the field, the value
and a fix. A line is a JSON object with

- ``id``: a non-empty string or an int, unique in the file (default: the line number);
- ``arrival_s``: a finite number of seconds >= 0 (default 0);
- ``max_new_tokens``: an int in [1, ``MAX_TOKENS``] (default 32);
- exactly one of ``prompt`` (a string) or ``prompt_tokens`` (an int in [1, ``MAX_TOKENS``]).

Unknown keys are refused (a misspelt ``arival_s`` would otherwise silently default to 0), and so are JSON's
non-standard ``NaN`` / ``Infinity`` (as values of these fields; the simulator would wait on a NaN forever).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hf_adaptive.validation import (FieldTypeError, FieldValueError, check_number, check_type, located,
                                    read_text_file, show)

MAX_TOKENS = 2**31 - 1  # token positions are int32 in the kernels; anything longer is not a request
FIELDS = ("id", "arrival_s", "max_new_tokens", "prompt", "prompt_tokens")
EXAMPLE = '{"id": "r1", "arrival_s": 0.5, "prompt_tokens": 128, "max_new_tokens": 32}'


def trace_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """Each line's ``Request`` fields (``id``, ``arrival_s``, ``max_new_tokens``, ``prompt``, ``prompt_tokens``)."""
    text = read_text_file(path, "trace", "pass a JSONL trace, one request per line, e.g. eval/traces/mixed.jsonl")
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}: "
        try:
            fields = parse_trace_line(line, line_no)
        except (FieldValueError, FieldTypeError) as err:
            raise located(err, where) from None
        if fields["id"] in first_line:
            raise FieldValueError(f"{where}id {fields['id']!r} is already used on line {first_line[fields['id']]}. "
                                  "Fix: give every request its own id.", "id")
        first_line[fields["id"]] = line_no
        yield fields


def parse_trace_line(line: str, line_no: int) -> dict[str, Any]:
    """One line's fields, checked (see the module docstring); errors name the field, not the place."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise FieldValueError(f"column {err.colno}: not JSON ({err.msg}). Fix: one JSON object per line, e.g. "
                              f"{EXAMPLE}.", "line") from None
    except ValueError as err:  # e.g. an int literal past Python's digit limit
        raise FieldValueError(f"not a usable JSON line ({err}). Fix: e.g. {EXAMPLE}.", "line") from None
    except RecursionError:
        raise FieldValueError(f"the line nests too deeply to be a request. Fix: e.g. {EXAMPLE}.", "line") from None
    if not isinstance(row, dict):
        raise FieldTypeError(f"a trace line must be a JSON object; got {type(row).__name__} {show(row)}. "
                             f"Fix: e.g. {EXAMPLE}.", "line")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise FieldValueError(f"unknown field(s) {unknown}; allowed: {list(FIELDS)}. Fix: e.g. {EXAMPLE}.",
                              unknown[0])
    if ("prompt" in row) == ("prompt_tokens" in row):
        raise FieldValueError(f"give exactly one of 'prompt' or 'prompt_tokens'; got keys {sorted(row)}. "
                              f"Fix: e.g. {EXAMPLE}.", "prompt_tokens")
    tokens = dict(maximum=MAX_TOKENS, integer=True)
    out = {"id": _request_id(row.get("id", line_no)),
           "arrival_s": float(check_number(row.get("arrival_s", 0.0), "arrival_s", minimum=0.0,
                                           fix='"arrival_s": 0.5 (seconds after the trace starts)')),
           "max_new_tokens": check_number(row.get("max_new_tokens", 32), "max_new_tokens", minimum=1,
                                          fix='"max_new_tokens": 32', **tokens),
           "prompt": None, "prompt_tokens": None}
    if "prompt" in row:
        out["prompt"] = check_type(row["prompt"], "prompt", str, '"prompt": "Hello"')
    else:
        out["prompt_tokens"] = check_number(row["prompt_tokens"], "prompt_tokens", minimum=1,
                                            fix='"prompt_tokens": 128', **tokens)
    return out


def _request_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise FieldTypeError(f"id must be a non-empty string or an int; got {show(value)} "
                             f'({type(value).__name__}). Fix: e.g. "id": "r1".', "id")
    return str(value)

