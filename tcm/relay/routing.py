"""Upstream links and the gateway's routing: which upstream serves an agent.

`UpstreamLinks` is the table of a node's configured upstreams and the live link of each (a
task server has one, "server"; a gateway one per `--upstream NAME=URL`). `GatewayRouting`
knows what each welcome said: which server an upstream leads to (agents are routed by the
server named in their certificate), which upstreams are task servers and whose (an agent's
task session at /taskserver/NAME/... goes to task server NAME).
"""

from __future__ import annotations

import hashlib
from typing import Any

UPSTREAM_PREFIX = "/upstream/"  # /upstream/NAME/...: the agent names its server's upstream
TASK_SERVER_PREFIX = "/taskserver/"  # /taskserver/NAME/task/v1/ws: through to task server NAME

Refusal = tuple[int, str]  # HTTP status, reason


def spread_score(agent_id: str, key: str) -> int:
    """Rendezvous (highest random weight) score of an agent on one node link: the agent goes
    to the live link with the highest score. The same agent lands on the same node while it
    is up (its core and task sessions and its calls together), agents spread evenly, and a
    lost node's agents spread over the others while the rest stay where they are."""
    digest = hashlib.blake2b(f"{key}\x00{agent_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choose_node(agent_id: str | None, keys: list[Any]) -> Any:
    """The node link key an agent's new connection goes to (None without any); an agent
    without an id yet (enrolling) takes the first."""
    if not keys:
        return None
    if agent_id is None or len(keys) == 1:
        return keys[0]
    return max(keys, key=lambda k: spread_score(agent_id, str(k)))


class UpstreamLinks:
    """Configured upstreams (the first is the default) and the live links of each once
    welcomed: one link per node, several when the upstream is a cluster of server nodes
    (keyed by the node's address; None for a single link)."""

    def __init__(self, names: list[str]):
        if not names:
            raise ValueError("a relay node needs an upstream")
        self.names = list(names)
        self._links: dict[str, dict[Any, Any]] = {}

    @property
    def default(self) -> str:
        return self.names[0]

    def get(self, name: str | None) -> Any:
        """A link to upstream `name` if one is up (the first to come up), else None."""
        if name is None:
            return None
        links = self._links.get(name)
        return next(iter(links.values())) if links else None

    def all(self, name: str) -> list[Any]:
        """Every live link of upstream `name` (one per node)."""
        return list(self._links.get(name, {}).values())

    def nodes(self, name: str) -> dict[Any, Any]:
        """{node key: link} of upstream `name`'s live links."""
        return dict(self._links.get(name, {}))

    def is_up(self, name: str) -> bool:
        return bool(self._links.get(name))

    def holds(self, name: str, link: Any) -> bool:
        """Whether `link` is one of upstream `name`'s live links."""
        return any(v is link for v in self._links.get(name, {}).values())

    def pick(self, name: str, agent_id: str | None) -> Any:
        """The link an agent's new connection (or call) to upstream `name` goes over."""
        links = self._links.get(name)
        if not links:
            return None
        if len(links) == 1:
            return next(iter(links.values()))
        keys = sorted(links, key=str)
        return links[choose_node(agent_id, keys)]

    def up(self, name: str, link: Any, key: Any = None) -> None:
        self._links.setdefault(name, {})[key] = link

    def down(self, name: str, link: Any = None) -> bool:
        """Upstream `name` lost `link` (without `link`: every link). False when `link` is
        not one of its live links (an older link's loss, after a newer one came up)."""
        if link is None:
            self._links.pop(name, None)
            return True
        links = self._links.get(name, {})
        for key, held in list(links.items()):
            if held is link:
                del links[key]
                if not links:
                    del self._links[name]
                return True
        return False


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

    def learn(self, name: str, servers: list[str]) -> list[str]:
        """Upstream `name` is a cluster whose nodes are `servers` (its `cluster` message):
        agents whose certificates name any of them go to it. The names another upstream
        holds already (a conflict, logged by the caller)."""
        conflicts = []
        for server in servers:
            other = self.servers.get(server)
            if other is not None and other != name and self.links.is_up(other):
                conflicts.append(server)
                continue
            self.servers[server] = name
        return conflicts

    def upstream_of_server(self, server: str | None) -> str | None:
        return self.servers.get(server) if server is not None else None

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
        # by upstream, not by server name: the nodes of a cluster are several servers of
        # one upstream, and a task server linked to any of them serves its agents
        for name in sorted(set(self.servers.values())):
            if not self.links.is_up(name) or (only is not None and name != only):
                continue
            out[name] = sorted(
                node
                for node, up in self.task_servers.items()
                if self.links.is_up(up) and self.upstream_of_server(self.ts_server.get(up)) == name
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
        if (
            server is not None
            and belongs is not None
            and server != belongs
            and (self.upstream_of_server(server) or server)
            != (self.upstream_of_server(belongs) or belongs)
        ):
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
