"""The built-in action handlers: discovery, ping, inventory on this machine, command.run."""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs
import fastjsonschema
import psutil
import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

import tcm.plugins
from tcm.interfaces import ActionFailed, IActionContext, IActionHandler
from tcm.plugins import builtin_command
from tcm.plugins import builtin_inventory as inventory
from tcm.plugins.builtin_command import CommandAction, OutputStream
from tcm.plugins.builtin_inventory import InventoryAction
from tcm.plugins.builtin_ping import PingAction

BUILTINS = {"ping", "inventory.collect", "command.run"}
ACTION_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
HAS_SETSID = True  # command.run runs under its own group supervisor


@implementer(IActionContext)
@attrs.define
class RecordingContext:
    """A real IActionContext that records streamed output; `on_output` sees each chunk."""

    reactor: Any
    state_dir: FilePath
    job_id: str = "job-1"
    timeout: float | None = None
    chunks: list[tuple[str, str]] = attrs.Factory(list)
    on_output: Callable[[str, str], None] | None = None

    def output(self, stream: str, text: str) -> None:
        self.chunks.append((stream, text))
        if self.on_output is not None:
            self.on_output(stream, text)

    def streamed(self, stream: str) -> str:
        return "".join(text for s, text in self.chunks if s == stream)


@pytest.fixture
def context(tmp_path) -> RecordingContext:
    from twisted.internet import reactor

    return RecordingContext(reactor=reactor, state_dir=FilePath(str(tmp_path)))


def handlers() -> dict[str, Any]:
    return {h.name: h for h in getPlugins(IActionHandler, tcm.plugins)}


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Poll `predicate` on the real reactor; the seconds it took to become true."""
    from twisted.internet import reactor

    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true after {timeout} s")
        await deferLater(reactor, 0.02)
    return time.monotonic() - start


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- discovery -------------------------------------------------------------------------------


def test_context_double_is_an_action_context(context):
    assert verifyObject(IActionContext, context)


def test_every_builtin_is_discovered_and_verified():
    found = handlers()
    assert BUILTINS <= set(found)
    for name in BUILTINS:
        handler = found[name]
        assert verifyObject(IActionHandler, handler)
        assert ACTION_NAME.match(handler.name)
        assert isinstance(handler.streams, bool) and isinstance(handler.task, bool)
        fastjsonschema.compile(handler.schema)


def test_builtin_flags():
    found = handlers()
    assert (found["command.run"].streams, found["command.run"].task) == (True, True)
    assert (found["ping"].streams, found["ping"].task) == (False, False)


def test_schemas_accept_and_reject():
    ping = fastjsonschema.compile(PingAction.schema)
    ping({})
    ping({"echo": "hi"})
    with pytest.raises(fastjsonschema.JsonSchemaException):
        ping({"echo": 1})

    inv = fastjsonschema.compile(InventoryAction.schema)
    inv({})
    inv({"classes": ["os", "cpu"]})
    with pytest.raises(fastjsonschema.JsonSchemaException):
        inv({"classes": []})

    cmd = fastjsonschema.compile(CommandAction.schema)
    # fastjsonschema fills defaults in: the handler gets max_output either way.
    assert cmd({"argv": ["true"]})["max_output"] == 1024 * 1024
    cmd({"argv": ["sh", "-c", ""], "stdin": "x", "env": {"A": "b"}, "cwd": "/", "max_output": 0})
    for bad in ({}, {"argv": []}, {"argv": [1]}, {"argv": ["x"], "env": {"A": 1}}):
        with pytest.raises(fastjsonschema.JsonSchemaException):
            cmd(bad)


# --- ping ------------------------------------------------------------------------------------


def test_ping_answers_with_the_reactor_clock(tmp_path):
    clock = Clock()
    clock.advance(1234.5)
    ctx = RecordingContext(reactor=clock, state_dir=FilePath(str(tmp_path)))
    assert PingAction().run(ctx, {"echo": "hello"}) == {
        "pong": True,
        "time": 1234.5,
        "echo": "hello",
    }
    assert PingAction().run(ctx, {})["echo"] is None


# --- inventory: the pure collectors on this machine ------------------------------------------


def test_parse_os_release_and_family():
    text = (
        'NAME="Rocky Linux"\nID="rocky"\nID_LIKE="rhel centos fedora"\n# comment\nVERSION_ID=9.3\n'
    )
    fields = inventory.parse_os_release(text)
    assert fields == {
        "NAME": "Rocky Linux",
        "ID": "rocky",
        "ID_LIKE": "rhel centos fedora",
        "VERSION_ID": "9.3",
    }
    assert inventory.os_family("rocky", "rhel centos fedora") == "rhel"
    assert inventory.os_family("ubuntu", "debian") == "debian"
    assert inventory.os_family("linuxmint", "ubuntu debian") == "debian"
    assert inventory.os_family("debian", "") == "debian"
    assert inventory.os_family("nixos", "") == "nixos"
    assert inventory.os_family("weird", "parent other") == "parent"


def test_collect_os():
    data = inventory.collect_os()
    assert data["system"] == platform.system()
    assert data["kernel"] == platform.release()
    assert data["arch"] == platform.machine()
    assert data["name"] and data["version"] and data["family"]
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            release = inventory.parse_os_release(f.read())
        assert data["id"] == release["ID"]
        assert data["family"] in [release["ID"], *release.get("ID_LIKE", "").split()]


def test_collect_os_from_a_given_file(tmp_path):
    release = tmp_path / "os-release"
    release.write_text(
        'PRETTY_NAME="Ubuntu 24.04 LTS"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID="24.04"\n'
    )
    data = inventory.collect_os([str(tmp_path / "missing"), str(release)])
    assert (data["id"], data["family"], data["name"], data["version"]) == (
        "ubuntu",
        "debian",
        "Ubuntu 24.04 LTS",
        "24.04",
    )


def test_collect_hostname():
    data = inventory.collect_hostname()
    assert data["hostname"] == socket.gethostname()
    assert data["fqdn"]


def test_collect_cpu():
    data = inventory.collect_cpu()
    assert data["model"]
    assert data["logical"] == os.cpu_count() >= 1
    assert data["physical"] is None or 1 <= data["physical"] <= data["logical"]
    if data["freq_mhz"] is not None:
        assert data["freq_mhz"]["current"] > 0


def test_collect_memory():
    data = inventory.collect_memory()
    assert data["total"] > 64 * 1024 * 1024
    assert 0 < data["available"] <= data["total"]
    assert data["swap"]["used"] <= data["swap"]["total"]


def test_collect_disks():
    partitions = inventory.collect_disks()["partitions"]
    assert partitions, "no real filesystem found"
    for p in partitions:
        assert p["fstype"] not in inventory.PSEUDO_FILESYSTEMS
        assert p["total"] > 0 and 0 <= p["used"] <= p["total"] and 0 <= p["free"] <= p["total"]
    # The filesystem holding this test file is a real one and is reported.
    here = psutil.disk_usage(os.path.dirname(__file__)).total
    assert here in {p["total"] for p in partitions}


def test_collect_network():
    interfaces = {i["name"]: i for i in inventory.collect_network()["interfaces"]}
    assert set(interfaces) == set(psutil.net_if_addrs())
    addresses = {a["address"] for i in interfaces.values() for a in i["addresses"]}
    assert "127.0.0.1" in addresses
    for i in interfaces.values():
        assert isinstance(i["is_up"], bool)
        assert i["speed"] is None or i["speed"] > 0
    if platform.system() == "Linux":
        assert interfaces["lo"]["is_up"]
        assert any(i["mac"] for i in interfaces.values())


@pytest.mark.skipif(not os.path.exists(inventory.DPKG_STATUS_PATH), reason="no dpkg database")
def test_collect_software_from_dpkg():
    data = inventory.collect_software()
    assert data["manager"] == "dpkg"
    assert data["count"] == len(data["packages"]) > 10
    by_name = {p["name"]: p for p in data["packages"]}
    assert by_name["dpkg"]["version"] and by_name["dpkg"]["arch"]
    assert data["packages"] == sorted(
        data["packages"], key=lambda p: (p["name"], p["arch"], p["version"])
    )


def test_parse_dpkg_status():
    text = (
        "Package: a\nStatus: install ok installed\nVersion: 1.0-1\nArchitecture: amd64\n"
        "Description: short\n long line: with a colon\n .\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 2\nArchitecture: all\n\n"
        "Package: b\nStatus: hold ok installed\nArchitecture: all\nVersion: 1:2.3\n"
    )
    assert inventory.parse_dpkg_status(text.splitlines(keepends=True)) == [
        {"name": "a", "version": "1.0-1", "arch": "amd64"},
        {"name": "b", "version": "1:2.3", "arch": "all"},
    ]


def test_collect_software_without_dpkg_status(tmp_path):
    data = inventory.collect_software(str(tmp_path / "no-status"))
    if shutil.which("rpm") is None:
        assert data == {"manager": None, "count": 0, "packages": []}
    else:
        assert data["manager"] == "rpm"


def test_parse_rpm_query():
    out = "bash\t(none):5.2.15-3.fc39\tx86_64\nkernel\t1:6.5-1\tx86_64\nbroken line\n"
    assert inventory.parse_rpm_query(out) == [
        {"name": "bash", "version": "5.2.15-3.fc39", "arch": "x86_64"},
        {"name": "kernel", "version": "1:6.5-1", "arch": "x86_64"},
    ]


def test_collect_users():
    users = inventory.collect_users()["users"]
    assert len(users) == len(psutil.users())
    for u in users:
        assert u["name"] and u["started"] > 0


def test_digest_is_canonical():
    assert inventory.digest({"b": [1, 2], "a": "é"}) == inventory.digest({"a": "é", "b": [1, 2]})
    assert inventory.digest({"a": 1}) != inventory.digest({"a": 2})
    assert re.fullmatch(r"[0-9a-f]{64}", inventory.digest({}))


# --- inventory: the handler on the real reactor ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_inventory_collects_all_classes_in_a_thread(context):
    result = await InventoryAction().run(context, {})
    assert list(result["classes"]) == list(inventory.COLLECTORS)
    assert set(result["digests"]) == set(inventory.COLLECTORS)
    for name, data in result["classes"].items():
        assert result["digests"][name] == inventory.digest(data)
    assert abs(result["collected_at"] - time.time()) < 60
    assert result["classes"]["hostname"]["hostname"] == socket.gethostname()


@pytest_twisted.ensureDeferred
async def test_inventory_collects_the_chosen_classes(context):
    result = await InventoryAction().run(context, {"classes": ["memory", "os", "memory"]})
    assert list(result["classes"]) == ["memory", "os"]
    assert list(result["digests"]) == ["memory", "os"]


def test_inventory_unknown_class_fails_listing_valid_ones(context):
    with pytest.raises(ActionFailed) as info:
        InventoryAction().run(context, {"classes": ["os", "gpu"]})
    assert "gpu" in info.value.reason
    for name in inventory.COLLECTORS:
        assert name in info.value.reason


@pytest_twisted.ensureDeferred
async def test_inventory_collector_failure_keeps_what_was_collected(context, monkeypatch):
    def broken() -> dict[str, Any]:
        raise OSError("no /proc here")

    monkeypatch.setitem(inventory.COLLECTORS, "cpu", broken)
    with pytest.raises(ActionFailed) as info:
        await InventoryAction().run(context, {"classes": ["os", "cpu"]})
    assert "cpu" in info.value.reason and "no /proc here" in info.value.reason
    assert list(info.value.result["classes"]) == ["os"]
    assert "collected_at" in info.value.result


# --- command.run on the real reactor ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_command_result(context):
    result = await CommandAction().run(context, {"argv": ["echo", "hello"]})
    assert result["exit_code"] == 0 and result["signal"] is None
    assert result["stdout"] == "hello\n" and result["stderr"] == ""
    assert result["truncated"] == {"stdout": False, "stderr": False}
    assert 0 <= result["duration"] < 10
    assert context.streamed("stdout") == "hello\n"


@pytest_twisted.ensureDeferred
async def test_command_streams_output_before_it_exits(context):
    first: Deferred[str] = Deferred()

    def on_output(stream: str, text: str) -> None:
        if not first.called:
            first.callback(text)

    context.on_output = on_output
    d = CommandAction().run(context, {"argv": ["sh", "-c", "echo one; sleep 0.5; echo two"]})
    assert await first == "one\n"
    assert not d.called
    result = await d
    assert result["stdout"] == "one\ntwo\n"
    assert context.chunks == [("stdout", "one\n"), ("stdout", "two\n")]


@pytest_twisted.ensureDeferred
async def test_command_nonzero_exit_fails_with_the_result(context):
    d = CommandAction().run(context, {"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
    with pytest.raises(ActionFailed) as info:
        await d
    assert info.value.reason == "exit code 3"
    result = info.value.result
    assert (result["exit_code"], result["signal"]) == (3, None)
    assert (result["stdout"], result["stderr"]) == ("out\n", "err\n")
    assert context.streamed("stderr") == "err\n"


@pytest_twisted.ensureDeferred
async def test_command_killed_by_a_signal_fails(context):
    with pytest.raises(ActionFailed) as info:
        await CommandAction().run(context, {"argv": ["sh", "-c", "kill -9 $$"]})
    assert info.value.reason == "killed by signal 9"
    assert (info.value.result["exit_code"], info.value.result["signal"]) == (None, 9)


def test_command_missing_executable(context, tmp_path):
    with pytest.raises(ActionFailed, match="executable not found: 'no-such-program-tcm'"):
        CommandAction().run(context, {"argv": ["no-such-program-tcm", "x"]})
    with pytest.raises(ActionFailed, match="executable not found"):
        CommandAction().run(context, {"argv": [str(tmp_path / "nothing")]})
    with pytest.raises(ActionFailed, match="is not a directory"):
        CommandAction().run(context, {"argv": ["true"], "cwd": str(tmp_path / "nothing")})


@pytest_twisted.ensureDeferred
async def test_command_stdin_env_and_cwd(context, tmp_path):
    result = await CommandAction().run(
        context,
        {
            "argv": ["sh", "-c", 'cat; printf "%s|" "$TCM_TEST_VAR"; pwd'],
            "stdin": "line one\nline two\n",
            "env": {"TCM_TEST_VAR": "a b"},
            "cwd": str(tmp_path),
        },
    )
    assert result["stdout"] == f"line one\nline two\na b|{os.path.realpath(tmp_path)}\n"


@pytest_twisted.ensureDeferred
async def test_command_gets_eof_on_stdin_without_stdin(context):
    result = await CommandAction().run(context, {"argv": ["cat"]})
    assert result["stdout"] == "" and result["exit_code"] == 0


@pytest_twisted.ensureDeferred
async def test_command_max_output_truncates_each_stream(context):
    script = "yes | head -c 5000; echo err >&2"
    result = await CommandAction().run(context, {"argv": ["sh", "-c", script], "max_output": 1000})
    assert result["stdout"] == "y\n" * 500
    assert result["stderr"] == "err\n"
    assert result["truncated"] == {"stdout": True, "stderr": False}
    assert context.streamed("stdout") == "y\n" * 500
    assert "stdout truncated at 1000 bytes" in context.streamed("log")


@pytest_twisted.ensureDeferred
async def test_command_utf8_split_across_reads(context):
    # é is \303\251: printed in two writes with a pause so they arrive as two reads.
    script = r"printf '\303'; sleep 0.2; printf '\251'"
    result = await CommandAction().run(context, {"argv": ["sh", "-c", script]})
    assert result["stdout"] == "é"
    assert context.streamed("stdout") == "é"


def test_output_stream_truncates_on_a_character_boundary():
    chunks: list[tuple[str, str]] = []
    stream = OutputStream("stdout", 3, lambda s, t: chunks.append((s, t)))
    stream.feed("aé".encode())  # 3 bytes: fits exactly
    stream.feed("é".encode())
    stream.close()
    assert stream.text() == "aé" and stream.truncated
    stream = OutputStream("stdout", 2, lambda s, t: chunks.append((s, t)))
    stream.feed("aé".encode())  # the limit cuts é in half: dropped, not U+FFFD
    stream.close()
    assert stream.text() == "a"


@pytest_twisted.ensureDeferred
async def test_cancel_kills_the_command_promptly_and_fires_once(context):
    errors: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("isError") or "log_failure" in event:
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        first: Deferred[str] = Deferred()
        context.on_output = lambda s, t: None if first.called else first.callback(t)
        d = CommandAction().run(context, {"argv": ["sh", "-c", "echo $$; exec sleep 30"]})
        pid = int(await first)
        if HAS_SETSID:
            assert os.getpgid(pid) == pid  # leads a process group of its own
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        # Well under KILL_GRACE: SIGTERM did it.
        assert await eventually(lambda: pid_gone(pid)) < 1.5
        await deferLater(context.reactor, 0.1)  # let processEnded run after the cancel
    finally:
        globalLogPublisher.removeObserver(observer)
    assert errors == []


@pytest.mark.skipif(not HAS_SETSID, reason="no setsid(1): only the command itself is killed")
@pytest_twisted.ensureDeferred
async def test_cancel_kills_grandchildren(context):
    first: Deferred[str] = Deferred()
    context.on_output = lambda s, t: None if first.called else first.callback(t)
    d = CommandAction().run(context, {"argv": ["sh", "-c", "sleep 30 & echo $!; wait"]})
    grandchild = int(await first)
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert await eventually(lambda: pid_gone(grandchild)) < 1.5


@pytest.mark.skipif(not HAS_SETSID, reason="no setsid(1)")
@pytest_twisted.ensureDeferred
async def test_cancel_escalates_to_sigkill(context):
    first: Deferred[str] = Deferred()
    context.on_output = lambda s, t: None if first.called else first.callback(t)
    script = "trap '' TERM; echo $$; while :; do sleep 0.1; done"
    d = CommandAction().run(context, {"argv": ["sh", "-c", script]})
    pid = int(await first)
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    took = await eventually(lambda: pid_gone(pid), timeout=6)
    assert 1.5 < took < 5


@pytest_twisted.ensureDeferred
async def test_cancel_without_supervisor_kills_the_command(context, monkeypatch):
    monkeypatch.setattr(builtin_command, "supervised", lambda argv: None)
    first: Deferred[str] = Deferred()
    context.on_output = lambda s, t: None if first.called else first.callback(t)
    d = CommandAction().run(context, {"argv": ["sh", "-c", "echo $$; exec sleep 30"]})
    pid = int(await first)
    assert os.getpgid(pid) == os.getpgid(0)  # really not in a group of its own
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert await eventually(lambda: pid_gone(pid)) < 1.5


@pytest_twisted.ensureDeferred
async def test_nothing_is_streamed_after_cancel(context):
    first: Deferred[str] = Deferred()
    context.on_output = lambda s, t: None if first.called else first.callback(t)
    script = "trap 'echo bye; exit 0' TERM; echo $$; while :; do sleep 0.1; done"
    d = CommandAction().run(context, {"argv": ["sh", "-c", script]})
    pid = int(await first)
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    await eventually(lambda: pid_gone(pid))
    await deferLater(context.reactor, 0.1)
    assert context.chunks == [("stdout", f"{pid}\n")]


@pytest_twisted.ensureDeferred
async def test_inventory_sends_only_classes_whose_digest_is_not_known(context):
    first = await InventoryAction().run(context, {"classes": ["os", "hostname", "cpu"]})
    assert first["unchanged"] == []
    known = {
        "os": first["digests"]["os"],  # one digest, as a string
        "hostname": ["0" * 64, first["digests"]["hostname"]],  # among others (a list)
        "cpu": ["0" * 64],  # not this agent's: sent in full
    }
    second = await InventoryAction().run(
        context, {"classes": ["os", "hostname", "cpu"], "known": known}
    )
    assert second["unchanged"] == ["os", "hostname"]
    assert list(second["classes"]) == ["cpu"]
    assert set(second["digests"]) == {"os", "hostname", "cpu"}
    assert second["digests"]["os"] == first["digests"]["os"]


def test_inventory_schema_takes_known_digests():
    check = fastjsonschema.compile(InventoryAction.schema)
    check({"classes": ["os"], "known": {"os": "ab", "cpu": ["cd", "ef"]}})
    with pytest.raises(fastjsonschema.JsonSchemaException):
        check({"known": {"os": 3}})
    with pytest.raises(fastjsonschema.JsonSchemaException):
        check({"known": ["os"]})


def test_server_knows_the_same_inventory_classes_and_digest():
    from tcm.server import inventory as server_inventory

    assert server_inventory.CLASSES == tuple(inventory.COLLECTORS)
    data = {"b": [1, 2], "a": "é"}
    assert server_inventory.digest(data) == inventory.digest(data)


def test_inventory_known_digest_prefixes_name_unchanged_classes_compactly():
    collectors = {"os": lambda: {"name": "debian"}, "cpu": lambda: [4]}
    full = inventory.digest({"name": "debian"})
    got = inventory.collect(["os", "cpu"], {"os": full[:16], "cpu": "0" * 16}, collectors)
    assert got["unchanged"] == ["os"] and list(got["classes"]) == ["cpu"]
    assert got["digests"] == {"cpu": inventory.digest([4])}  # a prefix is not sent back
    # a prefix shorter than 16 hex digits names nothing: the class is sent
    got = inventory.collect(["os"], {"os": full[:8]}, collectors)
    assert got["unchanged"] == [] and got["digests"]["os"] == full
    # a whole digest (an older server's refresh) is sent back, as that server expects
    got = inventory.collect(["os"], {"os": [full]}, collectors)
    assert got["unchanged"] == ["os"] and got["digests"] == {"os": full}


def test_inventory_schedule_runs_with_the_digests_the_server_said_it_holds():
    from twisted.internet.defer import succeed
    from zope.interface import implementer

    from tcm.interfaces import IPolicyContext
    from tcm.plugins.builtin_policies import inventory_schedule

    @implementer(IPolicyContext)
    class Context:
        policy, version, restored, reactor, state_dir = "inv", 1, False, None, None

        def __init__(self):
            self.runs = []
            self.answers = [{"stored": 1, "inventory_known": {"os": "ab" * 8}}, {"stored": 1}, None]

        def schedule(self, spec, run, now=False):
            self.run = run
            return self

        def stop(self):
            pass

        def run_action(self, name, args):
            self.runs.append((name, args))
            return succeed({"classes": {}, "digests": {}, "unchanged": []})

        def report(self, result=None, error=None):
            return succeed(self.answers.pop(0))

        def set_agent_settings(self, settings):
            pass

    context = Context()
    inventory_schedule.apply(context, {"every": 3600, "classes": ["os"]})
    context.run()
    context.run()  # the server's answer to the first report is this run's `known`
    context.run()  # an answer without inventory_known leaves what was learnt
    assert context.runs == [
        ("inventory.collect", {"classes": ["os"]}),
        ("inventory.collect", {"classes": ["os"], "known": {"os": "ab" * 8}}),
        ("inventory.collect", {"classes": ["os"], "known": {"os": "ab" * 8}}),
    ]
