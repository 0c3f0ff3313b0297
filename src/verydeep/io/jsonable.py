"""Dataclasses as JSON-able dicts: the one conversion every result printed or written as JSON goes
through (``eval``, ``predict``, ``transfer``, ``reproduce``, ``serve``)."""

from __future__ import annotations

import keyword
from dataclasses import asdict
from typing import Any


def to_json_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-able dict (:func:`dataclasses.asdict`); a field named after a Python
    keyword with a trailing underscore (``class_``, ``pass_``) has the keyword as its key."""

    def fields_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
        return {key[:-1] if keyword.iskeyword(key[:-1]) else key: value for key, value in items}

    return asdict(obj, dict_factory=fields_dict)
