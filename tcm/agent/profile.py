"""The agent's connection profile: how it reaches its server, changed without a restart.

The profile in force is kept in `profile.json` in the state directory (an install package
puts its profile there too), so it holds from the first connection of the next start. A
profile's settings override the agent's command-line settings; a setting the profile does
not name keeps the command-line value.

Applied at run time (by the agent's connection, which follows the keeper: `follow_profile`
in connection.py):
    servers                 the first is the server; a change reconnects (HTTPS and session)
    gateways                gateways tried in turn when the server is not reachable (as
                            --gateway, which they replace); a change reconnects the session
    proxy                   a change reconnects through the new proxy (null: direct)
    persistent_connections  off: the session is closed (4011) and the agent works over HTTPS;
                            on: the session service starts again
    keepalive               the live session pings at the new interval from its next ping
    keepalive_timeout, backoff_initial, backoff_max, fallback_delay
                            from the next connection attempt / fallback on
    poll_interval, long_poll  from the next poll
Stored and shown, not acted on (the server assigns task servers): task_servers.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import fastjsonschema
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from tcm.interfaces import IAgentAPI, IProfileFollower, ISessionObserver
from tcm.protocol.schemas import PROFILE_SETTINGS
from tcm.tls import pki

STORED_ONLY = ("task_servers",)
APPLIED = tuple(k for k in PROFILE_SETTINGS["properties"] if k not in STORED_ONLY)


@functools.cache
def _validator() -> Any:
    """The settings' compiled check, made at the first profile to check, not at import."""
    return fastjsonschema.compile(PROFILE_SETTINGS)


def _validate(settings: Any) -> None:
    _validator()(settings)


@implementer(ISessionObserver)
class ProfileKeeper:
    """The profile in force on one agent: kept on disk, fetched and reported through `api`;
    its settings go to its followers (`IProfileFollower`: the agent's connection)."""

    _log = Logger()

    def __init__(self, state_dir: str, api: IAgentAPI):
        self._api = api
        self._followers: list[IProfileFollower] = []
        self.path = os.path.join(state_dir, "profile.json")
        self.current: dict[str, Any] | None = None  # {name, version, settings}
        self.last_error: str | None = None
        self.fetches = 0
        self.reported: dict[str, Any] | None = None  # what the server acknowledged last

    @property
    def settings(self) -> dict[str, Any]:
        return (self.current or {}).get("settings") or {}

    def subscribe(self, follower: IProfileFollower) -> None:
        """`follower` puts the settings in force, from `restore` on."""
        self._followers.append(follower)

    def in_force(self) -> dict[str, Any] | None:
        """The profile in force as a hello names it: {name, version}, or None."""
        if not self.current:
            return None
        return {"name": self.current["name"], "version": self.current["version"]}

    # -- when to fetch: told by the agent's connection and by the server -----------------
    def session_opened(self, welcome: dict[str, Any]) -> None:
        # the hello told the server which profile this agent runs
        self.reported = {
            "name": (self.current or {}).get("name"),
            "version": (self.current or {}).get("version"),
        }
        # a welcome saying the server has no profiles spares the fetch when the agent has
        # none either (a reconnect storm costs nothing more)
        if not (welcome.get("profile_count") == 0 and self.current is None):
            self.fetch("session start")

    def session_lost(self, reason: str, switched_off: bool) -> None:
        """The profile stays in force without a session."""

    def polling_started(self) -> None:
        self.fetch("HTTP mode")

    def notified(self, data: dict[str, Any]) -> None:
        self.fetch("the server notified a profile change")

    def restore(self) -> None:
        """At start, before the first connection: the stored profile's settings."""
        try:
            with open(self.path, "rb") as f:
                stored = json.load(f)
        except FileNotFoundError:
            return
        except ValueError as e:
            self._log.warn("ignoring unreadable {path}: {e}", path=self.path, e=e)
            return
        if not self._valid(stored):
            return
        self.current = stored
        self._configure(live=False)
        self._log.info(
            "connection profile {name} v{version} (stored)",
            name=stored.get("name"),
            version=stored.get("version"),
        )

    def _valid(self, profile: Any) -> bool:
        if profile is None:
            return True
        try:
            if not isinstance(profile, dict) or not isinstance(profile.get("name"), str):
                raise ValueError("a profile needs a name")
            _validate(profile.get("settings") or {})
        except (ValueError, fastjsonschema.JsonSchemaValueException) as e:
            self.last_error = f"profile refused: {getattr(e, 'message', e)}"
            self._log.warn("{why}", why=self.last_error)
            return False
        return True

    def fetch(self, why: str) -> Deferred:
        self.fetches += 1
        d = self._api.call("GET", "/agent/v1/profile")

        def got(response: Any) -> Any:
            if response.status != 200:
                raise RuntimeError(f"profile answered {response.status}: {response.body}")
            self.apply((response.body or {}).get("profile"), why)
            running = {
                "name": (self.current or {}).get("name"),
                "version": (self.current or {}).get("version"),
            }
            if running == self.reported:
                return None  # the server knows (this process told it, or the hello did)
            d = self._api.call("POST", "/agent/v1/profile/status", running)

            def acknowledged(response: Any) -> None:
                if response.status == 200:
                    self.reported = running

            return d.addCallback(acknowledged)

        d.addCallback(got)
        d.addErrback(
            lambda f: self._log.warn("profile fetch failed: {why}", why=f.getErrorMessage())
        )
        return d

    def apply(self, profile: dict[str, Any] | None, why: str = "") -> None:
        """Put a profile (None: no profile) in force now, without a restart."""
        if not self._valid(profile):
            return
        old = self.current
        same = (old or {}).get("name") == (profile or {}).get("name") and (old or {}).get(
            "version"
        ) == (profile or {}).get("version")
        if same:
            return
        self.current = profile
        self.last_error = None
        if profile is None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        else:
            pki.write_public(self.path, json.dumps(profile, indent=1).encode())
        if profile is None:
            self._log.info("no connection profile: command-line settings ({why})", why=why)
        else:
            self._log.info(
                "connection profile {name} v{version} in force ({why})",
                name=profile.get("name"),
                version=profile.get("version"),
                why=why,
            )
        self._configure(live=True)

    def _configure(self, live: bool) -> None:
        """Tell the followers (the agent's connection) the settings now in force."""
        for follower in self._followers:
            follower.follow_profile(self.settings, live)

    def status(self) -> dict[str, Any] | None:
        if self.current is None:
            return None if self.last_error is None else {"error": self.last_error}
        s = self.settings
        return {
            "name": self.current.get("name"),
            "version": self.current.get("version"),
            "settings": s,
            "applied": sorted(k for k in s if k in APPLIED),
            "stored_only": sorted(k for k in s if k in STORED_ONLY),
            "error": self.last_error,
        }


def gateway_base(url: str) -> str:
    """A gateway as a profile names it (https:// or wss://, maybe with the session path) as
    the base URL the agent's destinations use: https://HOST:PORT[/upstream/NAME]."""
    rest = url.split("://", 1)[1].rstrip("/")
    if rest.endswith("/agent/v1/ws"):
        rest = rest[: -len("/agent/v1/ws")]
    return "https://" + rest
