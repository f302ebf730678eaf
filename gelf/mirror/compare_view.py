"""Three views of one response-comparison snapshot (the dict `compare.Comparer.snapshot()`
returns, also served as /stats JSON): Prometheus metric families with an `upstream` label, the
`gelf-mirror report` text, and the one-line progress shown on the terminal while it runs.

They read only the snapshot, never the Comparer, so a report can be printed from a saved /stats
document as well as from a live process.
"""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

COUNTS = (("requests", "Requests the output wrote to this upstream in full"),
          ("responses", "Responses read from this upstream"),
          ("paired", "Upstream responses paired with production's answer to the same request"),
          ("unpaired", "Upstream responses dropped without a production counterpart (bounded wait)"),
          ("status_match", "Pairs with the same status"),
          ("body_match", "Pairs with the same body SHA-256"),
          ("headers_match", "Pairs with the same headers, ignored headers left out"),
          ("broken", "Replays whose answer stopped being HTTP/1.x"))


class CompareCollector(Collector):
    """Metric families from `snapshot()`, a callable returning Comparer.snapshot()."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot()
        for key in ("requests", "responses", "not_http", "broken", "tunnel", "evicted", "unpaired"):
            yield CounterMetricFamily("gelf_mirror_production_" + key,
                                      "Production (capture side): %s" % key.replace("_", " "), value=snap[key])
        latency = GaugeMetricFamily("gelf_mirror_latency_seconds", "Latency from a request's last byte to "
                                    "its response's first byte, sampled", labels=["upstream", "quantile"])
        _quantiles(latency, "production", snap["latency"])
        families = {key: CounterMetricFamily("gelf_mirror_upstream_" + key, text, labels=["upstream"])
                    for key, text in COUNTS}
        rate = GaugeMetricFamily("gelf_mirror_match_ratio", "Share of pairs that match, by part",
                                 labels=["upstream", "part"])
        top = GaugeMetricFamily("gelf_mirror_mismatches", "Mismatching pairs (status or body) of the most "
                                "frequent method+path pairs", labels=["upstream", "method", "path"])
        for name, row in snap["upstreams"].items():
            for key, family in families.items():
                family.add_metric([name], row[key])
            for part in ("status", "body", "headers"):
                if row[part + "_match_rate"] is not None:
                    rate.add_metric([name, part], row[part + "_match_rate"])
            _quantiles(latency, name, row["latency"])
            for item in row["top_mismatches"]:
                top.add_metric([name, item["method"], item["path"]], item["count"])
        yield from families.values()
        yield from (rate, latency, top)


def _quantiles(family, name, summary):
    for q, key in (("0.5", "p50"), ("0.99", "p99")):
        if summary[key] is not None:
            family.add_metric([name, q], summary[key])


def _pct(rate):
    return "-" if rate is None else "%.1f%%" % (rate * 100)


def _ms(seconds):
    return "-" if seconds is None else "%.1f ms" % (seconds * 1000)


def report(snap):
    """The `gelf-mirror report` text: production, then one block per upstream."""
    lat = snap["latency"]
    lines = ["production: %d requests, %d responses, latency p50 %s p99 %s"
             % (snap["requests"], snap["responses"], _ms(lat["p50"]), _ms(lat["p99"])),
             "  connections: %d followed, %d not HTTP, %d broken, %d tunnels, %d evicted"
             % (snap["conns"], snap["not_http"], snap["broken"], snap["tunnel"], snap["evicted"]),
             "  ignored headers: %s (and framing: connection, keep-alive, transfer-encoding, "
             "content-length)" % (", ".join(snap["ignore_headers"]) or "none")]
    if not snap["upstreams"]:
        lines.append("no upstream has answered yet")
    for name, row in snap["upstreams"].items():
        ul = row["latency"]
        lines += ["", "upstream %s:" % name,
                  "  requests %d, responses %d, paired %d, unpaired %d, broken %d"
                  % (row["requests"], row["responses"], row["paired"], row["unpaired"], row["broken"]),
                  "  status match %s (%d/%d), body match %s (%d/%d), headers match %s"
                  % (_pct(row["status_match_rate"]), row["status_match"], row["paired"],
                     _pct(row["body_match_rate"]), row["body_match"], row["paired"],
                     _pct(row["headers_match_rate"])),
                  "  latency p50 %s p99 %s (production p50 %s p99 %s)"
                  % (_ms(ul["p50"]), _ms(ul["p99"]), _ms(lat["p50"]), _ms(lat["p99"]))]
        if row["top_mismatches"]:
            lines.append("  top mismatches (status or body):")
            lines += ["    %6d  %s %s" % (item["count"], item["method"], item["path"])
                      for item in row["top_mismatches"]]
    return "\n".join(lines) + "\n"


def progress_line(snap):
    """One terminal line, no newline: requests, then per upstream pairs, match rates, p99."""
    parts = ["req %d" % snap["requests"], "prod p99 %s" % _ms(snap["latency"]["p99"])]
    for name, row in snap["upstreams"].items():
        parts.append("%s: %d paired, status %s, body %s, p99 %s"
                     % (name, row["paired"], _pct(row["status_match_rate"]), _pct(row["body_match_rate"]),
                        _ms(row["latency"]["p99"])))
    return " | ".join(parts)
