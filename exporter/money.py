"""USD amounts: THE rounding rule and the exact conversions every module uses.

Costs are exact decimals from the token counts to the stored NUMERIC: pricing computes in
integers, client-sent values are parsed from their decimal text, and exactly one rounding
happens, here: half-even (banker's rounding) at the storage scale of 1e-10 USD. Postgres and
SQLite then store the already-rounded value unchanged (NUMERIC(20,10) never re-rounds a value
of scale ≤ 10; SQLite keeps the canonical text), so both backends hold the same digits.

`MAX_COST_USD` is the one cap on a report's cost, sent or computed. A rollup cell is
NUMERIC(20,10): at most 9,999,999,999.9999999999 USD. At the cap, one (hour or day, key) cell
holds a million capped reports: one capped report a minute for a whole year (525,600) still
fits with room to spare, and no real model call comes near (the priciest cost ~100 USD).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

__all__ = [
    "COST_QUANTUM",
    "COST_SCALE",
    "MAX_COST_USD",
    "UNITS_PER_USD",
    "ZERO",
    "CostOverCap",
    "cost_units",
    "exact_decimal",
    "from_units",
    "json_default",
    "money_text",
    "parse_cost",
    "round_units",
    "stored_money",
    "to_money",
]

COST_SCALE = 10
COST_QUANTUM = Decimal(1).scaleb(-COST_SCALE)  # 1e-10 USD
UNITS_PER_USD: int = 10**COST_SCALE
#: rollup column NUMERIC(20,10) holds < 1e10 USD; a year of one capped report a minute fits
MAX_COST_USD = Decimal(10_000)
MAX_COST_UNITS = int(MAX_COST_USD) * UNITS_PER_USD
ZERO = Decimal(0).quantize(COST_QUANTUM)


class CostOverCap(ValueError):
    """A report's cost (sent or computed) is above MAX_COST_USD."""


def round_units(numerator: int, exponent: int) -> int:
    """`numerator * 10**-exponent` USD in units of 1e-10 USD, rounded half-even (integers only)."""
    shift = exponent - COST_SCALE
    if shift <= 0:
        return numerator * _pow10(-shift)
    divisor = _pow10(shift)
    q, r = divmod(numerator, divisor)
    twice = 2 * r
    if twice > divisor or (twice == divisor and q & 1):
        q += 1
    return q


_POW10: tuple[int, ...] = tuple(10**i for i in range(64))


def _pow10(n: int) -> int:
    return _POW10[n] if n < 64 else int(Decimal(10) ** n)


def cost_units(cost: float | Decimal) -> int:
    """USD → integer units of 1e-10, rounded half-even from the value's shortest decimal (the
    one rule). Below 2**40 units a float product is within 3e-4 of the decimal's, so when it
    is not near a half its rounding is the same and Decimal (~1 µs) is skipped."""
    if type(cost) is Decimal:  # what a validated report carries: the hot path
        return round(cost.scaleb(COST_SCALE))
    if isinstance(cost, float):
        units = cost * UNITS_PER_USD
        if units < _FAST_LIMIT:
            nearest = round(units)
            if abs(units - nearest) < 0.499:
                return nearest
        return round(Decimal(repr(cost)).scaleb(COST_SCALE))
    return round(Decimal(cost).scaleb(COST_SCALE))


_FAST_LIMIT = float(2**40)


def from_units(units: int) -> Decimal:
    """Units of 1e-10 USD → a Decimal with exactly COST_SCALE places (exact: the product of
    an integer and 1E-10 keeps exponent -10; faster than scaleb on the hot path)."""
    return Decimal(units) * COST_QUANTUM


def to_money(value: Decimal) -> Decimal:
    """Any exact Decimal at the storage scale, by the one rule (half-even)."""
    return value.quantize(COST_QUANTUM, rounding=ROUND_HALF_EVEN)


def exact_decimal(value: Any) -> Decimal:
    """A Decimal of a database or JSON value, exactly (floats through their shortest repr)."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise ValueError("a USD amount must be a number or a decimal string")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, str):
        text = value.strip()
        if not text or len(text) > 64:
            raise ValueError("a USD amount must be a decimal number of at most 64 characters")
        try:
            return Decimal(text)
        except InvalidOperation:
            raise ValueError("a USD amount must be a decimal number") from None
    raise ValueError("a USD amount must be a number or a decimal string")


def stored_money(value: Any) -> Decimal:
    """A value read from a cost column (any size: rollups sum many reports), by the one rule."""
    return to_money(exact_decimal(value))


def parse_cost(value: Any) -> Decimal:
    """A USD amount from a client, a WAL record or a database value, exactly.

    Text and ints are exact. A float (JSON numbers arrive as floats from orjson) goes through its
    shortest round-trip repr, which is the number's own text for up to 15 significant digits;
    send the amount as a JSON string to keep more. Non-finite, negative or over-cap → ValueError.
    """
    dec = exact_decimal(value)
    if not dec.is_finite():
        raise ValueError("cost_usd must be finite")
    if dec < 0:
        raise ValueError("cost_usd must be non-negative")
    if dec > MAX_COST_USD:
        raise CostOverCap(f"cost_usd {dec} is above the cap of {MAX_COST_USD} USD per report")
    return to_money(dec)


def json_default(value: Any) -> Any:
    """orjson `default=` hook: costs travel as exact decimal text (WAL records, bodies)."""
    if isinstance(value, Decimal):
        return money_text(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def money_text(value: Decimal) -> str:
    """Fixed-point text (never exponent notation): SQLite's exact cost columns, WAL records."""
    return format(value, "f")
