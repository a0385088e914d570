"""Run-time settings: what an admin changes while the server runs (`tcm settings set`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from zope.interface import implementer

from tcm.interfaces import IRuntimeSettings
from tcm.server.config import ServerConfig
from tcm.server.errors import Invalid

MIN_RETENTION = 3600.0  # job_retention: seconds jobs are kept, an hour ...
MAX_RETENTION = 3650 * 86400.0  # ... to ten years
JOB_RETENTION_RANGE = "job_retention must be 3600..315360000 seconds (1 hour to 10 years)"


@implementer(IRuntimeSettings)
class RuntimeSettings(Mapping[str, Any]):
    """The settings in force, kept in the store's settings area.

    Defaults come from the command line; a stored value wins over the default. Read like a
    dict (`settings["poll_interval"]`); changed only through `change`."""

    _log = Logger()

    TYPES: dict[str, tuple[type, ...]] = {
        "persistent_connections": (bool,),
        "poll_interval": (int, float),
        "long_poll": (int, float),
        "require_approval": (bool,),
        "job_retention": (int, float),
    }

    def __init__(self, config: ServerConfig, settings_store: Any = None):
        self._store = settings_store
        self._values: dict[str, Any] = dict(
            require_approval=bool(config.require_approval),
            persistent_connections=bool(config.persistent_connections),
            poll_interval=config.poll_interval,
            long_poll=config.long_poll,
            job_retention=config.job_retention,
        )
        self._persistent_off: list[Callable[[], None]] = []

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def persistent_enabled(self) -> bool:
        return bool(self._values["persistent_connections"])

    def when_persistent_off(self, callback: Callable[[], None]) -> None:
        """Call `callback()` whenever persistent connections are switched off."""
        self._persistent_off.append(callback)

    def validate(self, changes: dict[str, Any], ignore_unknown: bool = False) -> dict[str, Any]:
        """The changes, checked; Invalid naming the setting that is unknown or out of range."""
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            types = self.TYPES.get(key)
            if types is None:
                if ignore_unknown:
                    continue
                raise Invalid(key, f"unknown setting {key!r}", known=sorted(self.TYPES))
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise Invalid(key, f"setting {key!r} must be {types[0].__name__}")
            number: Any = value
            if key == "poll_interval" and not 1 <= number <= 86400:
                raise Invalid(key, "poll_interval must be 1..86400 seconds")
            if key == "long_poll" and not 0 <= number <= 300:
                raise Invalid(key, "long_poll must be 0..300 seconds (0: off)")
            if key == "job_retention" and not MIN_RETENTION <= number <= MAX_RETENTION:
                raise Invalid(key, JOB_RETENTION_RANGE)
            clean[key] = value
        return clean

    @inlineCallbacks
    def load(self):
        """Take the stored values (at startup); unknown or bad stored keys are ignored."""
        stored = yield self._store.get_settings()
        self._values.update(self.validate(stored, ignore_unknown=True))

    @inlineCallbacks
    def reload(self, _ids: Any = None):
        """Take the stored values again (another node of the cluster changed them), and
        apply them as `change` would."""
        before = self.persistent_enabled()
        yield self.load()
        if before and not self.persistent_enabled():
            for callback in self._persistent_off:
                callback()

    @inlineCallbacks
    def change(self, changes: dict[str, Any]):
        """Validate, store and apply setting changes at run time; fires with all settings."""
        if not changes:
            raise Invalid(None, "give at least one setting to change")
        clean = self.validate(changes)
        for key, value in clean.items():
            yield self._store.set_setting(key, value)
        before = self.persistent_enabled()
        self._values.update(clean)
        if before and not self.persistent_enabled():
            for callback in self._persistent_off:
                callback()
        elif not before and self.persistent_enabled():
            self._log.info("persistent connections switched on")
        return self.as_dict()
