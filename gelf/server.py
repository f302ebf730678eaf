"""The CherryPy application: the relay page, its assets, /stats, /metrics and the /ws endpoint.

ws4py's WebSocketPlugin and WebSocketTool turn `/ws` requests into GelfSocket handlers; each
handler is a Link (see links.py) whose received messages go to Pump.deliver.
"""

import functools
import hmac
import logging
import socket
import string
import sys
import threading
import time
from pathlib import Path

import cherrypy
from cherrypy.lib import httputil
from ws4py.manager import WebSocketManager
from ws4py.server.cherrypyserver import WebSocketPlugin, WebSocketTool
from ws4py.websocket import WebSocket

from gelf import __version__, fastws, gate, metrics
from gelf.links import Link

log = logging.getLogger("gelf.server")


def asset_dir(name):
    """`static/` or `templates/`: beside the package in a checkout, under share/gelf when installed."""
    for base in (Path(__file__).resolve().parent.parent, Path(sys.prefix) / "share" / "gelf"):
        candidate = base / name
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("gelf's %s directory is missing from this installation" % name)


class SocketLink(Link):
    """A peer that connected to our /ws: a browser page, a headless relay or a gelf server that
    dialed us (these two say so in their User-Agent, see client.py)."""

    def __init__(self, ws, peer, drops, kind="browser"):
        super().__init__(peer, drops)
        self.ws = ws
        self.kind = kind

    def _socket(self):
        return self.ws.sock

    def _abort(self):
        self.ws.close_connection()


class GelfSocket(fastws.FastReceive, WebSocket):
    """ws4py handler for one /ws connection, bound to the server's pump and links.

    ws4py accepts the connection and runs it; fastws reads and writes its frames.
    """

    def __init__(self, *args, pump, links, drops, admission=None, **kwargs):  # gate: admission
        super().__init__(*args, **kwargs)
        self.admission = admission  # gate: this connection's slot, released in closed()
        self.links = links
        self.drops = drops
        self.link = None
        self.reader = fastws.FrameReader(expect_masked=True, max_message=pump.max_message)
        self.deliver = pump.deliver

    def opened(self):
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (tests may use socketpairs); nothing to tune
        env = self.environ or {}
        peer = "%s:%s" % (env.get("REMOTE_ADDR", "?"), env.get("REMOTE_PORT", "?"))
        agent = env.get("HTTP_USER_AGENT", "")
        kind = "browser"
        if agent.startswith("gelf/"):
            kind = "relay" if agent.endswith(" relay") else "direct"
        self.link = SocketLink(self, peer, self.drops, kind)
        self.link.start()
        self.links.add(self.link)
        log.info("link %d open: %s %s", self.link.id, self.link.kind, peer)

    def closed(self, code, reason=None):
        if self.admission is not None:  # gate: the WebSocket's connection slot is free again
            self.admission.release(self.sock)
        link = self.link
        if link is not None:
            self.links.remove(link)
            link.stop()
            log.info("link %d closed: %s (%s)", link.id, link.peer, code)


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
            "links": [link.describe() for link in self.links],
        }

    @cherrypy.expose
    @cherrypy.tools.json_out()
    def stats(self, **params):
        # Pages relaying for this server show its errors (e.g. a key mismatch): allow them to read.
        cherrypy.response.headers["Access-Control-Allow-Origin"] = "*"
        return self.snapshot()

    @cherrypy.expose
    def metrics(self, **params):
        """The same numbers for Prometheus."""
        content_type, body = metrics.exposition(self.registry, cherrypy.request.headers.get("Accept"))
        cherrypy.response.headers["Content-Type"] = content_type
        return body


class OrderlyManager(WebSocketManager):
    """ws4py's manager, stopped in order: its stop() closes the epoll object while the manager
    thread may still be handling the last events (a traceback at every busy shutdown); here the
    thread ends first, then the poller is released."""

    def stop(self):
        self.running = False
        if self.is_alive() and threading.current_thread() is not self:
            self.join(2)
        super().stop()


def check_token(expected, drops):
    """Refuse (403) a request whose `token` query parameter is not the server's token.

    Runs before CherryPy has parsed the query string into request.params (and before ws4py's
    upgrade), so it parses the query string itself.
    """
    given = httputil.parse_query_string(cherrypy.serving.request.query_string).get("token")
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
        drops.add("forbidden")
        # Readable cross-origin, so a relaying page can tell "refused" from "unreachable".
        cherrypy.serving.response.headers["Access-Control-Allow-Origin"] = "*"
        raise cherrypy.HTTPError(403, "A valid token is required: add ?token=... to the address.")


def mount(engine, host, port, tap, pump, links, drops, debug=False, token=None, tls=None, limits=None):
    """Configure CherryPy to serve gelf on host:port; the caller starts the engine.

    `tls` is (certificate file, private key file) to serve https and wss; `limits` a gate.Limits.
    """
    limits = limits or gate.Limits()  # gate
    admission = gate.Admission(limits.max_connections, limits.max_per_address)  # gate
    plugin = WebSocketPlugin(engine)
    plugin.manager = OrderlyManager()
    plugin.subscribe()
    cherrypy.tools.websocket = WebSocketTool()
    cherrypy.tools.gelf_token = cherrypy.Tool("on_start_resource", check_token, priority=10)
    handler = functools.partial(GelfSocket, pump=pump, links=links, drops=drops, admission=admission)  # gate
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
    cherrypy.server.httpserver = gate.GateServer(cherrypy.server, admission, limits.header_timeout)  # gate
    root = {"tools.encode.on": True}
    if token:
        root.update({"tools.gelf_token.on": True, "tools.gelf_token.expected": token,
                     "tools.gelf_token.drops": drops})
    config = {
        "/": root,
        "/ws": {"tools.websocket.on": True, "tools.websocket.handler_cls": handler},
        "/static": {
            "tools.gelf_token.on": False,
            "tools.staticdir.on": True,
            "tools.staticdir.dir": str(asset_dir("static")),
        },
    }
    cherrypy.tree.mount(Root(tap, pump, links, drops), "/", config)
