"""--pcap and /metrics without a tap: the capture file (format, virtio header stripped, rotation,
write errors, threads), the pump's two hooks, and the Prometheus collector over a stats snapshot."""

import os
import shutil
import struct
import subprocess
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gelf import metrics, offload, wire
from gelf.links import LinkSet
from gelf.pcap import Capture
from gelf.pump import Pump
from gelf.stats import Drops


def frame(n, size=60):
    """An Ethernet frame numbered n (in its payload)."""
    body = struct.pack(">I", n) + bytes(size - 18)
    return bytes.fromhex("ffffffffffff020000000001") + b"\x88\xb5" + body


def read_pcap(path):
    """(header fields, [(captured bytes, original length)]) of a classic pcap file, read by hand
    from the documented format (not with gelf.pcap)."""
    data = open(path, "rb").read()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, linktype) == (0xA1B2C3D4, 2, 4, 1), data[:24].hex()
    records, at = [], 24
    while at < len(data):
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, at)
        assert usec < 1_000_000 and sec > 1_600_000_000
        at += 16
        records.append((data[at:at + incl], orig))
        at += incl
    assert at == len(data), "a truncated record at the end"
    return snaplen, records


def tcpdump_count(path):
    if not shutil.which("tcpdump"):
        pytest.skip("needs tcpdump (make sysdeps)")
    res = subprocess.run(["tcpdump", "-r", str(path), "-n", "-e"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return len([line for line in res.stdout.splitlines() if line[:1].isdigit()])  # not hex dumps


def test_frames_are_written_whole_and_readable(tmp_path):
    path = tmp_path / "x.pcap"
    cap = Capture(path, 1 << 20)
    cap.frames([frame(1), frame(2, 1514)], vnet=False)
    cap.frames([offload.PLAIN + frame(3)], vnet=True)
    snaplen, records = read_pcap(path)  # visible before close: nothing is buffered
    assert snaplen == 262144
    assert records == [(frame(1), 60), (frame(2, 1514), 1514), (frame(3), 60)]
    cap.close()
    assert tcpdump_count(path) == 3
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_super_frames_are_kept_whole(tmp_path):
    path = tmp_path / "x.pcap"
    cap = Capture(path, 1 << 20)
    big = frame(7, 65535 + 18)
    cap.frames([memoryview(offload.PLAIN + big)], vnet=True)
    cap.close()
    assert read_pcap(path)[1] == [(big, len(big))]


def test_rotation_keeps_two_bounded_valid_files(tmp_path):
    path = tmp_path / "rot.pcap"
    cap_bytes = 2000
    cap = Capture(path, cap_bytes)
    for n in range(100):
        cap.frames([frame(n, 100)], vnet=False)
    cap.close()
    old = str(path) + ".1"
    assert os.path.exists(path) and os.path.exists(old)
    assert not os.path.exists(str(path) + ".2")
    for p in (path, old):
        assert os.path.getsize(p) <= cap_bytes
        assert tcpdump_count(p) == len(read_pcap(p)[1]) > 0
    # The newest frames: the older file ends where the current one begins, the last is 99.
    numbers = [struct.unpack_from(">I", f, 14)[0] for f, _ in read_pcap(old)[1] + read_pcap(path)[1]]
    assert numbers == list(range(numbers[0], 100))
    assert len(numbers) >= (cap_bytes - 24) // 116


def test_a_full_disk_stops_the_capture_once(tmp_path, caplog):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    cap = Capture(tmp_path / "x.pcap", 1 << 20)
    cap._file.close()
    cap._file = open("/dev/full", "wb", buffering=0)  # every write now fails with ENOSPC
    with caplog.at_level("WARNING", logger="gelf.pcap"):
        cap.frames([frame(1)], vnet=False)  # no exception reaches the data path
        cap.frames([frame(2)], vnet=False)  # ignored: the capture has stopped
    assert len([r for r in caplog.records if "capture stopped" in r.getMessage()]) == 1, caplog.text
    cap.close()


def test_a_path_that_cannot_be_written_fails_at_once(tmp_path):
    with pytest.raises(FileNotFoundError):
        Capture(tmp_path / "missing" / "x.pcap", 1 << 20)


def test_threads_never_interleave_records(tmp_path):
    path = tmp_path / "x.pcap"
    cap = Capture(path, 1 << 24)

    def writer(base):
        for n in range(200):
            cap.frames([frame(base + n, 60 + n % 50), frame(base + n, 80)], vnet=False)

    threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cap.close()
    assert len(read_pcap(path)[1]) == 4 * 200 * 2


class FakeTap:
    name = "fake0"
    mtu = 1500

    def __init__(self, offload, frames=()):
        self.offload = offload
        self.pending = list(frames)
        self.written = []

    def read(self):
        return self.pending.pop(0) if self.pending else None

    def write(self, data):
        self.written.append(bytes(data))

    def write_parts(self, parts):
        self.written.append(b"".join(parts))


@pytest.mark.parametrize("tap_offload", [False, True], ids=["plain-tap", "offload-tap"])
@pytest.mark.parametrize("sender_offload", [False, True], ids=["plain-sender", "offload-sender"])
def test_pump_captures_both_directions_as_ethernet(tmp_path, tap_offload, sender_offload):
    path = tmp_path / "x.pcap"
    cap = Capture(path, 1 << 20)
    head = offload.PLAIN if tap_offload else b""
    tap = FakeTap(tap_offload, [head + frame(1), head + frame(2)])
    pump = Pump(tap, LinkSet(), Drops(), origin=1, capture=cap)
    assert len(pump._drain()) == 2
    sent = (offload.PLAIN if sender_offload else b"") + frame(3)
    pump.deliver(wire.encode([sent], origin=2, seq=1, flags=wire.FLAG_OFFLOAD if sender_offload else 0))
    assert len(tap.written) == 1
    cap.close()
    assert read_pcap(path)[1] == [(frame(1), 60), (frame(2), 60), (frame(3), 60)]


# ---------------------------------------------------------------- /metrics from a snapshot

SNAPSHOT = {
    "version": "0.1.0", "uptime": 12.5, "origin": "0badcafe", "encryption": True,
    "tap": {"name": "tap9", "mtu": 1500, "offload": True, "read_frames": 10, "read_bytes": 980,
            "written_frames": 11, "written_bytes": 1078},
    "drops": {"auth": 2, "replay": 0},
    "links": [{"id": 3, "peer": "ws://127.0.0.1:7001/ws", "kind": "direct", "state": "open",
               "since": 1.7e9, "rx_messages": 5, "rx_bytes": 500, "tx_messages": 6, "tx_bytes": 600,
               "drops": {"auth": 2, "replay": 0}}],
}


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_collector_exposes_the_snapshot():
    content_type, body = metrics.exposition(metrics.registry(lambda: SNAPSHOT))
    assert content_type.startswith("text/plain; version=0.0.4")
    text = body.decode()
    got = samples(text)
    link = (("kind", "direct"), ("link", "3"), ("peer", "ws://127.0.0.1:7001/ws"))
    assert got[("gelf_uptime_seconds", ())] == 12.5
    assert got[("gelf_info", (("encryption", "true"), ("offload", "true"), ("origin", "0badcafe"),
                              ("tap", "tap9"), ("version", "0.1.0")))] == 1
    assert got[("gelf_tap_frames_total", (("direction", "read"),))] == 10
    assert got[("gelf_tap_bytes_total", (("direction", "written"),))] == 1078
    assert got[("gelf_drops_total", (("reason", "auth"),))] == 2
    assert got[("gelf_drops_total", (("reason", "replay"),))] == 0
    assert got[("gelf_link_messages_total", tuple(sorted(link + (("direction", "tx"),))))] == 6
    assert got[("gelf_link_bytes_total", tuple(sorted(link + (("direction", "rx"),))))] == 500
    assert got[("gelf_link_drops_total", tuple(sorted(link + (("reason", "auth"),))))] == 2
    assert ("gelf_link_drops_total", tuple(sorted(link + (("reason", "replay"),)))) not in got
    assert got[("gelf_link_up", tuple(sorted(link + (("state", "open"),))))] == 1


def test_openmetrics_when_asked_for():
    content_type, body = metrics.exposition(metrics.registry(lambda: SNAPSHOT),
                                            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n") and b"gelf_tap_frames_total{" in body


def test_collector_reads_the_snapshot_at_each_scrape():
    calls = []
    reg = metrics.registry(lambda: calls.append(1) or SNAPSHOT)
    assert calls == []
    metrics.exposition(reg)
    metrics.exposition(reg)
    assert len(calls) == 2
