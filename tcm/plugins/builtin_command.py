"""Built-in action `command.run`: run a program, stream its output, report how it exited.

The command runs under a small *group supervisor* (`SUPERVISOR`, the agent's own Python with
no site packages): the supervisor starts the command in a session, and so a process group, of
its own and ends that whole group, SIGTERM then SIGKILL after KILL_GRACE, when it is told to
(a cancel, a timeout) and when the agent dies: on Linux the supervisor asks the kernel for a
signal at the agent's death (`prctl(PR_SET_PDEATHSIG)`), so even an agent killed by SIGKILL
leaves nothing of the command behind, grandchildren included; the command's leader has the
same request for the supervisor's death. Where the supervisor cannot be run (no Python
executable known), the command runs directly and only its own process is signalled.
"""

from __future__ import annotations

import codecs
import os
import shutil
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from tcm.interfaces import ActionFailed, IActionContext, IActionHandler

DEFAULT_MAX_OUTPUT = 1024 * 1024
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL on cancel

Emit = Callable[[str, str], None]


class OutputStream:
    """One output stream of the child: the bytes kept for the result, streamed as text."""

    def __init__(self, name: str, limit: int, emit: Emit) -> None:
        self.name = name
        self.limit = limit
        self.kept = bytearray()
        self.truncated = False
        self._emit = emit
        # Incremental, so a UTF-8 character split across two reads is not streamed as two
        # replacement characters.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> None:
        """Keep and stream what fits under the limit; the rest is read and dropped."""
        room = self.limit - len(self.kept)
        cut = len(data) > room
        data = data[: max(room, 0)]
        if data:
            self.kept += data
            text = self._decoder.decode(data)
            if text:
                self._emit(self.name, text)
        if cut and not self.truncated:
            self.truncated = True
            # What is streamed stops where the result stops: a runaway `yes` must not flood
            # the server with more than the job will keep anyway.
            self._emit("log", f"{self.name} truncated at {self.limit} bytes")

    def close(self) -> None:
        """Stream what the decoder still holds (an incomplete character becomes U+FFFD)."""
        # A truncated stream ends mid-output: drop a partial character there instead.
        text = self._decoder.decode(b"", final=not self.truncated)
        if text:
            self._emit(self.name, text)

    def text(self) -> str:
        """The kept bytes as text, decoded the way they were streamed."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return decoder.decode(bytes(self.kept), final=not self.truncated)


class CommandProcess(ProcessProtocol):
    """Feeds stdin, streams and collects output; `ended` fires with the exit's reason."""

    _log = Logger()

    def __init__(self, context: IActionContext, max_output: int, stdin: bytes | None) -> None:
        self._context = context
        self._stdin = stdin
        self.streams = {
            1: OutputStream("stdout", max_output, self._emit),
            2: OutputStream("stderr", max_output, self._emit),
        }
        self.ended: Deferred[ProcessDone | ProcessTerminated] = Deferred()
        self.pid: int | None = None
        self.supervised = False  # run under the group supervisor, which ends the group
        self._killer: IDelayedCall | None = None
        self._terminating = False

    def _emit(self, stream: str, text: str) -> None:
        if self._terminating:
            # The job already ended as cancelled: what the dying command prints belongs to no
            # job the server still follows.
            return
        # An exception escaping childDataReceived would make Twisted close that pipe and the
        # child die of SIGPIPE: a failing progress report must not kill the command.
        try:
            self._context.output(stream, text)
        except Exception:
            self._log.failure("output of job {job_id} was lost", job_id=self._context.job_id)

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None  # set by spawnProcess before it calls connectionMade
        if self._stdin:
            transport.write(self._stdin)
        # Closed in every case: a command reading stdin must see EOF, not wait for ever.
        transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        stream = self.streams.get(childFD)
        if stream is not None:
            stream.feed(data)

    def processEnded(self, reason: Failure) -> None:
        for stream in self.streams.values():
            stream.close()
        if self._killer is not None and self._killer.active():
            self._killer.cancel()
        ended = reason.value
        if isinstance(ended, ProcessDone | ProcessTerminated):
            self.ended.callback(ended)
        else:  # Twisted ends a process with one of the two; anything else is a failure
            self.ended.errback(reason)

    def terminate(self) -> None:
        """End the command: SIGTERM, SIGKILL after KILL_GRACE. Under the supervisor it is the
        supervisor that ends the whole group so (SIGKILL to the supervisor itself only if it
        has not ended a while after that)."""
        self._terminating = True
        self.signal(signal.SIGTERM)
        grace = KILL_GRACE + 3.0 if self.supervised else KILL_GRACE
        self._killer = self._context.reactor.callLater(grace, self.signal, signal.SIGKILL)

    def signal(self, signum: int) -> None:
        """Send `signum` to the command (to its supervisor, which passes it to the group)."""
        if self.transport is None:
            return
        try:
            self.transport.signalProcess(signum)
        except (ProcessExitedAlready, OSError):
            pass


# Run as `python -I -S -c SUPERVISOR AGENT_PID GRACE ARGV...`. Standard library only, and no
# import of tcm: it must start fast and the job's environment must not change it.
SUPERVISOR = r"""
import os, signal, sys, time

agent, grace, argv = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
WATCHED = {signal.SIGTERM, signal.SIGCHLD}


def on_death_of_parent(signum):
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signum), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: a normal stop still ends the group (SIGTERM from the agent)


signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
on_death_of_parent(signal.SIGTERM)
if os.getppid() != agent:  # the agent died before the request above: run nothing
    sys.exit(137)
leader = os.fork()
if leader == 0:
    os.setsid()
    on_death_of_parent(signal.SIGKILL)
    for ignored in ("SIGPIPE", "SIGXFSZ"):  # Python ignores them; exec would keep that
        if hasattr(signal, ignored):
            signal.signal(getattr(signal, ignored), signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, ("cannot run %r: %s\n" % (argv[0], e)).encode())
    os._exit(127)


def group(signum):
    try:
        os.killpg(leader, signum)
    except ProcessLookupError:
        try:
            os.kill(leader, signum)  # before its setsid: the process alone
        except ProcessLookupError:
            pass


status = None
deadline = None
while True:
    if status is None:
        pid, st = os.waitpid(leader, os.WNOHANG)
        if pid == leader:
            status = st
    if status is not None:
        if deadline is None:
            break  # the command ended by itself: what it left running is its business
        try:
            os.killpg(leader, 0)
        except OSError:
            break  # stopping, and the whole group is gone
    now = time.monotonic()
    if deadline is not None and now >= deadline:
        group(signal.SIGKILL)
        deadline = now + 3600.0  # killed; only wait for the leader now
        if status is not None:
            break
    wait = None if deadline is None else max(deadline - now, 0.0)
    if status is not None:
        wait = 0.05 if wait is None else min(wait, 0.05)
    info = signal.sigtimedwait(WATCHED, wait) if wait is not None else signal.sigwaitinfo(WATCHED)
    if info is not None and info.si_signo == signal.SIGTERM and deadline is None:
        group(signal.SIGTERM)
        deadline = time.monotonic() + grace
if os.WIFSIGNALED(status):
    signum = os.WTERMSIG(status)
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    os.kill(os.getpid(), signum)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def supervised(argv: list[str]) -> list[str] | None:
    """The command line that runs `argv` under the group supervisor; None where it cannot
    run (no Python executable known, not POSIX)."""
    if not sys.executable or os.name != "posix":
        return None
    return [sys.executable, "-I", "-S", "-c", SUPERVISOR, str(os.getpid()), str(KILL_GRACE), *argv]


def find_executable(program: str, path: str, cwd: str | None) -> str | None:
    """Where `program` would be executed from, as execvp would find it; None if nowhere."""
    if os.sep in program:
        candidate = os.path.join(cwd or os.getcwd(), program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
        return None
    return shutil.which(program, path=path)


@implementer(IPlugin, IActionHandler)
class CommandAction:
    """Run a program with arguments (no shell), streaming stdout and stderr as it runs."""

    name = "command.run"
    streams = True
    task = True
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["argv"],
        "properties": {
            "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "stdin": {"type": "string"},
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "cwd": {"type": "string", "minLength": 1},
            "max_output": {"type": "integer", "minimum": 0, "default": DEFAULT_MAX_OUTPUT},
        },
        "additionalProperties": False,
    }

    def run(self, context: IActionContext, args: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Spawn the command; fires with its result, or fails with ActionFailed.

        The result: {"exit_code", "signal", "stdout", "stderr", "truncated": {"stdout",
        "stderr"}, "duration"}. A non-zero exit or death by a signal fails the job with that
        same result. Cancelling kills the command and fails with CancelledError.
        """
        argv: list[str] = list(args["argv"])
        cwd: str | None = args.get("cwd")
        max_output: int = args.get("max_output", DEFAULT_MAX_OUTPUT)
        stdin = args.get("stdin")
        # The job's variables on top of the agent's own: a command expects PATH, HOME, LANG.
        env = {**os.environ, **args.get("env", {})}
        if not argv[0]:
            raise ActionFailed("argv[0] is empty")
        if cwd is not None and not os.path.isdir(cwd):
            raise ActionFailed(f"cwd {cwd!r} is not a directory")
        # Checked here because a failed exec in the child only shows as exit code 1 or 127.
        executable = find_executable(argv[0], env.get("PATH", os.defpath), cwd)
        if executable is None:
            raise ActionFailed(f"executable not found: {argv[0]!r}")

        reactor = context.reactor
        protocol = CommandProcess(
            context, max_output, stdin.encode("utf-8") if stdin is not None else None
        )
        supervisor = supervised(argv)
        if supervisor is not None:
            # the untouched argv: the supervisor execs it with the same PATH lookup as above
            spawn_executable, spawn_args = supervisor[0], supervisor
        else:
            spawn_executable, spawn_args = executable, argv
        started = reactor.seconds()
        try:
            transport = reactor.spawnProcess(
                protocol, spawn_executable, spawn_args, env=env, path=cwd, usePTY=False
            )
        except (OSError, ValueError) as e:
            raise ActionFailed(f"cannot start {argv[0]!r}: {e}") from e
        protocol.pid = transport.pid
        protocol.supervised = supervisor is not None

        def cancel(_: Deferred[dict[str, Any]]) -> None:
            # Deferred.cancel then fails `result` with CancelledError; `finish` stays quiet.
            protocol.terminate()

        result: Deferred[dict[str, Any]] = Deferred(cancel)

        def finish(reason: ProcessDone | ProcessTerminated) -> None:
            if result.called:
                return
            outcome = {
                "exit_code": reason.exitCode,
                "signal": reason.signal,
                "stdout": protocol.streams[1].text(),
                "stderr": protocol.streams[2].text(),
                "truncated": {s.name: s.truncated for s in protocol.streams.values()},
                "duration": reactor.seconds() - started,
            }
            if reason.signal is not None:
                result.errback(ActionFailed(f"killed by signal {reason.signal}", result=outcome))
            elif reason.exitCode:
                result.errback(ActionFailed(f"exit code {reason.exitCode}", result=outcome))
            else:
                result.callback(outcome)

        protocol.ended.addCallback(finish)
        return result


command = CommandAction()
