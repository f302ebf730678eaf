"""gelf: an Ethernet link carried over WebSockets, with a web browser as the wire."""

__version__ = "0.1.0"
