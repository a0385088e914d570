"""HTTP limits answered at once, on every tcm HTTP listener (server, gateway, task server).

twisted.web drops a request line or header line over its 16 KiB limit without an answer and
holds the connection until its idle timeout; a body of any size is read before the resource
sees it. Here both are refused at once: 431 for a line, 413 for a body over `max_body` (its
Content-Length, or the chunks received so far), with a JSON error, and the connection closed.
"""

from __future__ import annotations

import json
from io import BytesIO

from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

MAX_BODY = 8 * 1024 * 1024  # the largest request body any tcm route takes

MAX_HEADER_LINE = 16 * 1024  # a request line or one header line (twisted.web's own limit)

_REASONS = {413: b"Content Too Large", 431: b"Request Header Fields Too Large"}


class LimitedChannel(HTTPChannel):
    """An HTTP channel that answers a line or a body beyond its limits with 431 or 413 and
    closes at once (twisted.web drops such a line without an answer and holds the
    connection until its idle timeout).

    Over the limit the channel writes its answer, closes, and reads nothing more: the
    request it refused is never rendered.
    """

    MAX_LENGTH = MAX_HEADER_LINE
    refused = False

    def refuse(self, status: int, message: str) -> None:
        """Answer `status` with a JSON error and close the connection (once)."""
        if self.refused:
            return
        self.refused = True
        body = json.dumps({"error": message}, separators=(",", ":")).encode()
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))
        if self.transport is None:
            return
        self.transport.write(
            head
            + b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
            + b"connection: close\r\n\r\n"
            + body
        )
        self.setTimeout(None)
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(431, f"request line or header line over {self.MAX_LENGTH} bytes")

    def dataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if not self.refused:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().rawDataReceived(data)


class LimitedRequest(Request):
    """A request whose body is refused with 413 as soon as it is known to be over
    `max_body` (its Content-Length, or the chunks received so far)."""

    max_body = MAX_BODY

    def gotLength(self, length: int | None) -> None:
        self._body_bytes = 0
        if length is not None and length > self.max_body:
            self.content = None
            self._refuse_body()
            return
        if length is None and not self.requestHeaders.hasHeader(b"transfer-encoding"):
            # No body at all (a GET, a WebSocket upgrade). Twisted opens a temporary file
            # for a request of unknown length: a file created and deleted per request.
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused_channel():
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.max_body:
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self._refused_channel():
            super().process()

    def _refused_channel(self) -> bool:
        return bool(getattr(self.channel, "refused", False))

    def _refuse_body(self) -> None:
        refuse = getattr(self.channel, "refuse", None)
        if refuse is not None:
            refuse(413, f"request body over {self.max_body} bytes")


def limited_site(root: Resource, timeout: float) -> Site:
    """A Site whose header lines and bodies beyond their limits are answered at once."""
    site = Site(root, timeout=timeout)
    site.protocol = LimitedChannel  # type: ignore[assignment]
    site.requestFactory = LimitedRequest
    site.displayTracebacks = False
    return site
