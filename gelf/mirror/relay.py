"""Relay mode (`gelf-mirror -r -p PORT -u UPSTREAM`): take gelf-mirror streams on /ws and replay
them to this relay's own outputs (plain servers, further relays, a recording).

It is gelf's server stack with a different deliver: CherryPy and ws4py upgrade /ws behind the
gate (gate.py: admission, header timeouts, TLS sniffing), guard.py checks --token and refuses
browser pages, and the link loop (loop.py) carries every connection. `MirrorRelay.deliver` opens
each TYPE_STREAM message (events.unseal: the same sealing as frames) and dispatches its events
under connection ids of its own, since two capture instances may both number from 1.

Anything else on a link (a wrong key, garbage, a gelf Ethernet client's DATA) is dropped,
counted under its reason, said in one log line, and the link is closed: a stream with a hole in
it cannot be replayed. When a link ends, its connections get a CLOSE `shutdown`.
"""

import functools
import itertools
import logging
import threading
import time

import cherrypy
from prometheus_client import CONTENT_TYPE_LATEST

from gelf import __version__, fastws, guard, server, wire
from gelf.httphead import REFUSED_HEADER
from gelf.links import LinkSet
from gelf.mirror import events
from gelf.mirror.events import Kind
from gelf.seen import SeenFilter
from gelf.stats import Drops

log = logging.getLogger("gelf.mirror.relay")

EXPLAIN = {
    "auth": "its messages fail authentication: its --key does not match this relay's",
    "not_sealed": "it sends unencrypted streams but this relay has a key: give it the same --key",
    "no_key": "it sends encrypted streams but this relay has no key: start the relay with the same --key",
    "unknown_type": "it is a gelf (Ethernet) client, not gelf-mirror: this port takes mirror streams only",
    "replay": "it repeats messages already received (a replay)",
}
MAX_CONNS = 100_000  # open connections one link may stream (reassembly.MAX_STREAMS on its side)
MIRROR_HEADER = "X-Gelf-Mirror"  # on every answer of a relay: what capture's probe looks for (probe.py)


class NoPages(guard.OriginPolicy):
    """No web page has any business with a relay: a browser's Origin (http:// or https://, which a
    page cannot change) is refused (guard.py). ws4py's client, which DialLink uses, sends ws://."""

    def judge(self, origin, scheme, host):
        if not origin or origin.strip().lower().startswith(("ws://", "wss://")):
            return guard.Origin.SAME
        return guard.Origin.REFUSED


class MirrorRelay:
    """What a relay does with the messages its links deliver (the link loop's thread calls in)."""

    def __init__(self, dispatcher, sealer=None):
        self.dispatcher = dispatcher  # a pipeline.Pipeline: filters and comparison, then the outputs
        self.sealer = sealer
        self.links = LinkSet()
        self.drops = Drops()
        self.seen = SeenFilter()
        self.manager = None  # RelayLinks, set by mount()
        self._lock = threading.Lock()
        self._conns = {}  # link id -> {their conn: our conn}
        self._ids = itertools.count(1)
        self._refused = set()  # ids of links being closed for what they sent
        self.started = time.monotonic()

    def deliver(self, data, link):
        if link.id in self._refused:
            return
        try:
            message, evs = events.unseal(data, self.sealer)
            if not self.seen.fresh(message.origin, message.seq):
                raise wire.WireError("replay")
        except wire.WireError as err:
            link.drops.add(err.reason)
            self._refuse(link, err, data)
            return
        with self._lock:
            ids = self._conns.setdefault(link.id, {})
            for event in evs:
                if event.kind == Kind.OPEN:
                    if event.conn in ids:  # an OPEN again: end the first one
                        self.dispatcher.dispatch(events.close_event(ids[event.conn], time.time(), "shutdown"))
                    elif len(ids) >= MAX_CONNS:
                        link.drops.add("malformed")  # capture's reassembler never holds this many
                        continue
                    ids[event.conn] = next(self._ids)
                ours = ids.get(event.conn)
                if ours is None:
                    link.drops.add("malformed")  # data for a connection it never opened
                    continue
                if event.kind == Kind.CLOSE:
                    del ids[event.conn]
                self.dispatcher.dispatch(event._replace(conn=ours))

    def _refuse(self, link, err, data):
        self._refused.add(link.id)
        why = EXPLAIN.get(err.reason, "it does not send gelf-mirror streams (%s: %s)" % (err.reason, err))
        if err.reason == "unknown_type" and data[1:2] not in (bytes([wire.TYPE_DATA]), bytes([wire.TYPE_CONTROL])):
            why = "it sends messages of an unknown type (%d)" % data[1]
        log.warning("link %d (%s): %s; closing it", link.id, link.peer, why)
        self.manager.close(link, fastws.CloseCode.POLICY_VIOLATION, "not a gelf-mirror stream: %s" % err.reason)

    def ended(self, link):
        """A link is gone: the connections it was streaming end here too."""
        self._refused.discard(link.id)
        with self._lock:
            ids = self._conns.pop(link.id, {})
            for ours in ids.values():
                self.dispatcher.dispatch(events.close_event(ours, time.time(), "shutdown"))

    def snapshot(self):
        """/stats: the relay's links and drops, then its pipeline's (pipeline.Pipeline.document):
        `mirror` (dispatcher and outputs), `filters`, `compare` (what `gelf-mirror report` reads)."""
        mirror = self.dispatcher.document()
        filters, compare = mirror.pop("filters"), mirror.pop("compare")
        return {
            "version": __version__,
            "uptime": round(time.monotonic() - self.started, 3),
            "encryption": self.sealer is not None,
            "drops": self.drops.snapshot(),
            "links": [link.describe() for link in self.links.listing()],
            "mirror": mirror,
            "filters": filters,
            "compare": compare,
        }


class RelayLink(server.SocketLink):
    def __init__(self, relay, *args):
        super().__init__(*args)
        self.relay = relay

    def ended(self, code, why):
        super().ended(code, why)
        self.relay.ended(self)


class RelayLinks(server.WebSocketLinks):
    """server.WebSocketLinks whose links tell the relay when they end."""

    def __init__(self, relay, **timeouts):
        super().__init__(relay.links, relay.drops, relay.deliver, events.MAX_STREAM_MESSAGE, **timeouts)
        self.relay = relay
        relay.manager = self

    def add(self, upgrade):
        env = upgrade.environ
        peer = "%s:%s" % (env.get("REMOTE_ADDR", "?"), env.get("REMOTE_PORT", "?"))
        agent = env.get("HTTP_USER_AGENT", "")
        kind = agent.rpartition(" ")[2] if agent.startswith("gelf/") else "browser"
        release = self.admission and functools.partial(self.admission.release, upgrade.sock)
        link = RelayLink(self.relay, peer, kind, self.links, self.drops, self.deliver, release)
        self.attach(link, upgrade.sock, fastws.Connection(client=False, max_message=self.max_message))


def log_refusal():
    """One line for each request guard.py refused (a wrong or missing --token), on the relay's side."""
    response = cherrypy.serving.response
    if str(response.status).startswith("403"):
        request = cherrypy.serving.request
        log.warning("refused %s from %s: %s", request.path_info, request.remote.ip,
                    "wrong or missing token" if response.headers.get(REFUSED_HEADER) == "token"
                    else "pages may not use a gelf-mirror relay")


class Root:
    def __init__(self, relay):
        self.relay = relay

    @cherrypy.expose
    def index(self, **params):
        return "gelf-mirror relay %s: capture instances connect to /ws\n" % __version__

    @cherrypy.expose
    def ws(self, **params):
        """Handled by the WebSocket tool; this body runs only after the upgrade."""

    @cherrypy.expose
    @cherrypy.tools.json_out()
    def stats(self, **params):
        return self.relay.snapshot()

    @cherrypy.expose
    def metrics(self, **params):
        """Prometheus text: the pipeline's registry (outputs, response comparison per upstream)."""
        cherrypy.response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return self.relay.dispatcher.metrics()


def mount(engine, host, port, relay, manager, token=None, tls=None, limits=None, debug=False):
    """Configure CherryPy to serve the relay on host:port, as server.mount does for gelf."""
    server.serve(engine, host, port, manager, limits, tls, debug)
    cherrypy.tools.mirror_refusals = cherrypy.Tool("before_finalize", log_refusal, priority=90)
    root = {"tools.encode.on": True, "tools.mirror_refusals.on": True}
    guard.install(root, token, NoPages(), relay.drops, __version__)
    root["tools.response_headers.headers"] = root["tools.response_headers.headers"] + [(MIRROR_HEADER, "relay")]
    config = {"/": root,
              "/ws": {"tools.gelf_upgrade.on": True, "tools.websocket.on": True,
                      "tools.websocket.handler_cls": server.Upgrade}}
    server.redact_logs(cherrypy.tree.mount(Root(relay), "/", config))
