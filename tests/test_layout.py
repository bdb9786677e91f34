"""The package's shape: one-way imports between its parts, and small modules.

Parsed from the source (ast), so lazy imports inside functions count too. A new module has to
be placed in a group below; that is the point: where it sits says what it may import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"

MAX_LINES = 400
#: Modules allowed past MAX_LINES, each with why (keep this short; split instead).
LONG_MODULES: dict[str, str] = {
    "exporter.wal": "the segment writer with its failure handling (truncate back, fresh "
    "segment, probe); the segment set and replay can move out once the fault work settles",
    "exporter.client.client": "the SDK's UsageClient (414 lines, landed with the SDK); its wire "
    "helpers (encode_batch, _retry_after, _RequestIds) can move to a module of their own",
}

#: Groups by module-name prefix (longest prefix wins), and what each may import besides itself.
GROUPS: dict[str, str] = {
    "exporter": "shared",  # the package root: __version__
    "exporter.config": "shared",
    "exporter.errors": "shared",
    "exporter.timeutil": "shared",
    "exporter.money": "shared",  # THE rounding rule and the cost cap
    "exporter.backoff": "shared",
    "exporter.logs": "shared",
    "exporter.logevents": "shared",
    "exporter.redact": "shared",
    "exporter.httputil": "shared",
    "exporter.selfmetrics": "shared",
    "exporter.sched": "shared",  # the CPU policy of our background threads and processes
    "exporter.usage": "usage",
    "exporter.pricing": "pricing",
    "exporter.live": "live",
    "exporter.wal": "wal",
    "exporter.walformat": "wal",
    "exporter.walsync": "wal",
    "exporter.store": "store",
    "exporter.ingest": "ingest",
    "exporter.otlp": "ingest",  # an ingest endpoint (moving into ingest/)
    "exporter.flusher": "flush",
    "exporter.budgets": "budgets",
    "exporter.api": "api",
    "exporter.auth": "auth",
    "exporter.client": "client",
    "exporter.appkeys": "wiring",
    "exporter.startup": "wiring",
    "exporter.reprice": "wiring",  # pricing x store: re-pricing stored rows (the CLI runs it)
    "exporter.server": "wiring",
    "exporter.workers": "wiring",  # serve --workers: the supervisor (cli passes create_app)
    "exporter.leftovers": "wiring",  # WAL of a run with another --workers: flushed at start
    "exporter.http_errors": "wiring",  # the 400 answers of the HTTP parser (server.py uses it)
    "exporter.app": "app",
    "exporter.cli": "cli",
    "exporter.__main__": "cli",
}

#: Everything below the wiring: what app, startup and cli may put together.
_PARTS = {"shared", "usage", "pricing", "live", "wal", "store", "ingest", "flush", "budgets"}

ALLOWED: dict[str, set[str]] = {
    "shared": set(),
    "usage": {"shared"},
    "pricing": {"shared", "usage"},
    "live": {"shared", "usage"},
    "wal": {"shared", "usage"},
    "store": {"shared", "usage"},
    "ingest": {"shared", "usage", "pricing", "live", "wal"},
    "flush": {"shared", "usage", "wal", "store"},  # the bridge WAL → store
    "budgets": {"shared", "usage", "store"},
    "api": {"shared", "usage", "store", "budgets"},  # the read side
    "auth": {"shared"},
    "client": set(),  # the SDK imports nothing of the server
    "wiring": _PARTS | {"api", "auth"},
    "app": _PARTS | {"api", "auth", "wiring"},  # only cli imports app
    "cli": _PARTS | {"api", "auth", "client", "wiring", "app"},  # nothing imports cli but cli
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """(line, module) of every `exporter…` import; `from pkg import sub` names the submodule."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "exporter":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "exporter":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield node.lineno, sub if sub in known else node.module
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: use absolute imports")


def group(module: str) -> str:
    best = max((p for p in GROUPS if module == p or module.startswith(p + ".")), key=len)
    return GROUPS[best]


def test_every_module_is_placed_in_a_group() -> None:
    unplaced = [m for m in modules() if m != "exporter" and group(m) == "shared"
                and m not in GROUPS]  # fmt: skip
    assert not unplaced, f"place these modules in GROUPS (tests/test_layout.py): {unplaced}"


def test_imports_go_one_way() -> None:
    found = modules()
    known = set(found)
    wrong = []
    for name, path in found.items():
        mine = group(name)
        for line, target in imports(path, known):
            theirs = group(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} {name} ({mine}) "
                             f"imports {target} ({theirs})")  # fmt: skip
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_group_graph_has_no_cycle() -> None:
    """ALLOWED itself is one-way: no group may reach back to itself through others."""

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in ALLOWED[start]:
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cyclic = [g for g in ALLOWED if reaches(g, g, {g})]
    assert not cyclic, cyclic
    assert set(GROUPS.values()) == set(ALLOWED)


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    """The parser finds lazy and `from pkg import sub` imports (so a pass means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from exporter.store import queries\n"
        "def f():\n    import exporter.app\n    from exporter.cli import main\n"
    )
    known = {"exporter.store", "exporter.store.queries", "exporter.app", "exporter.cli"}
    assert [t for _, t in imports(bad, known)] == [
        "exporter.store.queries",
        "exporter.app",
        "exporter.cli",
    ]
    assert group("exporter.store.queries") == "store" and group("exporter.cli.serve") == "cli"
    assert "store" not in ALLOWED["live"] and "app" not in ALLOWED["api"]


def test_modules_stay_small() -> None:
    long = {}
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and name not in LONG_MODULES:
            long[name] = lines
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"
