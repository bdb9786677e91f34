"""Process-level faults with the real console script: a second `serve` on the same data dir,
SIGKILL then a retry of the same batch, and reports outside the dedupe window."""

from __future__ import annotations

import signal
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from faultkit import Service, check_database, make_reports
from helpers import clean_env, cli_command, total, value

pytestmark = pytest.mark.slow


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"


def test_second_serve_on_the_same_data_dir_refuses_and_the_first_keeps_its_wal(
    tmp_path: Path,
) -> None:
    first = Service(tmp_path / "a", tmp_path / "data", sqlite_url(tmp_path),
                    env={"LLM_USAGE_FLUSH_INTERVAL": "3600"})  # fmt: skip
    first.start()
    try:
        first.wait_ready()
        reports = make_reports(100, "lock")
        status, answer = first.post(reports)
        assert status == 202 and answer["accepted"] == 100
        wal_files = sorted((tmp_path / "data" / "wal").iterdir())
        before = {p.name: p.read_bytes() for p in wal_files}

        args = ["serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                "--database-url", sqlite_url(tmp_path)]  # fmt: skip
        second = subprocess.run([*cli_command(), *args], capture_output=True, text=True,
                                env=clean_env(), timeout=60)  # fmt: skip
        assert second.returncode == 1
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert f"pid {first.proc.proc.pid}" in lines[0] and "in use" in lines[0]
        # the first one's WAL is untouched and it keeps serving
        after = {p.name: p.read_bytes() for p in sorted((tmp_path / "data" / "wal").iterdir())}
        assert after == before and sum(map(len, after.values())) > 0
        more = make_reports(10, "lock-more")
        assert first.post(more)[0] == 202
    finally:
        assert first.stop() == 0
    check_database(sqlite_url(tmp_path), reports + more)


def test_sigkill_restart_retry_is_counted_once_live_and_stored_once(tmp_path: Path) -> None:
    service = Service(tmp_path / "svc", tmp_path / "data", sqlite_url(tmp_path),
                      env={"LLM_USAGE_FLUSH_INTERVAL": "3600"})  # fmt: skip
    service.start()
    service.wait_ready()
    reports = make_reports(300, "kill")
    status, answer = service.post(reports)
    assert status == 202 and answer == {"accepted": 300, "duplicates": 0, "rejected": 0,
                                        "errors": []}  # fmt: skip
    service.proc.stop(signal.SIGKILL)  # before any flush: the reports live only in the WAL
    service.start()
    try:
        # the client never saw the 202 (say) and retries the same batch after the restart
        status, answer = service.post(reports)
        assert status == 202
        assert answer["accepted"] == 0 and answer["duplicates"] == 300
        m = service.metrics()
        assert total(m, "llm_requests_total") == 0, "a replayed report is not counted again"
        assert value(m, "llm_usage_reports_duplicate_total") == 300
        assert value(m, "llm_usage_pending_reports") in (0, 300)  # replayed, maybe flushed
        fresh = make_reports(5, "kill-new")
        assert service.post(fresh)[1]["accepted"] == 5
        assert total(service.metrics(), "llm_input_tokens_total") == sum(
            r["input_tokens"] for r in fresh
        )
        service.wait_ready()  # migrated: the SIGTERM below runs the final flush
    finally:
        assert service.stop() == 0
    check_database(sqlite_url(tmp_path), reports + fresh)
    assert "Traceback" not in service.logs()


def test_report_older_than_the_window_is_refused_even_after_retention_ran(
    tmp_path: Path,
) -> None:
    env = {"LLM_USAGE_RETENTION_DAYS": "3", "LLM_USAGE_MAX_REPORT_AGE_DAYS": "2",
           "LLM_USAGE_MAX_FUTURE_SKEW_SECONDS": "600"}  # fmt: skip
    service = Service(tmp_path / "svc", tmp_path / "data", sqlite_url(tmp_path), env=env)
    service.start()
    service.wait_ready()
    recent = make_reports(20, "in-window", age=timedelta(days=1))
    old = make_reports(7, "too-old", age=timedelta(days=2, hours=1))
    ahead = make_reports(3, "ahead", age=-timedelta(hours=1))
    try:
        status, answer = service.post(recent + old + ahead)
        assert status == 202 and answer["accepted"] == len(recent)
        reasons = [e["error"] for e in answer["errors"]]
        assert [e["index"] for e in answer["errors"]] == list(
            range(len(recent), len(recent) + len(old) + len(ahead))
        )
        assert all("max_report_age" in r for r in reasons[: len(old)])
        assert all("max_future_skew" in r for r in reasons[len(old) :])
        status, answer = service.post(old)  # all refused: 422, never 202
        assert status == 422 and answer["rejected"] == len(old)
    finally:
        assert service.stop() == 0
    service.start()  # retention runs at start; the old reports are re-sent and still refused
    try:
        service.wait_ready()
        status, answer = service.post(old)
        assert status == 422 and answer["rejected"] == len(old)
        m = service.metrics()
        assert value(m, "llm_usage_reports_rejected_total", reason="too_old") == len(old)
        assert value(m, "llm_usage_reports_rejected_total", reason="too_far_in_future") == 0
    finally:
        assert service.stop() == 0
    check_database(sqlite_url(tmp_path), recent)


def test_window_not_shorter_than_retention_refuses_to_start(tmp_path: Path) -> None:
    env = clean_env({"LLM_USAGE_RETENTION_DAYS": "30", "LLM_USAGE_MAX_REPORT_AGE_DAYS": "30"})
    args = ["serve", "--data-dir", str(tmp_path / "data")]
    done = subprocess.run([*cli_command(), *args], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "max_report_age_days (30) must be shorter than retention_days (30)" in done.stderr
