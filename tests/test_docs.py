"""The docs are true: every fenced example in README.md and docs/ runs here (shell commands
against a live service, config examples through the real loaders; the runbooks' PromQL is
parsed by tests/test_rules.py) or carries `<!-- docs-check: not runnable here: <reason> -->`
or `<!-- docs-check: runs in tests/<file>.py::<test> -->` on the line above its fence
(unlabelled and `text` fences are diagrams: nothing to run); the figures quoted from
bench/RESULTS.md match it."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import ServiceProcess, free_port, http, start_service

from exporter.config import load_settings
from exporter.pricing import Pricer

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*docs-check:\s*(.*?)\s*-->")
RUNS_IN = re.compile(r"runs in (tests/[\w/]+\.py)::(\w+)")
#: what these tests run themselves (the rest needs a marker)
CHECKED_HERE = {"sh", "toml", "yaml", "json"}
#: blocks another test already runs, by (file, language)
CHECKED_ELSEWHERE = {
    ("docs/runbooks.md", "promql"): ("tests/test_rules.py", "test_runbook_promql_parses"),
}
#: programs an unmarked shell block may start: they only talk to the live test service or read
#: the repository. Anything else (installs, docker, the suite itself) must be marked.
RUNNABLE_HERE = {"curl", "promtool"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^```(\w*)\s*$", lines[i])
            if not m:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            above = lines[i - 1] if i else ""
            marker = MARKER.search(above)
            found.append(
                Block(
                    path, i + 1, m[1], "\n".join(lines[i + 1 : end]), marker[1] if marker else None
                )
            )
            i = end + 1
    return found


ALL = blocks()


def by_lang(*langs: str) -> list[Block]:
    return [b for b in ALL if b.lang in langs and b.marker is None]


def test_every_fenced_block_is_checked_or_says_why_not() -> None:
    assert len(ALL) > 15, [b.where for b in ALL]
    for b in ALL:
        if b.lang in ("", "text") and b.marker is None:
            continue  # a diagram or a listing: nothing to run
        elsewhere = CHECKED_ELSEWHERE.get((str(b.path.relative_to(ROOT)), b.lang))
        if b.marker is None and elsewhere:
            assert re.search(rf"^def {elsewhere[1]}\(", (ROOT / elsewhere[0]).read_text(), re.M)
            continue
        if b.marker is None:
            assert b.lang in CHECKED_HERE, (
                f"{b.where}: a {b.lang} block needs <!-- docs-check: not runnable here: … --> "
                "or <!-- docs-check: runs in tests/….py::test_… --> above its fence"
            )
            if b.lang == "sh":
                for command, _ in commands(b):
                    assert programs(command) <= RUNNABLE_HERE, (b.where, command)
            continue
        runs = RUNS_IN.search(b.marker)
        if runs:
            source = (ROOT / runs[1]).read_text()
            assert re.search(rf"^(async )?def {runs[2]}\(", source, re.M), b.where
        else:
            reason = b.marker.removeprefix("not runnable here:").strip()
            assert b.marker.startswith("not runnable here:") and len(reason) > 10, b.where
        if b.lang == "python":  # at least it is Python and its imports exist
            tree = compile(
                b.text, b.where, "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            )
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("exporter"):
                    module = __import__(node.module or "", fromlist=["_"])
                    for alias in node.names:
                        assert hasattr(module, alias.name), (b.where, node.module, alias.name)


# -- shell examples, against a live service ---------------------------------------------------


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcess]:
    work = Path(tempfile.mkdtemp(prefix="docs-check-"))
    port = free_port()
    svc = start_service(
        ["serve", "--port", str(port), "--data-dir", str(work / "data")],
        work / "service.log",
        port=port,
    )
    yield svc
    svc.stop()
    shutil.rmtree(work, ignore_errors=True)


def commands(block: Block) -> list[tuple[str, list[str]]]:
    """(command, expected output lines): a command is the lines up to the `# ` comment lines
    that follow it, which are its documented output."""
    out: list[tuple[str, list[str]]] = []
    command: list[str] = []
    expected: list[str] = []
    for line in block.text.splitlines():
        if line.startswith("# ") and command:
            expected.append(line[2:])
            continue
        if expected or (not line.strip() and command):
            out.append(("\n".join(command), expected))
            command, expected = [], []
        if line.strip():
            command.append(line)
    if command:
        out.append(("\n".join(command), expected))
    return out


def programs(command: str) -> set[str]:
    """The programs a command line starts (first word of each pipeline stage)."""
    joined = command.replace("\\\n", " ")
    stages = re.split(r"\|\||&&|[|;\n]", re.sub(r"'[^']*'|\"[^\"]*\"", "''", joined))
    return {stage.split()[0] for stage in stages if stage.split()} - {"grep"}


@pytest.mark.parametrize("block", by_lang("sh"), ids=lambda b: b.where)
def test_shell_examples_run_and_print_what_the_docs_say(
    block: Block, service: ServiceProcess
) -> None:
    assert shutil.which("curl"), "curl is needed to run the documented examples"
    for command, expected in commands(block):
        assert programs(command) <= RUNNABLE_HERE, (block.where, command)  # never anything else
        live = re.sub(r"(http://)?localhost:9470", service.url, command)
        proc = subprocess.run(
            ["bash", "-c", f"set -eo pipefail\n{live}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, (block.where, command, proc.stdout, proc.stderr)
        if expected:
            assert proc.stdout.strip().splitlines() == expected, (block.where, command)


def test_readme_shape_examples_are_accepted(service: ServiceProcess) -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| shape | example item |", 1)[1].split("\n\n", 1)[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "`{" in ln]
    examples = [json.loads(m) for ln in rows for m in re.findall(r"`(\{[^`]*\})`", ln)]
    assert len(examples) >= 6, rows
    for example in examples:
        status, body, _ = http(
            "POST", f"{service.url}/v1/usage", json.dumps(example).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        answer = json.loads(body)
        assert status == 202 and answer["accepted"] + answer["duplicates"] == 1, (example, answer)


# -- configuration, price and PromQL examples through the real loaders ------------------------


@pytest.mark.parametrize("block", by_lang("toml", "yaml"), ids=lambda b: b.where)
def test_config_and_price_examples_load(block: Block, tmp_path: Path) -> None:
    data = tomllib.loads(block.text) if block.lang == "toml" else yaml.safe_load(block.text)
    path = tmp_path / f"example.{block.lang}"
    path.write_text(block.text)
    if isinstance(data, dict) and "models" in data:
        Pricer(path)  # a price file
    else:
        settings = load_settings(config=path)
        for key, value in data.items():
            assert getattr(settings, key) is not None, (block.where, key, value)


@pytest.mark.parametrize("block", by_lang("json"), ids=lambda b: b.where)
def test_json_examples_parse(block: Block) -> None:
    json.loads(block.text)


# -- figures ----------------------------------------------------------------------------------


def test_the_quoted_suite_duration_is_the_measured_one() -> None:
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    m = re.search(r"`scripts/test` took (\d+) min (\d+) s", results)
    assert m, "bench/RESULTS.md must record a measured run: '`scripts/test` took N min S s'"
    measured = int(m[1]) + int(m[2]) / 60
    readme = (ROOT / "README.md").read_text()
    q = re.search(r"about ([\d.]+) minutes", readme)
    assert q, "README quotes the suite duration as 'about N minutes'"
    assert abs(float(q[1]) - measured) <= 0.5, (q[0], m[0])
