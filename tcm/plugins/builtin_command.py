"""Built-in action `command.run`: run a program, stream its output, report how it exited.

The child runs in a session (and so a process group) of its own when util-linux/busybox
`setsid` is on the agent's PATH, so cancelling the job kills whatever the command started
too, not only its first process; without `setsid` only that process is signalled.
"""

from __future__ import annotations

import codecs
import os
import shutil
import signal
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
        self.own_group = False
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
        if self._killer is not None and self._killer.active() and not self._group_alive():
            self._killer.cancel()
        ended = reason.value
        if isinstance(ended, ProcessDone | ProcessTerminated):
            self.ended.callback(ended)
        else:  # Twisted ends a process with one of the two; anything else is a failure
            self.ended.errback(reason)

    def terminate(self) -> None:
        """SIGTERM the command (its whole group when it has one), SIGKILL after KILL_GRACE."""
        self._terminating = True
        self.signal(signal.SIGTERM)
        self._killer = self._context.reactor.callLater(KILL_GRACE, self.signal, signal.SIGKILL)

    def signal(self, signum: int) -> None:
        """Send `signum` to the command's process group, else to its process."""
        if self.own_group and self.pid is not None:
            try:
                os.killpg(self.pid, signum)
                return
            except ProcessLookupError:
                # Either setsid(1) has not run yet (no such group: signal the process), or the
                # group is empty and the process reaped (signalProcess sees that below).
                pass
        if self.transport is None:
            return
        try:
            self.transport.signalProcess(signum)
        except (ProcessExitedAlready, OSError):
            pass

    def _group_alive(self) -> bool:
        # Grandchildren that outlive the command keep the group; they still get SIGKILL.
        if not (self.own_group and self.pid is not None):
            return False
        try:
            os.killpg(self.pid, 0)
        except OSError:
            return False
        return True


def find_setsid() -> str | None:
    """The setsid(1) program on the agent's PATH, if any."""
    return shutil.which("setsid")


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
        setsid = find_setsid()
        if setsid is not None:
            # "--" and the untouched argv: setsid execs it with the same PATH lookup as above.
            spawn_executable, spawn_args = setsid, [setsid, "--", *argv]
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
        protocol.own_group = setsid is not None

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
