"""Upstream links and the gateway's routing: which upstream serves an agent.

`UpstreamLinks` is the table of a node's configured upstreams and the live link of each (a
task server has one, "server"; a gateway one per `--upstream NAME=URL`). `GatewayRouting`
knows what each welcome said: which server an upstream leads to (agents are routed by the
server named in their certificate), which upstreams are task servers and whose (an agent's
task session at /taskserver/NAME/... goes to task server NAME).
"""

from __future__ import annotations

from typing import Any

UPSTREAM_PREFIX = "/upstream/"  # /upstream/NAME/...: the agent names its server's upstream
TASK_SERVER_PREFIX = "/taskserver/"  # /taskserver/NAME/task/v1/ws: through to task server NAME

Refusal = tuple[int, str]  # HTTP status, reason


class UpstreamLinks:
    """Configured upstreams (the first is the default) and the link of each once welcomed."""

    def __init__(self, names: list[str]):
        if not names:
            raise ValueError("a relay node needs an upstream")
        self.names = list(names)
        self._links: dict[str, Any] = {}

    @property
    def default(self) -> str:
        return self.names[0]

    def get(self, name: str | None) -> Any:
        """The link to upstream `name` if it is up, else None."""
        return self._links.get(name) if name is not None else None

    def is_up(self, name: str) -> bool:
        return name in self._links

    def up(self, name: str, link: Any) -> None:
        self._links[name] = link

    def down(self, name: str, link: Any = None) -> bool:
        """Upstream `name` has no link now (when `link` is given: if it is still that one)."""
        if link is not None and self._links.get(name) is not link:
            return False  # an older link's loss, after a newer one came up
        self._links.pop(name, None)
        return True


class GatewayRouting:
    """Which upstream of a gateway serves an agent, from what the upstreams' welcomes said."""

    def __init__(self, links: UpstreamLinks, task_server_upstreams: list[str]):
        self.links = links
        self.ts_names = set(task_server_upstreams)  # configured upstreams that are task servers
        self.servers: dict[str, str] = {}  # server name (its welcome) -> upstream name
        self.task_servers: dict[str, str] = {}  # task server (its welcome) -> upstream name
        self.ts_server: dict[str, str | None] = {}  # task server upstream -> its server

    def _servers(self) -> list[str]:
        return [n for n in self.links.names if n not in self.ts_names]

    def accept(self, name: str, server: str | None, role: str, node: str | None) -> str | None:
        """Upstream `name` welcomed this link (`role` "server" or "taskserver", with the
        server's and the task server's names); why the link cannot be used, or None."""
        if role == "taskserver":
            if name not in self.ts_names:
                return (
                    f"upstream {name!r} is task server {node!r}, not a management server: "
                    "give the management server's URL"
                )
            if not node:
                return f"task server upstream {name!r} did not say its name"
            other = self.task_servers.get(node)
            if other is not None and other != name and self.links.is_up(other):
                return f"upstreams {other!r} and {name!r} both lead to task server {node!r}"
            self.task_servers[node] = name
            self.ts_server[name] = server
            return None
        if name in self.ts_names:
            return (
                f"upstream {name!r} is a management server, not a task server: enroll with "
                f"it (--upstream-token {name}=TOKEN from `tcm gateways enroll`)"
            )
        if server is not None:
            other = self.servers.get(server)
            if other is not None and other != name and self.links.is_up(other):
                return f"upstreams {other!r} and {name!r} both lead to server {server!r}"
            self.servers[server] = name
        return None

    def forget(self, name: str) -> bool:
        """Upstream `name`'s link is gone: a task server's is no longer reachable. True when
        that changes what the gateway reaches."""
        if name not in self.ts_names:
            return False
        for node in [n for n, up in self.task_servers.items() if up == name]:
            del self.task_servers[node]
        return True

    def reach(self, only: str | None = None) -> dict[str, list[str]]:
        """Which task servers each linked management server's agents can reach through this
        gateway now: {upstream name: [task server, ...]} (only `only`'s, if given)."""
        if not self.ts_names:
            return {}  # no task server upstreams: nothing to announce
        out = {}
        for server, name in self.servers.items():
            if not self.links.is_up(name) or (only is not None and name != only):
                continue
            out[name] = sorted(
                node
                for node, up in self.task_servers.items()
                if self.links.is_up(up) and self.ts_server.get(up) == server
            )
        return out

    def lists_of(self, upstream: str) -> str:
        """Whose revoked/pending lists apply on an upstream: a task server's server's."""
        if upstream in self.ts_names:
            return self.servers.get(self.ts_server.get(upstream) or "", upstream)
        return upstream

    def route(self, server: str | None, wanted: str | None = None) -> tuple[str | None, Any]:
        """Which upstream an agent goes to: (name, None), or (None, (status, reason)).

        `server` is the server named in the agent's certificate; `wanted` the upstream named
        in the URL (/upstream/NAME/...), the only way for an agent not enrolled yet."""
        if wanted is not None:
            if wanted not in self.links.names:
                return None, (404, f"no upstream {wanted!r} at this gateway")
            if wanted in self.ts_names:
                return None, (404, f"upstream {wanted!r} is a task server, not a server")
            belongs = self.servers.get(server) if server is not None else None
            if belongs is not None and belongs != wanted:
                return None, (
                    403,
                    f"this agent belongs to server {server!r} (upstream {belongs!r}), "
                    f"not to upstream {wanted!r}",
                )
            return wanted, None
        servers = self._servers()
        if len(servers) == 1:
            return servers[0], None
        if server is None:
            return None, (
                403,
                "the agent's certificate names no server: re-enroll, or use "
                f"{UPSTREAM_PREFIX}NAME/ in the URL",
            )
        name = self.servers.get(server)
        if name is None:
            if any(not self.links.is_up(n) for n in self.links.names):
                return None, (503, f"server {server!r} is not reachable now; try again later")
            return None, (403, f"no upstream of this gateway leads to server {server!r}")
        return name, None

    def route_task_server(self, server: str | None, node: str) -> tuple[str | None, Any]:
        """The upstream of task server `node` for an agent of `server`, or why not."""
        name = self.task_servers.get(node)
        if name is None or not self.links.is_up(name):
            return None, (503, f"task server {node!r} is not reachable from here now")
        belongs = self.ts_server.get(name)
        if server is not None and belongs is not None and server != belongs:
            return None, (
                403,
                f"task server {node!r} serves server {belongs!r}, not this agent's {server!r}",
            )
        if server is None and len(self._servers()) > 1:
            return None, (403, "the agent's certificate names no server: re-enroll")
        return name, None


def wanted_upstream(path: str | bytes, prefix: str = UPSTREAM_PREFIX) -> str | None:
    """The upstream an agent names in its URL (/upstream/NAME/...), or None."""
    if isinstance(path, bytes):
        path = path.decode("ascii", "replace")
    if not path.startswith(prefix):
        return None
    return path[len(prefix) :].split("/", 1)[0] or None


def wanted_task_server(path: str | bytes) -> str | None:
    """The task server an agent's task session names (/taskserver/NAME/task/v1/ws), or None."""
    return wanted_upstream(path, TASK_SERVER_PREFIX)
