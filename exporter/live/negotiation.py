"""/metrics content negotiation: which format and whether to gzip, from Accept headers.

prometheus_client's `choose_encoder` and `gzip_accepted` decide by order and substring; these
keep their answers (OpenMetrics 1.x or no version → OpenMetrics 1.0.0, preferred to text;
OpenMetrics 0.0.1 is not served, like theirs; anything else → text 0.0.4) and add what RFC
9110 asks: q-values rank the choices and `q=0` refuses one (`gzip;q=0` → no gzip), and `*`
stands for every coding not named, so `*` alone allows gzip while `identity` alone does not.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Choice", "gzip_accepted", "negotiate", "parse_list", "wants_openmetrics"]

OPENMETRICS = "application/openmetrics-text"


class Choice(NamedTuple):
    openmetrics: bool
    gzip: bool


class Item(NamedTuple):
    value: str  # lower-cased media range or coding
    params: dict[str, str]
    q: float


def parse_list(header: str) -> list[Item]:
    """`a;x=1;q=0.5, b` → items in the header's order; a bad q counts as 0 (refused)."""
    items = []
    for part in header.split(","):
        value, *params = (p.strip() for p in part.split(";"))
        if not value:
            continue
        named: dict[str, str] = {}
        for param in params:
            key, _, val = param.partition("=")
            named[key.strip().lower()] = val.strip().strip('"')
        q = 1.0
        if "q" in named:
            try:
                q = float(named.pop("q"))
            except ValueError:
                q = 0.0
            if not 0 <= q <= 1:  # also NaN
                q = 0.0
        items.append(Item(value.lower(), named, q))
    return items


def _openmetrics_version_ok(version: str | None) -> bool:
    """No version or 1.x: what we render (1.0.0). 0.0.1 is refused, as prometheus_client does."""
    if not version:
        return True
    major = version.split(".", 1)[0]
    return major == "1"


def wants_openmetrics(accept: str) -> bool:
    """The highest q with something servable decides; at equal q OpenMetrics wins, as in
    prometheus_client (which looks for an acceptable OpenMetrics entry anywhere)."""
    by_q: dict[float, list[Item]] = {}
    for item in parse_list(accept):
        if item.q > 0:
            by_q.setdefault(item.q, []).append(item)
    for q in sorted(by_q, reverse=True):
        items = by_q[q]
        if any(
            i.value == OPENMETRICS and _openmetrics_version_ok(i.params.get("version"))
            for i in items
        ):
            return True
        if any(i.value in ("text/plain", "text/*", "*/*") for i in items):
            return False
    return False


def gzip_accepted(accept_encoding: str) -> bool:
    items = parse_list(accept_encoding)
    named = {i.value: i.q for i in items}
    for coding in ("gzip", "x-gzip"):
        if coding in named:
            return named[coding] > 0
    return named.get("*", 0.0) > 0


def negotiate(accept: str, accept_encoding: str) -> Choice:
    return Choice(wants_openmetrics(accept), gzip_accepted(accept_encoding))
