"""/metrics: the numbers of /stats in the Prometheus text format, through prometheus-client.

A custom collector turns one stats snapshot (the dict /stats returns, read once per scrape)
into metric families, on a registry of its own: the process-wide default registry is left
alone. The format follows the scraper's Accept header as prometheus-client's own handlers do:
the classic text format (0.0.4) by default, newer text or OpenMetrics when asked for.
"""

from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

LINK_LABELS = ["link", "peer", "kind"]


def _flag(value):
    return "true" if value else "false"


class StatsCollector(Collector):
    """Metric families from `snapshot()`, a callable returning the /stats dict."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        stats = self.snapshot()
        tap = stats["tap"]

        yield GaugeMetricFamily("gelf_uptime_seconds", "Seconds since this server started",
                                value=stats["uptime"])
        info = InfoMetricFamily("gelf", "This server: version, tap, origin id, encryption, offloads")
        info.add_metric([], {"version": str(stats["version"]), "tap": tap["name"], "origin": stats["origin"],
                             "encryption": _flag(stats["encryption"]), "offload": _flag(tap["offload"])})
        yield info
        yield GaugeMetricFamily("gelf_tap_mtu", "MTU of the tap", value=tap["mtu"])

        frames = CounterMetricFamily("gelf_tap_frames", "Frames read from and written to the tap",
                                     labels=["direction"])
        nbytes = CounterMetricFamily("gelf_tap_bytes", "Bytes read from and written to the tap",
                                     labels=["direction"])
        for direction in ("read", "written"):
            frames.add_metric([direction], tap[direction + "_frames"])
            nbytes.add_metric([direction], tap[direction + "_bytes"])
        yield frames
        yield nbytes

        drops = CounterMetricFamily("gelf_drops", "Received messages dropped, by reason (all links)",
                                    labels=["reason"])
        for reason, count in sorted(stats["drops"].items()):
            drops.add_metric([reason], count)
        yield drops

        messages = CounterMetricFamily("gelf_link_messages", "Messages received (rx) and sent (tx) per link",
                                       labels=LINK_LABELS + ["direction"])
        link_bytes = CounterMetricFamily("gelf_link_bytes", "Message bytes received (rx) and sent (tx) per link",
                                         labels=LINK_LABELS + ["direction"])
        link_drops = CounterMetricFamily("gelf_link_drops", "Messages from this link dropped, by reason "
                                         "(reasons seen only)", labels=LINK_LABELS + ["reason"])
        up = GaugeMetricFamily("gelf_link_up", "1 while the link is open", labels=LINK_LABELS + ["state"])
        since = GaugeMetricFamily("gelf_link_since_seconds", "When the link was connected (Unix time)",
                                  labels=LINK_LABELS)
        for link in stats["links"]:
            labels = [str(link["id"]), link["peer"], link["kind"]]
            for direction in ("rx", "tx"):
                messages.add_metric(labels + [direction], link[direction + "_messages"])
                link_bytes.add_metric(labels + [direction], link[direction + "_bytes"])
            for reason, count in sorted(link["drops"].items()):
                if count:
                    link_drops.add_metric(labels + [reason], count)
            up.add_metric(labels + [link["state"]], 1 if link["state"] == "open" else 0)
            if link.get("since") is not None:
                since.add_metric(labels, link["since"])
        yield from (messages, link_bytes, link_drops, up, since)


def registry(snapshot):
    """A registry of its own holding one StatsCollector over `snapshot`."""
    reg = CollectorRegistry()
    reg.register(StatsCollector(snapshot))
    return reg


def exposition(reg, accept=None):
    """(content type, body bytes) of the registry's metrics, in the format `accept` prefers."""
    encode, content_type = choose_encoder(accept or "")
    return content_type, encode(reg)
