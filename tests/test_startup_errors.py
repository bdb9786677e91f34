"""Each way of failing to start: the real console script, one line on stderr, exit code 2 for
configuration and 1 for run time, no traceback, no secret echoed, no "listening" before bind."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import free_port, run_cli

from exporter.config import Settings, check_env_names

SECRET = "s3cr3t-token-never-echoed"  # 25 characters: a valid length
SHORT_SECRET = "tiny-secret"  # too short: an invalid token that must not be echoed either
DB_PASSWORD = "db-pass-never-echoed"


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line the CLI printed (stdout stays empty)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == "", proc.stdout
    return lines[0]


def serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "d"), *args, env=env
    )


def test_port_in_use_is_one_line_exit_1_and_never_says_listening(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 1
    line = error_line(proc)
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "address already in use" in line.lower()
    assert "listening" not in proc.stderr


def test_missing_price_file_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    proc = serve(tmp_path, env={"LLM_USAGE_PRICE_FILE": str(missing)})
    assert proc.returncode == 2
    assert f"price file not found: {missing}" in error_line(proc)


@pytest.mark.parametrize(
    ("text", "mention"),
    [
        ("models: [unclosed\n", "cannot read price file"),
        (
            "models:\n  - model: m\n    input_mtok: lots\n    output_mtok: 1\n",
            "models.0.input_mtok",
        ),
    ],
)
def test_malformed_price_file_exit_2(tmp_path: Path, text: str, mention: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    proc = serve(tmp_path, env={"LLM_USAGE_PRICE_FILE": str(path)})
    assert proc.returncode == 2
    line = error_line(proc)
    assert str(path) in line
    assert mention in line
    assert "input_value" not in line


def test_unknown_env_variable_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    proc = serve(tmp_path, env={"LLM_USAGE_MAX_USER": "5", "LLM_USAGE_ZZZ_QQQ": "1"})
    assert proc.returncode == 2
    line = error_line(proc)
    assert "LLM_USAGE_MAX_USER (did you mean LLM_USAGE_MAX_USERS?)" in line
    assert "LLM_USAGE_ZZZ_QQQ" in line


def test_short_token_is_refused_without_echoing_it(tmp_path: Path) -> None:
    tokens = [{"name": "gw", "token": SHORT_SECRET, "scopes": ["ingest"]}]
    proc = serve(tmp_path, env={"LLM_USAGE_TOKENS": json.dumps(tokens)})
    assert proc.returncode == 2
    line = error_line(proc)
    assert "tokens.0.token" in line and "16 characters" in line
    assert SHORT_SECRET not in proc.stderr


def test_tokens_that_are_not_json_are_refused_without_echoing_them(tmp_path: Path) -> None:
    proc = serve(tmp_path, env={"LLM_USAGE_TOKENS": f'[{{"name": "gw", "token": "{SECRET}"'})
    assert proc.returncode == 2
    line = error_line(proc)
    assert "tokens" in line
    assert SECRET not in proc.stderr


def test_short_token_in_config_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[[tokens]]\nname = "gw"\ntoken = "{SHORT_SECRET}"\nscopes = ["read"]\n')
    proc = serve(tmp_path, "--config", str(config))
    assert proc.returncode == 2
    assert "tokens.0.token" in error_line(proc)
    assert SHORT_SECRET not in proc.stderr


def test_public_bind_without_token_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = serve(tmp_path, "--host", "0.0.0.0")
    assert proc.returncode == 2
    assert "refusing to bind 0.0.0.0" in error_line(proc)


def test_unsupported_database_url_exit_2_without_password(tmp_path: Path) -> None:
    url = f"mysql://app:{DB_PASSWORD}@127.0.0.1/db"
    proc = serve(tmp_path, "--database-url", url)
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert "invalid database_url" in line and "postgresql+asyncpg://" in line
    assert DB_PASSWORD not in proc.stderr


def test_unreachable_database_on_db_upgrade_exit_1_without_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+asyncpg://app:{DB_PASSWORD}@127.0.0.1:{port}/db"
    proc = run_cli("db", "upgrade", "--data-dir", str(tmp_path / "d"), "--database-url", url)
    assert proc.returncode == 1
    line = error_line(proc)
    assert f"cannot migrate database postgresql+asyncpg://app:***@127.0.0.1:{port}/db" in line
    assert DB_PASSWORD not in proc.stderr


def test_plain_postgresql_url_is_taken_as_asyncpg(tmp_path: Path, pg_url: str) -> None:
    assert pg_url.startswith("postgresql+asyncpg://")
    plain = "postgresql://" + pg_url.removeprefix("postgresql+asyncpg://")
    proc = run_cli("db", "upgrade", "--data-dir", str(tmp_path / "d"), "--database-url", plain)
    assert proc.returncode == 0, proc.stderr
    assert "database is at schema" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgresql://u:p@h:5432/db", "postgresql+asyncpg://u:p@h:5432/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:////var/lib/usage.db", "sqlite+aiosqlite:////var/lib/usage.db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),  # refused at open
    ],
)
def test_database_url_without_driver_means_the_async_one(given: str, used: str) -> None:
    assert Settings(database_url=given).effective_database_url == used


def test_unusable_data_dir_is_one_line_exit_1(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    proc = run_cli("serve", "--port", str(free_port()), "--data-dir", str(not_a_dir))
    assert proc.returncode == 1
    line = error_line(proc)
    assert "cannot start: FileExistsError" in line
    assert str(not_a_dir) in line


def test_env_names_are_checked_case_insensitively_and_compose_variables_pass() -> None:
    check_env_names({"LLM_USAGE_PORT": "1", "llm_usage_max_users": "2", "PATH": "/bin"})
    check_env_names({"LLM_USAGE_DEMO_TOKEN": "x" * 20})  # docker-compose.yml's, not ours
    with pytest.raises(ValueError, match=r"llm_usage_prot \(did you mean LLM_USAGE_PORT\?\)"):
        check_env_names({"llm_usage_prot": "1"})
