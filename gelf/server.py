"""The CherryPy application: the relay page, its assets, /stats, /metrics and the /ws endpoint.

ws4py's WebSocketTool upgrades `/ws` requests and its WebSocketPlugin hands each connection
to WebSocketLinks, gelf's link loop (loop.py), as a SocketLink (links.py) whose received
messages go to Pump.deliver.
"""

import functools
import logging
import string
import sys
import time
from pathlib import Path

import cherrypy
from ws4py.server.cherrypyserver import WebSocketPlugin, WebSocketTool

from gelf import __version__, fastws, gate, guard, handshake, metrics
from gelf.links import Link
from gelf.logs import Redact
from gelf.loop import LinkLoop

log = logging.getLogger("gelf.server")


def asset_dir(name):
    """`static/` or `templates/`: beside the package in a checkout, under share/gelf when installed."""
    for base in (Path(__file__).resolve().parent.parent, Path(sys.prefix) / "share" / "gelf"):
        candidate = base / name
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("gelf's %s directory is missing from this installation" % name)


class Upgrade:
    """What ws4py's WebSocketTool makes of a successful /ws upgrade (its `handler_cls`): the
    socket and the request's environ. The WebSocketPlugin hands it to its manager,
    WebSocketLinks, which owns the socket from then on."""

    def __init__(self, sock, protocols=None, extensions=None, environ=None, heartbeat_freq=None):
        self.sock = sock
        self.environ = environ or {}


class SocketLink(Link):
    """A peer that connected to our /ws: a browser page, a headless relay or a gelf server that
    dialed us (these two say so in their User-Agent, see client.py)."""

    def __init__(self, peer, kind, links, drops, deliver, release=None):  # gate: release
        super().__init__(peer, drops, deliver)
        self.kind = kind
        self.links = links
        self.release = release  # gate: gives the connection's admission slot back

    def opened(self):
        self.links.add(self)
        log.info("link %d open: %s %s", self.id, self.kind, self.peer)

    def ended(self, code, why):
        super().ended(code, why)
        if self.release is not None:  # gate
            self.release()
        self.links.remove(self)
        log.info("link %d closed: %s (%s%s)", self.id, self.peer, int(code), ": %s" % why if why else "")


class WebSocketLinks(LinkLoop):
    """The manager ws4py's WebSocketPlugin drives (start, add, close_all, stop, join): gelf's link
    loop, which also carries the links this server dials (client.py)."""

    admission = None  # gate: the gate.Admission whose slots upgraded connections hold; set by mount()

    def __init__(self, links, drops, deliver, max_message, **timeouts):
        super().__init__(**timeouts)
        self.links = links
        self.drops = drops
        self.deliver = deliver
        self.max_message = max_message

    def add(self, upgrade):
        """Take over one upgraded /ws connection (called in the CherryPy worker that upgraded it)."""
        env = upgrade.environ
        peer = "%s:%s" % (env.get("REMOTE_ADDR", "?"), env.get("REMOTE_PORT", "?"))
        agent = env.get("HTTP_USER_AGENT", "")
        kind = "browser"
        if agent.startswith("gelf/"):
            kind = "relay" if agent.endswith(" relay") else "direct"
        release = self.admission and functools.partial(self.admission.release, upgrade.sock)  # gate
        link = SocketLink(peer, kind, self.links, self.drops, self.deliver, release)  # gate: release
        self.attach(link, upgrade.sock, fastws.Connection(client=False, max_message=self.max_message))


def check_upgrade():
    """Refuse a malformed /ws upgrade request with the status RFC 6455 4.2 asks for (ws4py's
    tool, which runs next, would answer 500)."""
    request = cherrypy.serving.request
    problem = handshake.check_request(request.method, request.headers.get)
    if problem:
        status, text, headers = problem
        cherrypy.serving.response.headers.update(headers)
        raise cherrypy.HTTPError(status, text)


# What a foreign page relaying for this server may read in /stats (what the page shows).
SUMMARY = ("version", "uptime", "origin", "encryption", "tap", "drops")


class Root:
    """The HTTP side: the relay page and the statistics."""

    def __init__(self, tap, pump, links, drops):
        self.tap = tap
        self.pump = pump
        self.links = links
        self.drops = drops
        self.started = time.monotonic()
        self.registry = metrics.registry(self.snapshot)
        self.page = string.Template((asset_dir("templates") / "index.html").read_text())

    @cherrypy.expose
    def index(self, **params):
        return self.page.safe_substitute(dev=self.tap.name, version=__version__)

    @cherrypy.expose
    def ws(self, **params):
        """Handled by the WebSocket tool; this body runs only after the upgrade."""

    def snapshot(self):
        """The server's numbers, read once: /stats returns them as JSON, /metrics exposes them."""
        pump = self.pump
        return {
            "version": __version__,
            "uptime": round(time.monotonic() - self.started, 3),
            "origin": "%08x" % pump.origin,
            "encryption": pump.sealer is not None,
            "tap": {
                "name": self.tap.name,
                "mtu": self.tap.mtu,
                "offload": self.tap.offload,
                "read_frames": pump.read.count,
                "read_bytes": pump.read.bytes,
                "written_frames": pump.written.count,
                "written_bytes": pump.written.bytes,
            },
            "drops": self.drops.snapshot(),
            "links": [link.describe() for link in self.links.listing()],
        }

    @cherrypy.expose
    @cherrypy.tools.json_out()
    def stats(self, **params):
        """The snapshot as JSON. Pages relaying for this server show its errors (a key mismatch)
        from it: a foreign page that may relay reads the summary, without links (guard.py)."""
        snapshot = self.snapshot()
        if guard.allow_reading(cherrypy.serving.request, cherrypy.serving.response) is guard.Origin.FOREIGN:
            return {key: snapshot[key] for key in SUMMARY}
        return snapshot

    @cherrypy.expose
    def metrics(self, **params):
        """The same numbers for Prometheus."""
        content_type, body = metrics.exposition(self.registry, cherrypy.request.headers.get("Accept"))
        cherrypy.response.headers["Content-Type"] = content_type
        return body


def serve(engine, host, port, manager, limits=None, tls=None, debug=False):
    """The HTTP side every gelf process serves on: CherryPy on host:port (https with `tls`,
    (certificate file, private key file)) behind the gate with `limits` (gate.Limits), and
    ws4py's plugin handing upgraded /ws connections to `manager`. Also gelf-mirror's relay."""
    limits = limits or gate.Limits()
    manager.admission = gate.Admission(limits.max_connections, limits.max_per_address)
    plugin = WebSocketPlugin(engine)
    plugin.manager = manager
    plugin.subscribe()
    cherrypy.tools.websocket = WebSocketTool()
    cherrypy.tools.gelf_upgrade = cherrypy.Tool("on_start_resource", check_upgrade, priority=20)
    settings = {
        "server.socket_host": host,
        "server.socket_port": port,
        "server.shutdown_timeout": 0.5,
        "engine.autoreload.on": False,
        "checker.on": False,
        "log.screen": debug,
        "request.show_tracebacks": debug,
    }
    if tls:
        settings.update({
            "server.ssl_module": "builtin",
            "server.ssl_certificate": tls[0],
            "server.ssl_private_key": tls[1],
        })
    cherrypy.config.update(settings)
    cherrypy.server.httpserver = gate.GateServer(cherrypy.server, manager.admission, limits.header_timeout)


def redact_logs(app):
    """-d/-v show CherryPy's logs: no ?token=... in them."""
    for log_manager in (cherrypy.log, app.log):
        for logger in (log_manager.access_log, log_manager.error_log):
            logger.addFilter(Redact())


def mount(engine, host, port, tap, pump, links, drops, manager, debug=False, token=None, tls=None,
          policy=None, limits=None):
    """Configure CherryPy to serve gelf on host:port; the caller starts the engine.

    `manager` (WebSocketLinks) takes every upgraded /ws connection; `tls` is (certificate
    file, private key file) to serve https and wss; `policy` says which pages may use it;
    `limits` (gate.Limits) what clients may hold.
    """
    serve(engine, host, port, manager, limits, tls, debug)
    root = {"tools.encode.on": True}
    guard.install(root, token, policy or guard.OriginPolicy(), drops, __version__)
    config = {
        "/": root,
        "/ws": {"tools.gelf_upgrade.on": True, "tools.websocket.on": True, "tools.websocket.handler_cls": Upgrade},
        "/static": {
            "tools.gelf_token.on": False,
            "tools.staticdir.on": True,
            "tools.staticdir.dir": str(asset_dir("static")),
        },
    }
    redact_logs(cherrypy.tree.mount(Root(tap, pump, links, drops), "/", config))
