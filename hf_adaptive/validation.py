"""Checks for values that enter from users: type, range and finiteness, each failing with one clear line.

Contract: pure Python (no torch; ``check_decoder_only`` reads transformers' model tables when called). Every
check names the field, the value received, what is allowed and a fix.
The errors are ``FieldValueError`` / ``FieldTypeError``: plain ``ValueError`` / ``TypeError`` that also carry the
field's name, so a file parser can re-raise them with the file and line the field came from (``located``).
``arg_number`` turns the same checks into an argparse ``type=`` (a bad flag is a usage error, exit code 2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from numbers import Integral, Real
from typing import Any


class FieldValueError(ValueError):
    """A value of the right type outside its allowed range (``field`` names it)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class FieldTypeError(TypeError):
    """A value of the wrong type (``field`` names it)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


def located(err: FieldValueError | FieldTypeError, where: str) -> FieldValueError | FieldTypeError:
    """The same error with ``where`` (e.g. ``"trace.jsonl:3: "``) in front of its message."""
    return type(err)(f"{where}{err}", err.field)


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a field may hold a megabyte string or a 5000-digit int)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"<{type(value).__name__} too long to print>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _range_text(minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if min_open else '>='} {minimum}")
    if maximum is not None:
        parts.append(f"{'<' if max_open else '<='} {maximum}")
    return " and ".join(parts)


def check_number(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
                 min_open: bool = False, max_open: bool = False, integer: bool = False, fix: str = "") -> Any:
    """Return ``value`` if it is a finite real number (an int when ``integer``) within the bounds.

    Args:
        value: what was received.
        name: the field or parameter name the message uses.
        minimum, maximum: inclusive bounds (exclusive with ``min_open`` / ``max_open``); None: unbounded.
        integer: require an int (``4.0`` is refused: it is accepted today by comparisons and fails later).
        fix: a working example for the message, e.g. ``"fixed_bits=4"``.
    Raises:
        FieldTypeError: not a number (bools and strings included), or not an int when ``integer``.
        FieldValueError: NaN, infinite, or outside the bounds.
    """
    kind = "an int" if integer else "a number"
    bounds = _range_text(minimum, maximum, min_open, max_open)
    allowed = f"{kind}{' ' + bounds if bounds else ''}"
    hint = f" Fix: e.g. {fix}." if fix else ""
    wanted = Integral if integer else Real
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise FieldTypeError(f"{name} must be {allowed}; got {show(value)} ({type(value).__name__}).{hint}", name)
    if not integer and not math.isfinite(value):
        finite = f"a finite number{' ' + bounds if bounds else ''}"
        raise FieldValueError(f"{name} must be {finite}; got {show(value)}.{hint}", name)
    too_low = minimum is not None and (value <= minimum if min_open else value < minimum)
    too_high = maximum is not None and (value >= maximum if max_open else value > maximum)
    if too_low or too_high:
        raise FieldValueError(f"{name} must be {allowed}; got {show(value)}.{hint}", name)
    return value


def check_choice(value: Any, name: str, allowed: Iterable[Any], fix: str = "") -> Any:
    """Return ``value`` if it is one of ``allowed`` (compared by type and value: ``4.0`` is not ``4``)."""
    options = tuple(allowed)
    if not any(type(value) is type(a) and value == a for a in options):
        hint = f" Fix: e.g. {fix}." if fix else ""
        raise FieldValueError(f"{name} must be one of {options}; got {show(value)} ({type(value).__name__}).{hint}",
                              name)
    return value


def check_type(value: Any, name: str, expected: type | tuple[type, ...], fix: str) -> Any:
    """Return ``value`` if it is an instance of ``expected``, else a ``FieldTypeError`` naming both."""
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise FieldTypeError(f"{name} must be a {names}; got {show(value)} ({type(value).__name__}). Fix: {fix}.", name)
    return value


def arg_number(*, minimum: float | None = None, maximum: float | None = None, min_open: bool = False,
               max_open: bool = False, integer: bool = False) -> Callable[[str], float | int]:
    """An argparse ``type=`` accepting a finite number in the bounds (``nan``, ``inf`` and ``1e400`` refused)."""

    def parse(text: str) -> float | int:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an int' if integer else 'a number'}, got {text!r}")
        try:
            return check_number(value, "the value", minimum=minimum, maximum=maximum, min_open=min_open,
                                max_open=max_open, integer=integer)
        except (FieldValueError, FieldTypeError) as err:
            raise argparse.ArgumentTypeError(str(err))

    parse.__name__ = "int" if integer else "number"  # argparse names the type in its messages
    return parse


def read_text_file(path: Any, what: str, fix: str) -> str:
    """The UTF-8 text of the file a user named, or one ``ValueError`` naming ``what``, the path and ``fix``."""
    from pathlib import Path

    if not isinstance(path, (str, Path)):
        raise FieldTypeError(f"the {what} path must be a str or Path; got {path!r} ({type(path).__name__}). "
                             f"Fix: {fix}.", what)
    p = Path(path)
    if not p.is_file():
        state = "is a directory" if p.is_dir() else "does not exist"
        raise FieldValueError(f"{what} {str(p)!r} {state} (working directory {Path.cwd()}). Fix: {fix}.", what)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = p.read_bytes()[:err.start].count(b"\n") + 1
        raise FieldValueError(f"{p}:{line}: the {what} is not UTF-8 text (byte {err.object[err.start]:#04x}). "
                              f"Fix: {fix}.", what) from None
    except OSError as err:
        raise FieldValueError(f"{what} {str(p)!r} cannot be read ({err.strerror}). Fix: {fix}.", what) from None


def check_decoder_only(config: Any, who: str) -> None:
    """Refuse encoder-decoder architectures (BART, T5, Marian...): their decoders keep a cross-attention cache
    and their layer count is not the config's ``num_hidden_layers``, so a decoder-only cache fails deep inside
    (and tiering finds the encoder's layers). ``config`` is a transformers ``PretrainedConfig``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as SEQ2SEQ

    text = config.get_text_config(decoder=True)
    if config.is_encoder_decoder or getattr(text, "is_encoder_decoder", False) or text.model_type in SEQ2SEQ:
        raise ValueError(f"{who} supports decoder-only models; model_type={text.model_type!r} is an encoder-decoder "
                         "architecture. Fix: keep transformers' default cache for this model (generate without "
                         "hf_adaptive), or use a decoder-only model such as smollm2-135m-instruct (Llama, Qwen2, "
                         "Mistral, Gemma 3).")
