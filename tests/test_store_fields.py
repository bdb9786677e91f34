"""One source for the report's columns: UsageReport, usage_details and the row rules agree.

Adding a field is one field on UsageReport and one column on usage_details (plus its
migration); these tests fail when only one side changed, or when a rollup column has no rule.
"""

from __future__ import annotations

import types
import typing
from datetime import datetime
from decimal import Decimal
from enum import Enum

from exporter.store.rows import (
    DETAIL_COLUMNS,
    DIMENSIONS,
    KINDS,
    ROLLUP_COLUMNS,
    ROLLUP_SPECS,
    SERVER_COLUMNS,
    DetailRow,
    Kind,
    RollupRow,
)
from exporter.store.tables import ROLLUP_KEY, ROLLUP_SUMS, usage_details, usage_rollups
from exporter.usage import UsageReport


def test_report_fields_are_the_detail_columns() -> None:
    assert set(UsageReport.model_fields) == set(DETAIL_COLUMNS)
    assert set(DETAIL_COLUMNS) | SERVER_COLUMNS == {c.name for c in usage_details.columns}
    assert DetailRow._fields == DETAIL_COLUMNS


def _base_type(annotation: object) -> type:
    """`int | None` → int, `Annotated[str, …]` → str, an enum → str."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = (a for a in typing.get_args(annotation) if a is not type(None))
        return _base_type(annotation)
    if typing.get_origin(annotation) is dict:  # `dict[K, V]` (tags)
        return dict
    assert isinstance(annotation, type)
    return str if issubclass(annotation, Enum) else annotation


_KINDS_FOR = {
    str: {Kind.TEXT},
    int: {Kind.COUNT, Kind.INT},
    bool: {Kind.BOOL},
    float: {Kind.FLOAT},
    Decimal: {Kind.MONEY},
    datetime: {Kind.TIME},
    dict: {Kind.JSON},
}


def test_each_column_kind_fits_its_report_field_type() -> None:
    for name, field in UsageReport.model_fields.items():
        base = _base_type(field.annotation)
        assert KINDS[name] in _KINDS_FOR[base], (name, base, KINDS[name])


def test_every_rollup_sum_has_one_rule_reading_detail_columns() -> None:
    assert set(ROLLUP_SPECS) == set(ROLLUP_SUMS)
    assert set(ROLLUP_KEY) | set(ROLLUP_SUMS) == {c.name for c in usage_rollups.columns}
    assert RollupRow._fields == ROLLUP_COLUMNS
    assert set(DIMENSIONS) <= set(DETAIL_COLUMNS)
    for spec in ROLLUP_SPECS.values():
        assert set(spec.reads) <= set(DETAIL_COLUMNS), spec.column
