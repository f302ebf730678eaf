"""gelf-mirror: live TCP traffic mirroring (issue 9; the design is docs/mirror.md).

Three stages, each testable alone: capture (packets.py, capture.py), TCP reassembly
(reassembly.py, no I/O) and outputs (outputs/), joined by the stream events of events.py.
"""
