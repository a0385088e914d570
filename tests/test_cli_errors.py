"""The command lines end with one clear line, not a traceback: a CA certificate file that is
missing or not one, and a reader that closed the pipe (`tcm-agent info | head -1`)."""

from __future__ import annotations

import subprocess

from tcm.cli.api import CLOSED_PIPE
from tests.harness import PYTHON

TWISTD = [PYTHON, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_tcm_with_a_missing_or_bad_ca_cert(tmp_path):
    missing = str(tmp_path / "nope.pem")
    r = run(PYTHON, "-m", "tcm.cli.admin", "--url", "https://127.0.0.1:1", "--ca-cert", missing,
            "--token", "x", "agents")  # fmt: skip
    assert r.returncode == 2
    one_line_error(r, f"--ca-cert {missing}", "No such file or directory")
    assert len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    r = run(PYTHON, "-m", "tcm.cli.admin", "--url", "https://127.0.0.1:1", "--ca-cert", str(bad),
            "--token", "x", "jobs", "list")  # fmt: skip
    assert r.returncode == 2
    one_line_error(r, "not a PEM CA certificate")


def test_tcm_agent_with_a_missing_ca_cert(tmp_path):
    missing = str(tmp_path / "nope.pem")
    r = run(PYTHON, "-m", "tcm.cli.agent", "swarm", "--count", "1", "--server",
            "https://127.0.0.1:1", "--ca-cert", missing, "--token", "t",
            "--state-dir", str(tmp_path / "swarm"))  # fmt: skip
    assert r.returncode == 2
    one_line_error(r, f"--ca-cert {missing}", "No such file or directory")
    r = run(*TWISTD, "tcm-agent", "--state-dir", str(tmp_path / "a"), "--server",
            "https://127.0.0.1:1", "--ca-cert", missing, "--token", "t")  # fmt: skip
    assert r.returncode != 0
    assert "Traceback" not in r.stdout + r.stderr
    assert f"--ca-cert {missing}: cannot read it" in r.stdout + r.stderr  # twistd: on stdout


def closed_reader(*argv: str) -> subprocess.CompletedProcess:
    """Run with a stdout pipe whose reader is gone before the first byte is written."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(60)
    return subprocess.CompletedProcess(argv, proc.returncode, "", err)


def test_tcm_agent_output_to_a_closed_pipe_ends_quietly(tmp_path):
    r = closed_reader(PYTHON, "-m", "tcm.cli.agent", "--state-dir", str(tmp_path), "info")
    assert r.returncode == CLOSED_PIPE
    assert r.stderr == ""
