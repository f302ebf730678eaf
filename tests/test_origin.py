"""Who may use a server from a browser (issue 10: cross-site WebSocket hijacking; issue 15: /stats
and the page's headers, tokens kept out of logs).

A "foreign" page is one served by another web server (here: a plain http.server on another
loopback port) that a user happens to visit; its script tries the gelf server's /ws and /stats.
"""

import functools
import http.server
import json
import threading
import urllib.error
import urllib.request

import pytest

import helpers
from gelf.guard import Origin, OriginPolicy, parse_origin

KEY = "000102030405060708090a0b0c0d0e0f"

FOREIGN_PAGE = """<!doctype html><meta charset="utf-8"><title>foreign</title>
<script>
// What a hostile page can try against a gelf server on this machine.
window.tryGelf = async (port, message) => {
  const result = {};
  try {
    const r = await fetch(`http://127.0.0.1:${port}/stats`, {cache: "no-store"});
    result.stats = r.ok ? await r.json() : r.status;
  } catch (e) { result.stats = "unreadable"; }
  result.socket = await new Promise(resolve => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      ws.send(new Uint8Array(message));
      setTimeout(() => { ws.close(); resolve("open"); }, 500);
    };
    ws.onerror = () => resolve("refused");
  });
  return result;
};
</script>"""


def test_origins_are_parsed_as_browsers_send_them():
    assert parse_origin("HTTPS://Relay.Example.org:8443/") == "https://relay.example.org:8443"
    for bad in ("relay.example.org", "ftp://x", "https://x/page", "https://x?y=1", "http://"):
        with pytest.raises(ValueError):
            parse_origin(bad)


def test_the_policy_judges_same_allowed_foreign_and_refused():
    open_policy, strict = OriginPolicy(), OriginPolicy(["http://relay:8000"])
    for policy in (open_policy, strict):
        assert policy.judge(None, "http", "gelf:7001") is Origin.SAME  # not a browser page
        assert policy.judge("http://gelf:7001", "http", "gelf:7001") is Origin.SAME  # its own page
    assert open_policy.judge("http://evil.example", "http", "gelf:7001") is Origin.FOREIGN
    assert strict.judge("http://evil.example", "http", "gelf:7001") is Origin.REFUSED
    assert strict.judge("http://relay:8000", "http", "gelf:7001") is Origin.ALLOWED
    assert strict.judge("https://relay:8000", "http", "gelf:7001") is Origin.REFUSED  # scheme counts


@pytest.fixture
def foreign_site(tmp_path):
    """A plain web server on another loopback port serving FOREIGN_PAGE; yields its URL."""
    (tmp_path / "foreign.html").write_text(FOREIGN_PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def unsealed_message():
    return list(helpers.encode([helpers.eth_frame(b"from a foreign page")], origin=0xBAD, seq=1))


@pytest.mark.usefixtures("need_root", "need_chromium")
def test_a_foreign_page_is_refused_when_origins_are_listed(gelf_server, open_page, foreign_site):
    relay_origin = "http://127.0.0.1:1"  # the one page allowed besides the server's own
    s = gelf_server(extra=["--allow-origin", relay_origin])
    page = open_page(f"{foreign_site}/foreign.html")
    result = page.evaluate("([port, m]) => window.tryGelf(port, m)", [s.port, unsealed_message()])
    assert result == {"stats": 403, "socket": "refused"}, result  # a refusal it can read, no data
    assert s.stats()["tap"]["written_frames"] == 0 and s.stats()["drops"]["forbidden"] >= 2
    # its own page still works
    own = open_page(s.url)
    assert own.evaluate("""port => new Promise(r => { const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`);
        ws.onopen = () => { ws.close(); r("open"); }; ws.onerror = () => r("refused"); })""", s.port) == "open"


@pytest.mark.usefixtures("need_root", "need_chromium")
def test_a_sealed_server_never_writes_a_foreign_pages_frames(gelf_server, open_page, foreign_site):
    s = gelf_server(extra=["--key", KEY])  # no --allow-origin: any page may connect, as today
    page = open_page(f"{foreign_site}/foreign.html")
    result = page.evaluate("([port, m]) => window.tryGelf(port, m)", [s.port, unsealed_message()])
    assert result["socket"] == "open"
    stats = result["stats"]
    assert isinstance(stats, dict) and "links" not in stats and stats["encryption"] is True, stats
    helpers.wait_for(lambda: s.stats()["drops"]["not_sealed"] >= 1, 30, what="the page's message to be dropped")
    assert s.stats()["tap"]["written_frames"] == 0


@pytest.mark.usefixtures("need_root")
def test_pages_carry_security_headers_and_tokens_stay_out_of_logs(gelf_server):
    secret = "s3cret-token-value"
    s = gelf_server(extra=["--token", secret])  # -d: CherryPy's access log is on
    with urllib.request.urlopen(f"{s.url}/?token={secret}", timeout=30) as r:
        headers = r.headers
    assert headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
    with urllib.request.urlopen(f"{s.url}/stats?token={secret}", timeout=30) as r:
        assert "links" in json.loads(r.read())  # no Origin: not a browser page, the whole snapshot
    assert headers["X-Gelf"] and "X-Gelf" in headers["Access-Control-Expose-Headers"]  # says who it is
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{s.url}/stats?token=wrong-{secret}", timeout=30)
    assert refused.value.code == 403 and refused.value.headers["X-Gelf"]  # on refusals too
    assert refused.value.headers["Access-Control-Allow-Origin"] == "*"  # readable by a relaying page
    helpers.wait_for(lambda: "GET /stats" in s.log_text(), 30, what="the access log")
    assert secret not in s.log_text() and "token=REDACTED" in s.log_text(), s.log_text()


@pytest.mark.usefixtures("need_root")
def test_an_unprotected_server_names_the_risk():
    code, out = helpers.gelf_once("--dev", helpers.tap_name(), str(helpers.free_port()), ready=r"any web page open")
    assert code == 0 and "any web page open in a browser" in out and "--allow-origin" in out, out
    code, out = helpers.gelf_once("--dev", helpers.tap_name(), "--allow-origin", "http://relay:8000",
                                  str(helpers.free_port()), ready=r"Relay listening", linger=1)
    assert code == 0 and "any web page" not in out, out
    code, out = helpers.gelf_once("--allow-origin", "relay:8000", str(helpers.free_port()))
    assert code == 1 and "gelf: error: --allow-origin: 'relay:8000' is not an origin" in out, out
    assert "Traceback" not in out
