"""The CLI's stdout and stderr redact whatever is written to them, line by line, and behave as the streams
they wrap; SIGTERM outside a flow run still gives the one line and exit 143."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shapline.flows import cli
from shapline.flows.cli import _RedactingStream


class Wrapped(io.StringIO):
    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 7


def test_a_credential_split_across_writes_is_redacted_once_the_line_is_complete() -> None:
    wrapped = Wrapped()
    stream = _RedactingStream(wrapped)
    stream.write("View run at: http://user:s3cr3t")
    assert wrapped.getvalue() == ""  # held until the line is complete
    stream.write("passw0rd@host/#/runs/1\nnext ")
    assert wrapped.getvalue() == "View run at: http://***@host/#/runs/1\n"
    print("token=abcdef123456", file=stream, end="")
    stream.flush()
    assert wrapped.getvalue().endswith("next token=***")
    assert stream.isatty() and stream.fileno() == 7 and stream.line_buffering
    assert stream.encoding == wrapped.encoding and not stream.closed
    assert stream.getvalue() == wrapped.getvalue()  # anything else is the wrapped stream's


def test_main_redacts_stdout_and_puts_the_streams_back(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sys.stdout, sys.stderr

    def schema(markdown: bool) -> int:
        sys.stdout.write("🏃 View run x at: http://user:s3cr3tpassw0rd@127.0.0.1:5000/#/runs/1\n")
        sys.stderr.write("password=hunter2hunter2 and no newline")
        return 0

    monkeypatch.setattr(cli, "_schema", schema)
    assert cli.main(["schema"]) == 0
    out, err = capsys.readouterr()
    assert out == "🏃 View run x at: http://***@127.0.0.1:5000/#/runs/1\n"
    assert err == "password=*** and no newline"
    assert (sys.stdout, sys.stderr) == before


def test_sigterm_before_the_flow_starts_is_the_same_one_line_and_exit_143(tmp_path: Path) -> None:
    """Here SIGTERM lands while the config is loaded (before Prefect installs its own handler)."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        import shapline.tasks.common.config as config
        from shapline.flows.cli import main

        def load_config(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the run")

        config.load_config = load_config
        sys.exit(main(["run", "any.yaml"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr == "shapline: error: terminated (SIGTERM)\n"
