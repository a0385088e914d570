"""Agent install packages built by the server, for the console's "install package" download
(POST /api/v1/profiles/{name}/package).

The package is the one `tcm package build` makes, by the same code (tcm/installpackage.py).
Both steps block (pip runs as a subprocess, the archive is written and compressed), so they
run on a thread pool of their own, one thread: the reactor keeps serving, a long build never
takes the store's threads, and two builds of the same wheels never race. The wheels are kept
per tcm version in a `WheelCache` (default STATE_DIR/package-wheels; `--package-wheels`), so
only the first package of a version waits for `pip wheel`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from tcm.installpackage import PackageError, WheelCache, Wheels, write_package
from tcm.interfaces import IInstallPackages
from tcm.server.errors import Invalid, Unavailable


@implementer(IInstallPackages)
class InstallPackages(service.Service):
    """Builds install packages on its own thread; a twistd service (its thread pool starts
    and stops with the server)."""

    _log = Logger()

    def __init__(self, reactor: Any, cache: WheelCache):
        self._reactor = reactor
        self.cache = cache
        self._pool = ThreadPool(minthreads=0, maxthreads=1, name="tcm-packages")

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        # waits for a build in progress (pip has its timeout), as the store's pool does
        self._pool.stop()

    def _run(self, fn: Any, *args: Any) -> Deferred[Any]:
        if not self._pool.started:
            return fail(Unavailable("the server is not running: no install package now"))
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def wheels(self) -> Deferred[Wheels]:
        """The package's wheels (built first when the cache has none for this version)."""

        def unavailable(f: Failure) -> Failure:
            if f.check(PackageError):
                reason = str(f.value)
                self._log.warn("no install package: {reason}", reason=reason)
                return Failure(
                    Unavailable(f"cannot build an install package: {reason}", reason=reason)
                )
            return f

        return self._run(self.cache.wheels).addErrback(unavailable)

    def assemble(
        self,
        profile: dict[str, Any],
        ca_pem: str,
        server: str,
        token: str,
        uses: int,
        ttl: float,
        wheels: Sequence[str],
    ) -> Deferred[bytes]:
        """The package as .tar.gz bytes; its README says when the token expires (UTC)."""
        now = self._reactor.seconds()
        expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now + ttl))

        def build() -> bytes:
            out = io.BytesIO()
            write_package(out, profile, ca_pem, server, token, uses, expires, wheels, now)
            return out.getvalue()

        def invalid(f: Failure) -> Failure:
            if f.check(PackageError):
                return Failure(Invalid("server", str(f.value)))
            return f

        return self._run(build).addErrback(invalid)
