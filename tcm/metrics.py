"""Prometheus metrics and the small HTML status page, served on a loopback port.

Each service builds its metric families at scrape time from the counters it keeps anyway
(plain integers on the relay, the registry, the dispatcher): nothing is done per message for
the metrics' sake. `metrics_site` serves `/metrics` (Prometheus text format) and `/status`
(HTML, the same figures at a glance) with `twisted.web`.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource
from twisted.web.server import Site


class SnapshotCollector:
    """A prometheus_client collector whose families come from one function, at scrape time."""

    def __init__(self, families: Callable[[], Iterable[Any]]):
        self._families = families

    def collect(self) -> Iterable[Any]:
        return list(self._families())


def gauge(
    name: str,
    doc: str,
    value: float | None = None,
    labels: dict[str, float] | None = None,
    label: str = "",
) -> GaugeMetricFamily:
    """A gauge with one value, or one sample per `labels` key under the label `label`."""
    if labels is None:
        return GaugeMetricFamily(name, doc, value=value or 0)
    g = GaugeMetricFamily(name, doc, labels=[label])
    for key, v in sorted(labels.items()):
        g.add_metric([key], v)
    return g


def counter(
    name: str,
    doc: str,
    value: float | None = None,
    labels: dict[str, float] | None = None,
    label: str = "",
) -> CounterMetricFamily:
    """A counter with one value, or one sample per `labels` key under the label `label`."""
    if labels is None:
        return CounterMetricFamily(name, doc, value=value or 0)
    c = CounterMetricFamily(name, doc, labels=[label])
    for key, v in sorted(labels.items()):
        c.add_metric([key], v)
    return c


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class StatusPage(Resource):
    """A plain HTML page: the service's figures and one row per upstream or link."""

    isLeaf = True

    def __init__(self, title: str, status: Callable[[], dict[str, Any]]):
        super().__init__()
        self.title = title
        self.status = status

    def render_GET(self, request):
        data = self.status()
        rows = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in data.get("summary", {}).items()
        )
        tables = []
        for caption, items in data.get("tables", {}).items():
            if not items:
                continue
            heads = list(items[0])
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(i[h]))}</td>" for h in heads) + "</tr>"
                for i in items
            )
            head = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
            tables.append(f"<h2>{html.escape(caption)}</h2><table><tr>{head}</tr>{body}</table>")
        page = (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title>"
            "<meta http-equiv='refresh' content='10'>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 10px;text-align:left}"
            "</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1><table>{rows}</table>{''.join(tables)}"
            "<p><a href='/metrics'>/metrics</a></p></body></html>"
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page.encode()


def metrics_site(
    registry: CollectorRegistry, title: str, status: Callable[[], dict[str, Any]]
) -> Site:
    """/metrics and /status (also at /) on one small site, for a loopback port."""
    root = Resource()
    page = StatusPage(title, status)
    root.putChild(b"", page)
    root.putChild(b"status", page)
    root.putChild(b"metrics", MetricsResource(registry))
    site = Site(root, timeout=30)
    site.displayTracebacks = False
    return site
