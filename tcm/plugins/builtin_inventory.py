"""Built-in action `inventory.collect`: hardware, OS, network and software facts of an endpoint.

Each data class has a pure, blocking collector function (`collect_os`, `collect_disks`, ...)
that tests call directly; the handler runs the chosen ones in the reactor's thread pool so
reading /proc, the dpkg database or `rpm` never blocks the agent's reactor.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from tcm.interfaces import ActionFailed, IActionContext, IActionHandler

OS_RELEASE_PATHS = ("/etc/os-release", "/usr/lib/os-release")
DPKG_STATUS_PATH = "/var/lib/dpkg/status"

# Families an operator targets by ("all debian-like hosts"). Derivatives name them in ID_LIKE,
# often after a closer relative (rocky: "rhel centos fedora", mint: "ubuntu debian"), so the
# first known root wins over the first word.
KNOWN_FAMILIES = ("debian", "rhel", "suse", "arch", "alpine", "gentoo", "fedora")

# Filesystems with no capacity worth reporting: kernel interfaces, RAM-backed mounts, and
# squashfs images (snaps), which are read-only and always 100% full.
PSEUDO_FILESYSTEMS = frozenset(
    {
        "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devfs",
        "devpts", "devtmpfs", "efivarfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "none",
        "proc", "pstore", "ramfs", "rpc_pipefs", "securityfs", "selinuxfs", "squashfs",
        "sysfs", "tmpfs", "tracefs",
    }
)  # fmt: skip

RPM_QUERY_FORMAT = "%{NAME}\t%{EPOCH}:%{VERSION}-%{RELEASE}\t%{ARCH}\n"


def parse_os_release(text: str) -> dict[str, str]:
    """Parse os-release(5) text (KEY=value lines, optionally quoted) into a dict."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        fields[key.strip()] = value
    return fields


def os_family(os_id: str, id_like: str) -> str:
    """The family of a distribution from its os-release ID and ID_LIKE."""
    candidates = [os_id.lower(), *id_like.lower().split()]
    for candidate in candidates:
        if candidate in KNOWN_FAMILIES:
            return candidate
    words = id_like.lower().split()
    return words[0] if words else os_id.lower()


def collect_os(os_release_paths: Sequence[str] = OS_RELEASE_PATHS) -> dict[str, Any]:
    """Operating system: kernel name, distribution family/name/version, kernel release, arch."""
    release: dict[str, str] = {}
    for path in os_release_paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                release = parse_os_release(f.read())
            break
        except OSError:
            continue
    system = platform.system()
    os_id = release.get("ID", system.lower())
    return {
        "system": system,
        "id": os_id,
        "id_like": release.get("ID_LIKE", "").split(),
        "family": os_family(os_id, release.get("ID_LIKE", "")),
        "name": release.get("PRETTY_NAME") or release.get("NAME") or system,
        "version": release.get("VERSION_ID") or platform.version(),
        "kernel": platform.release(),
        "arch": platform.machine(),
    }


def collect_hostname() -> dict[str, Any]:
    """Host name and fully qualified domain name."""
    return {"hostname": socket.gethostname(), "fqdn": socket.getfqdn()}


def _cpu_model() -> str:
    # psutil has no CPU model; /proc/cpuinfo names it differently per architecture.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model", "Processor"):
                    if value.strip():
                        return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_cpu() -> dict[str, Any]:
    """CPU model, logical and physical core counts, frequency in MHz (None where unknown)."""
    import psutil  # here, not at import: an idle agent does not load it

    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError):
        freq = None
    return {
        "model": _cpu_model(),
        "logical": psutil.cpu_count(logical=True),
        "physical": psutil.cpu_count(logical=False),
        "freq_mhz": (
            {"current": freq.current, "min": freq.min or None, "max": freq.max or None}
            if freq is not None
            else None
        ),
    }


def collect_memory() -> dict[str, Any]:
    """Physical memory and swap, in bytes."""
    import psutil  # here, not at import: an idle agent does not load it

    vm = psutil.virtual_memory()
    swap = psutil.swap_memory()
    return {
        "total": vm.total,
        "available": vm.available,
        "used": vm.used,
        "percent": vm.percent,
        "swap": {"total": swap.total, "used": swap.used, "free": swap.free},
    }


def collect_disks() -> dict[str, Any]:
    """Mounted filesystems with their capacity in bytes, skipping pseudo filesystems."""
    import psutil  # here, not at import: an idle agent does not load it

    partitions = []
    # all=True and our own filter: psutil's all=False drops "nodev" filesystems, which in a
    # container includes the overlay root, the one disk that matters there.
    for part in psutil.disk_partitions(all=True):
        if not part.fstype or part.fstype in PSEUDO_FILESYSTEMS:
            continue
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue  # unreadable or gone since the mount table was read
        partitions.append(
            {
                "device": part.device,
                "mountpoint": part.mountpoint,
                "fstype": part.fstype,
                "total": usage.total,
                "used": usage.used,
                "free": usage.free,
            }
        )
    return {"partitions": partitions}


def _address_family(family: int) -> str:
    if family == socket.AF_INET:
        return "ipv4"
    if family == socket.AF_INET6:
        return "ipv6"
    return str(family)


def collect_network() -> dict[str, Any]:
    """Network interfaces: IP addresses, MAC, whether up, link speed (Mbit/s, None unknown)."""
    import psutil  # here, not at import: an idle agent does not load it

    stats = psutil.net_if_stats()
    interfaces = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        mac = None
        addresses = []
        for addr in addrs:
            if addr.family == psutil.AF_LINK:
                mac = addr.address
                continue
            addresses.append(
                {
                    "family": _address_family(addr.family),
                    "address": addr.address,
                    "netmask": addr.netmask,
                    "broadcast": addr.broadcast,
                }
            )
        stat = stats.get(name)
        interfaces.append(
            {
                "name": name,
                "addresses": addresses,
                "mac": mac,
                "is_up": stat.isup if stat else None,
                # psutil reports 0 when the driver does not know the speed.
                "speed": (stat.speed or None) if stat else None,
                "mtu": stat.mtu if stat else None,
            }
        )
    return {"interfaces": interfaces}


def parse_dpkg_status(lines: Iterable[str]) -> list[dict[str, str]]:
    """Installed packages (name, version, arch) from the text of dpkg's status file."""
    packages = []
    fields: dict[str, str] = {}

    def finish() -> None:
        # Removed-but-not-purged packages stay in the file as "deinstall ok config-files".
        if fields.get("Package") and fields.get("Status", "").endswith(" installed"):
            packages.append(
                {
                    "name": fields["Package"],
                    "version": fields.get("Version", ""),
                    "arch": fields.get("Architecture", ""),
                }
            )

    for line in lines:
        if not line.strip():
            finish()
            fields = {}
        elif not line[0].isspace():  # continuation lines belong to long fields we skip
            key, _, value = line.partition(":")
            if key in ("Package", "Status", "Version", "Architecture"):
                fields[key] = value.strip()
    finish()
    return packages


def parse_rpm_query(output: str) -> list[dict[str, str]]:
    """Packages from `rpm -qa --qf RPM_QUERY_FORMAT` output."""
    packages = []
    for line in output.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        name, version, arch = parts
        if version.startswith("(none):"):
            version = version[len("(none):") :]
        packages.append({"name": name, "version": version, "arch": arch})
    return packages


def collect_software(dpkg_status_path: str = DPKG_STATUS_PATH) -> dict[str, Any]:
    """Installed packages from the platform package database: dpkg, else rpm, else none."""
    if os.path.exists(dpkg_status_path):
        # Reading the status file directly is far faster than running dpkg-query.
        with open(dpkg_status_path, encoding="utf-8", errors="replace") as f:
            packages = parse_dpkg_status(f)
        manager: str | None = "dpkg"
    elif rpm := shutil.which("rpm"):
        completed = subprocess.run(
            [rpm, "-qa", "--qf", RPM_QUERY_FORMAT],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=120,
            check=True,
        )
        packages = parse_rpm_query(completed.stdout)
        manager = "rpm"
    else:
        packages, manager = [], None
    # Sorted so the digest changes only when the installed set does.
    packages.sort(key=lambda p: (p["name"], p["arch"], p["version"]))
    return {"manager": manager, "count": len(packages), "packages": packages}


def collect_users() -> dict[str, Any]:
    """Users logged in now (from utmp)."""
    import psutil  # here, not at import: an idle agent does not load it

    return {
        "users": [
            {
                "name": u.name,
                "terminal": u.terminal,
                "host": u.host,
                "started": u.started,
                "pid": getattr(u, "pid", None),
            }
            for u in psutil.users()
        ]
    }


COLLECTORS: dict[str, Callable[[], dict[str, Any]]] = {
    "os": collect_os,
    "hostname": collect_hostname,
    "cpu": collect_cpu,
    "memory": collect_memory,
    "disks": collect_disks,
    "network": collect_network,
    "software": collect_software,
    "users": collect_users,
}


def digest(data: Any) -> str:
    """SHA-256 hex of the canonical JSON of `data`: equal data, equal digest on every agent."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# A known digest shorter than this is not trusted to name a version (the server sends
# the first 16 hex digits: 64 bits, enough to tell one agent's versions of a class apart).
MIN_KNOWN_DIGEST = 16


def matching_known(full: str, known: str | Sequence[str]) -> str | None:
    """The known value (one, or any of a list) that names the digest `full` (equal, or a
    prefix of at least MIN_KNOWN_DIGEST hex digits), or None."""
    for value in [known] if isinstance(known, str) else known:
        if len(value) >= MIN_KNOWN_DIGEST and full.startswith(value):
            return value
    return None


def collect(
    classes: Sequence[str],
    known: Mapping[str, str | Sequence[str]] | None = None,
    collectors: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """Run the named collectors (blocking); returns {"classes", "digests", "unchanged"}.

    `classes` has the data of each class whose digest is not among the `known` digests of
    that class (the server holds that data already), and `unchanged` names the others.
    `digests` has the digest of each class sent, and of each unchanged class the server
    named by its whole digest (older servers read unchanged classes from there); one the
    server named by a prefix is only named in `unchanged`, so the answer stays small.
    Raises ActionFailed, with what was collected as its result, when a
    collector fails.
    """
    known = known or {}
    collectors = COLLECTORS if collectors is None else collectors
    sent: dict[str, Any] = {}
    digests: dict[str, str] = {}
    unchanged: list[str] = []

    def result() -> dict[str, Any]:
        return {"classes": sent, "digests": digests, "unchanged": unchanged}

    for name in classes:
        try:
            data = collectors[name]()
        except Exception as e:
            raise ActionFailed(f"collecting {name!r} failed: {e!r}", result=result()) from e
        full = digest(data)
        matched = matching_known(full, known.get(name, ()))
        if matched is not None:
            if len(matched) == len(full):  # a server that sent whole digests wants them back
                digests[name] = matched
            unchanged.append(name)
        else:
            digests[name] = full
            sent[name] = data
        del data  # one class's data at a time beyond what is sent
    return result()


@implementer(IPlugin, IActionHandler)
class InventoryAction:
    """Collect inventory data classes (all by default) with a digest of each; classes whose
    digest the server says it knows come back as their digest only."""

    name = "inventory.collect"
    streams = False
    task = False
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            # No enum: an unknown name gets ActionFailed listing the valid ones instead.
            "classes": {
                "type": "array",
                "items": {"type": "string", "maxLength": 64},
                "minItems": 1,
                "maxItems": 64,
            },
            # class -> the digest(s) the server holds for it: such a class comes back as its
            # digest only, named in `unchanged` (a list: one job asks many agents)
            "known": {
                "type": "object",
                "maxProperties": 64,
                "additionalProperties": {
                    "anyOf": [
                        {"type": "string", "maxLength": 64},
                        {
                            "type": "array",
                            "items": {"type": "string", "maxLength": 64},
                            "maxItems": 256,
                        },
                    ]
                },
            },
        },
        "additionalProperties": False,
    }

    def collectors(self, context: IActionContext) -> Mapping[str, Callable[[], Any]]:
        """The collector of each class: this machine's (a load generator's swarm gives each
        of its agents data of its own, tcm/agent/swarm.py)."""
        return COLLECTORS

    def run(self, context: IActionContext, args: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """Collect in the reactor's thread pool: {"classes", "collected_at", "digests",
        "unchanged"}."""
        requested = args.get("classes")
        classes = list(COLLECTORS) if requested is None else list(dict.fromkeys(requested))
        unknown = [name for name in classes if name not in COLLECTORS]
        if unknown:
            raise ActionFailed(
                f"unknown inventory class(es) {', '.join(unknown)}; "
                f"valid classes: {', '.join(COLLECTORS)}"
            )
        known = {
            name: [value] if isinstance(value, str) else list(value)
            for name, value in (args.get("known") or {}).items()
        }
        reactor = context.reactor
        collectors = self.collectors(context)
        d = deferToThreadPool(reactor, reactor.getThreadPool(), collect, classes, known, collectors)

        def stamp(result: dict[str, Any]) -> dict[str, Any]:
            # Stamped back on the reactor thread, with the reactor's clock.
            return {**result, "collected_at": float(reactor.seconds())}

        def stamp_partial(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, ActionFailed):
                error.result["collected_at"] = float(reactor.seconds())
            return failure

        return d.addCallbacks(stamp, stamp_partial)


inventory = InventoryAction()
