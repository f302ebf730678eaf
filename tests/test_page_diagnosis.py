"""The page names the real cause when a link does not open (issue 13, finding 3).

A browser tells a page nothing about a failed WebSocket, so the page asks the address over http
and https what is there (static/gelf.js, `diagnose`): gelf says so in every response (X-Gelf),
its 403s say whether the token or the page's origin was refused, and its TLS port answers plain
http with a 400 that says HTTPS. Each test puts one wrong peer behind a real page in headless
Chromium and checks the sentence on that link's card, word for word. The old page said "needs a
token" for some other web server and "nothing answers" for ws:// to a TLS server and wss:// to a
plain one. Everything runs on 127.0.0.1.
"""

import functools
import http.client
import http.server
import json
import threading
import urllib.request

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

import helpers

pytestmark = pytest.mark.usefixtures("need_root", "need_chromium")

TOKEN = "correct-horse"
WAIT = 60  # seconds for a diagnosis: a failed attempt, then up to four probes of 5 s at most


def card(port, scheme="ws", path="/ws"):
    return f'li.link[data-url="{scheme}://127.0.0.1:{port}{path}"]'


def diagnosis(page, selector, kind, timeout=WAIT):
    """Wait until the card shows problem `kind`; return the sentence on it."""
    try:
        page.wait_for_function(
            "([sel, kind]) => { const e = document.querySelector(sel); return e && e.dataset.problem === kind; }",
            arg=[selector, kind], timeout=timeout * 1000, polling=200)
    except PlaywrightTimeout:
        now = page.evaluate("""sel => { const e = document.querySelector(sel);
            return e ? [e.dataset.problem, e.querySelector('.alert-link').textContent] : null; }""", selector)
        raise AssertionError(f"{selector} never showed {kind!r} within {timeout} s; it shows {now!r}") from None
    alert = page.locator(f"{selector} .alert-link")
    assert alert.is_visible()
    return alert.text_content()


@pytest.fixture
def web_server(tmp_path):
    """Factory: web_server(cors) -> port of a plain Python web server that is not gelf. It answers
    every path it has a file for (/stats and /ws among them) with 200, and with cors=True lets any
    page read its answers (Access-Control-Allow-Origin: *)."""
    servers = []
    (tmp_path / "stats").write_text('{"hello": "not gelf"}')
    (tmp_path / "ws").write_text("no WebSocket here")

    def start(cors):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def end_headers(self):
                if cors:
                    self.send_header("Access-Control-Allow-Origin", "*")
                super().end_headers()

            def log_message(self, *args):
                pass

        handler = functools.partial(Handler, directory=str(tmp_path))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        servers.append((httpd, thread))
        return httpd.server_address[1]

    yield start
    for httpd, thread in servers:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def page_on(gelf_server, open_page, peers, **context):
    """A page on a fresh plain gelf server with these ?peer= values; returns (page, server)."""
    own = gelf_server()
    query = "&".join(f"peer={p}" for p in peers)
    page = open_page(f"{own.url}/?{query}", **context)
    helpers.wait_link_state(page, own.port, "open", timeout=30)
    return page, own


def add(page, text):
    page.fill("#peer-input", text)
    page.click("#add-form button[type=submit]")


# ---------------------------------------------------------------- some other web server

@pytest.mark.parametrize("cors", [False, True], ids=["opaque", "readable"])
def test_another_web_server_is_not_gelf(gelf_server, open_page, web_server, cors):
    port = web_server(cors)
    page, _ = page_on(gelf_server, open_page, [f"127.0.0.1:{port}"])
    text = diagnosis(page, card(port), "not-gelf")
    assert text == f"Something answers at 127.0.0.1:{port}, but it is not a gelf server. Check the address and the port."


# ---------------------------------------------------------------- the wrong scheme

def test_ws_to_a_tls_server_says_use_wss(gelf_server, open_page, tmp_path):
    cert, key = helpers.make_certificate(tmp_path)
    tls = gelf_server(extra=["--ssl-cert", str(cert), "--ssl-key", str(key)])
    # This browser trusts the certificate: its https probe reads the server's X-Gelf.
    page, _ = page_on(gelf_server, open_page, [f"127.0.0.1:{tls.port}"], ignore_https_errors=True)
    text = diagnosis(page, card(tls.port), "use-wss")
    assert text == f"127.0.0.1:{tls.port} speaks TLS: use wss://127.0.0.1:{tls.port}/ws."
    # The advice works.
    add(page, f"wss://127.0.0.1:{tls.port}/ws")
    page.wait_for_selector(f"{card(tls.port, 'wss')}[data-state=open]", timeout=30_000)


def plain_http_status(port):
    """(status, X-Gelf, Access-Control-Allow-Origin) of a plain http GET /stats to a TLS port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/stats", headers={"Origin": "http://127.0.0.1:1"})
        r = conn.getresponse()
        return r.status, r.getheader("X-Gelf"), r.getheader("Access-Control-Allow-Origin")
    except OSError:
        return None, None, None
    finally:
        conn.close()


def test_ws_to_a_tls_server_with_an_untrusted_certificate(gelf_server, open_page, tmp_path):
    cert, key = helpers.make_certificate(tmp_path)
    tls = gelf_server(extra=["--ssl-cert", str(cert), "--ssl-key", str(key)])
    # What the page relies on: without it an untrusted TLS server is, to a page, nothing at all.
    status, says_gelf, acao = plain_http_status(tls.port)
    assert status == 400 and says_gelf and acao == "*", (status, says_gelf, acao)
    page, _ = page_on(gelf_server, open_page, [f"127.0.0.1:{tls.port}"])
    text = diagnosis(page, card(tls.port), "use-wss-cert")
    host = f"127.0.0.1:{tls.port}"
    assert text == (f"{host} speaks TLS: use wss://{host}/ws. This browser does not trust its certificate "
                    f"yet: open https://{host}/ once and accept it.")


def test_wss_to_a_plain_server_says_use_ws(gelf_server, open_page):
    plain = gelf_server()
    page, _ = page_on(gelf_server, open_page, [f"wss://127.0.0.1:{plain.port}/ws"])
    text = diagnosis(page, card(plain.port, "wss"), "use-ws")
    assert text == f"127.0.0.1:{plain.port} serves plain http, not TLS: use ws://127.0.0.1:{plain.port}/ws."


def test_a_wrong_path_says_where_the_websocket_is(gelf_server, open_page):
    other = gelf_server()
    page, _ = page_on(gelf_server, open_page, [f"ws://127.0.0.1:{other.port}/socket"])
    text = diagnosis(page, card(other.port, path="/socket"), "ws-refused")
    host = f"127.0.0.1:{other.port}"
    assert text == f"{host} is a gelf server, but has no WebSocket at /socket: use ws://{host}/ws."


# ---------------------------------------------------------------- gelf's refusals

def test_missing_then_wrong_then_right_token(gelf_server, open_page):
    guarded = gelf_server(extra=["--token", TOKEN])
    host = f"127.0.0.1:{guarded.port}"
    page, _ = page_on(gelf_server, open_page, [host])
    sel = card(guarded.port)
    assert diagnosis(page, sel, "token-missing") == \
        f"Refused (403): the gelf server at {host} needs a token. Add it as {host}#token."

    # The same server with a token is the same card, trying the new token.
    add(page, f"{host}#wrong")
    assert diagnosis(page, sel, "token-wrong") == (
        f"Refused (403): the gelf server at {host} does not accept this token. "
        f"Add it again as {host}#token with the right one.")
    add(page, f"{host}#{TOKEN}")
    page.wait_for_selector(f"{sel}[data-state=open]", timeout=30_000)
    assert page.locator(sel).count() == 1 and page.locator(f"{sel} .alert-link").is_hidden()
    with urllib.request.urlopen(f"{guarded.url}/stats?token={TOKEN}", timeout=30) as r:
        assert json.loads(r.read())["drops"]["forbidden"] > 0  # the refusals were the server's 403s


def test_a_refused_origin_names_allow_origin(gelf_server, open_page):
    strict = gelf_server(extra=["--allow-origin", "http://127.0.0.1:1"])
    page, own = page_on(gelf_server, open_page, [f"127.0.0.1:{strict.port}"])
    origin = f"http://127.0.0.1:{own.port}"
    text = diagnosis(page, card(strict.port), "origin")
    assert text == (f"Refused (403): the gelf server at 127.0.0.1:{strict.port} does not accept pages from "
                    f"{origin}. Start it with --allow-origin {origin}, or open this page from a server it accepts.")


# ---------------------------------------------------------------- nothing there

def test_nothing_listening_is_unreachable(gelf_server, open_page):
    dead = helpers.free_port()
    page, _ = page_on(gelf_server, open_page, [f"127.0.0.1:{dead}", f"wss://127.0.0.1:{dead}/ws"])
    host = f"127.0.0.1:{dead}"
    assert diagnosis(page, card(dead), "unreachable") == (
        f"Unreachable: nothing answers at {host}, over http or https. "
        "Is gelf running there, and can this browser reach that port?")
    assert diagnosis(page, card(dead, "wss"), "unreachable-tls") == (
        f"Unreachable: nothing answers at {host}, over https or http. Is gelf running there, and can "
        f"this browser reach that port? If its certificate is self-signed, open https://{host}/ once and accept it.")


def test_the_troubleshooting_section_quotes_the_pages_own_sentences():
    """README, Troubleshooting: every sentence it quotes from a link's card is one the page says."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    readme = (repo / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    page = (repo / "static" / "gelf.js").read_text()
    quotes = [q for q in re.findall(r'"([^"`]{12,})"', section) if not q.startswith("...")]
    assert len(quotes) >= 6, quotes
    for quote in quotes:
        quote = " ".join(quote.split())  # the README wraps lines
        # host:port, ORIGIN and the like are the page's ${...} placeholders; "..." skips words.
        for fragment in re.split(r"host:port|ORIGIN|\.\.\.|https?://\S+|wss?://\S+", quote):
            fragment = fragment.strip(" .,:")
            if len(fragment) > 3:
                assert fragment in page, f"the README quotes {quote!r}, but the page never says {fragment!r}"
