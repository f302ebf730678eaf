"""Who may use a gelf server over HTTP: the token, the Origin policy, and the page's headers.

Browsers let any web page open a WebSocket to any address, localhost and the LAN included, and
send the page's Origin with it. So a page a user happens to visit can reach `ws://localhost:7001/ws`
and, on a server without key or token, read and inject frames: cross-site WebSocket hijacking.
`--allow-origin` lists the pages (besides the server's own) allowed to use it; without it any
page may, as the seed's relay page needs (it lives on one server and links others), and the
start-up warning says so. `/stats` follows the same policy: a foreign page that may relay reads
only the summary a relaying page needs, never the links, their peers or their URLs.

These run as CherryPy tools before the resource (and before ws4py's upgrade), so they parse
what they need themselves.
"""

import enum
import hmac
import urllib.parse

import cherrypy
from cherrypy.lib import httputil

from gelf.httphead import EXPOSED, GELF_HEADER, REFUSED_HEADER

# Sent with every response: no page of ours in a frame, no type sniffing, no Referer with a token.
SECURITY_HEADERS = [
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]
def identity_headers(version):
    return [(GELF_HEADER, version), ("Access-Control-Expose-Headers", EXPOSED)]


class Origin(enum.Enum):
    SAME = "same"  # no Origin (not a browser page), or the server's own page
    ALLOWED = "allowed"  # a page listed with --allow-origin
    FOREIGN = "foreign"  # any other page, while no --allow-origin is given: may relay, sees less
    REFUSED = "refused"  # any other page, once --allow-origin is given


def parse_origin(text):
    """An --allow-origin value as browsers send it: scheme://host[:port], lower case; ValueError else."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise ValueError("%r is not an origin: give scheme://host[:port], e.g. https://relay.example.org" % text)
    return "%s://%s" % (parts.scheme, parts.netloc.lower())


class OriginPolicy:
    def __init__(self, allowed=()):
        self.allowed = frozenset(parse_origin(o) for o in allowed)

    def judge(self, origin, scheme, host):
        if not origin:
            return Origin.SAME
        origin = origin.strip().rstrip("/").lower()
        if host and origin == "%s://%s" % (scheme, host.lower()):
            return Origin.SAME
        if origin in self.allowed:
            return Origin.ALLOWED
        return Origin.REFUSED if self.allowed else Origin.FOREIGN


def check_origin(policy, drops):
    """Judge the request's Origin (request.gelf_origin), and refuse (403) pages not allowed."""
    request = cherrypy.serving.request
    verdict = policy.judge(request.headers.get("Origin"), request.scheme, request.headers.get("Host"))
    request.gelf_origin = verdict
    if verdict is Origin.REFUSED:
        drops.add("forbidden")
        refuse("origin", "Pages from this origin may not use this server (see --allow-origin).")


def allow_reading(request, response):
    """CORS for /stats: an allowed page may read it; a foreign one too, as a summary."""
    verdict = getattr(request, "gelf_origin", Origin.SAME)
    if verdict is Origin.ALLOWED:
        response.headers["Access-Control-Allow-Origin"] = request.headers.get("Origin")
        response.headers["Vary"] = "Origin"
    elif verdict is Origin.FOREIGN:
        response.headers["Access-Control-Allow-Origin"] = "*"
    return verdict


def refuse(why, text):
    """403, readable by any page and saying why in X-Gelf-Refused, so that a relaying page can
    tell gelf's refusals apart (the text names no secret)."""
    cherrypy.serving.response.headers["Access-Control-Allow-Origin"] = "*"
    cherrypy.serving.response.headers[REFUSED_HEADER] = why
    raise cherrypy.HTTPError(403, text)


PUBLIC = ("/",)  # the page itself: the relay app holds no secret, and a reload of it must work
# although it took ?token= out of the address bar; what it reaches (/ws, /stats) needs the token


def check_token(expected, drops):
    """Refuse (403) a request whose `token` query parameter is not the server's token."""
    request = cherrypy.serving.request
    if request.path_info in PUBLIC:
        return
    given = httputil.parse_query_string(request.query_string).get("token")
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
        drops.add("forbidden")
        refuse("token", "A valid token is required: add ?token=... to the address.")


def install(root_config, token, policy, drops, version):
    """Add the tools to the config of "/" (every path below it, /ws included)."""
    cherrypy.tools.gelf_origin = cherrypy.Tool("on_start_resource", check_origin, priority=5)
    cherrypy.tools.gelf_token = cherrypy.Tool("on_start_resource", check_token, priority=10)
    root_config.update({
        "tools.gelf_origin.on": True, "tools.gelf_origin.policy": policy, "tools.gelf_origin.drops": drops,
        "tools.response_headers.on": True,
        "tools.response_headers.headers": SECURITY_HEADERS + identity_headers(version),
    })
    if token:
        root_config.update({"tools.gelf_token.on": True, "tools.gelf_token.expected": token,
                            "tools.gelf_token.drops": drops})
