"""The relay page as people see it: screenshots on a desktop and a phone, no horizontal overflow
on the phone, live throughput figures, human errors (unreachable, refused, key mismatch read
from the servers' /stats; every wrong-peer diagnosis is in test_page_diagnosis.py), and tokens
kept out of the address bar, the history and the DOM. Servers' taps sit in namespaces the tests
create; everything else runs on 127.0.0.1."""

import json
import struct
import urllib.error
import urllib.parse
import urllib.request

import pytest

import helpers
from helpers import ADDR, REPO, assert_pings, link_selector, wait_link_state

pytestmark = pytest.mark.usefixtures("need_root", "need_chromium")

ARTIFACTS = REPO / "tests" / "artifacts"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
KEY = "b04c96f0e62fd14424e7e58e3d8ba957"
OTHER_KEY = "00112233445566778899aabbccddeeff"
TOKEN = "correct-horse"


# ---------------------------------------------------------------- helpers

@pytest.fixture
def open_view(open_page):
    """Factory: open_view(url, viewport, phone=False, dark=False) -> a Page in a fresh context of
    that size (a phone context is mobile, touch, 3x pixels)."""

    def open_(url, viewport, phone=False, dark=False):
        opts = {"viewport": viewport, "color_scheme": "dark" if dark else "light"}
        if phone:
            opts.update(is_mobile=True, has_touch=True, device_scale_factor=3)
        return open_page(url, **opts)

    return open_


def pair(gelf_server, ns_addr, extra1=(), extra2=()):
    """Two servers, each tap in its own namespace with ADDR[0] / ADDR[1]."""
    s1, s2 = gelf_server(extra=list(extra1)), gelf_server(extra=list(extra2))
    return (s1, s2), (ns_addr(s1, ADDR[0]), ns_addr(s2, ADDR[1]))


def quiet_ipv6(server):
    """No IPv6 on the tap (no neighbour discovery or MLD chatter): only the tests' pings flow."""
    helpers.run(["ip", "netns", "exec", server.ns, "sysctl", "-qw",
                 f"net.ipv6.conf.{server.dev}.disable_ipv6=1"])


def ping_burst(bg, ns, addr, count=400, interval=0.05, size=56):
    """Background pings (stopped at teardown by the bg fixture)."""
    return bg(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", str(interval),
               "-s", str(size), "-W", "10", addr], name=f"ping {ns} -> {addr}")


def card(port, host="127.0.0.1", path="/ws"):
    return f'li.link[data-url="ws://{host}:{port}{path}"]'


def wait_problem(page, selector, kind, timeout=60):
    page.wait_for_function(
        "([sel, kind]) => { const e = document.querySelector(sel); return e && e.dataset.problem === kind; }",
        arg=[selector, kind], timeout=timeout * 1000, polling=100)


def wait_graph(page, port, samples=12, timeout=120):
    """Wait until both graphs of the card hold `samples` samples, the newest non-zero."""
    page.wait_for_function(
        """([sel, n]) => ['rx', 'tx'].every(d => {
            const line = document.querySelector(`${sel} .dir-${d} .spark .line`);
            const rate = document.querySelector(`${sel} .${d}-rate`);
            const d_ = line && line.getAttribute('d');
            return d_ && d_.split('L').length >= n && Number(rate.dataset.value) > 0;
        })""",
        arg=[link_selector(port), samples], timeout=timeout * 1000, polling=250)


def rates(page, port):
    """{rx: (data-value, text), tx: (...)} of the card's rate figures."""
    return page.evaluate(
        """sel => Object.fromEntries(['rx', 'tx'].map(d => {
            const e = document.querySelector(`${sel} .${d}-rate`);
            return [d, [Number(e.dataset.value), e.textContent.trim()]];
        }))""", link_selector(port))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def horizontal_overflow(page):
    """Elements whose right edge passes the viewport (none inside scrollable containers: the
    page has none), and the document's scroll width."""
    return page.evaluate("""() => {
        const w = window.innerWidth;
        const out = [];
        for (const el of document.querySelectorAll('body *')) {
            const r = el.getBoundingClientRect();
            if (r.width === 0 && r.height === 0) continue;
            if (r.right > w + 0.5 || r.left < -0.5) {
                out.push(`${el.tagName.toLowerCase()}.${el.getAttribute('class') || ''}: ` +
                         `${r.left.toFixed(1)}..${r.right.toFixed(1)} (viewport ${w})`);
            }
        }
        return {innerWidth: w, scrollWidth: document.documentElement.scrollWidth, out};
    }""")


def scene(gelf_server, ns_addr, netns, bg, open_view, viewport, phone=False, dark=False):
    """Two servers linked by a page with traffic flowing, plus a card for a dead port
    (unreachable), one for a token server added without its token (refused) and one with a long
    path; returns (page, (s1, s2))."""
    (s1, s2), (ns1, _) = pair(gelf_server, ns_addr)
    s3 = gelf_server(extra=["--token", TOKEN])
    dead = helpers.free_port()
    long_path = "/a/rather/long/path/behind/some/reverse/proxy/that/must/wrap/ws"
    url = (f"{s1.url}/?peer=127.0.0.1:{s2.port}&peer=127.0.0.1:{s3.port}"
           f"&peer=ws://127.0.0.1:{dead}{long_path}")
    page = open_view(url, viewport, phone=phone, dark=dark)
    wait_link_state(page, s1.port, "open")
    wait_link_state(page, s2.port, "open")
    wait_problem(page, card(s3.port), "token-missing")
    wait_problem(page, card(dead, path=long_path), "unreachable")
    assert helpers.wait_ping(ns1, ADDR[1]), "no ping through the page"
    # Steps of different sizes, so that the graphs have a shape; then a steady flow.
    for size in (300, 1400, 700):
        ping_burst(bg, ns1, ADDR[1], count=120, interval=0.02, size=size).wait(120)
    ping_burst(bg, ns1, ADDR[1], count=3000, interval=0.02, size=1100)
    for s in (s1, s2):
        wait_graph(page, s.port, samples=20)
    return page, (s1, s2)


# ---------------------------------------------------------------- 1. screenshots

@pytest.mark.parametrize("name,viewport,phone,dark", [
    ("desktop", DESKTOP, False, False),
    ("phone", PHONE, True, False),
    ("phone-dark", PHONE, True, True),
], ids=["desktop", "phone", "phone-dark"])
def test_screenshots(gelf_server, ns_addr, netns, bg, open_view, name, viewport, phone, dark):
    page, servers = scene(gelf_server, ns_addr, netns, bg, open_view, viewport, phone, dark)
    for s in servers:  # the server's own facts, read from its /stats
        page.wait_for_selector(f"{link_selector(s.port)} .badge.tap:not([hidden])")
        assert page.locator(f"{link_selector(s.port)} .badge.tap").text_content() == s.dev
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"page-{name}-{viewport['width']}x{viewport['height']}.png"
    path.unlink(missing_ok=True)
    page.screenshot(path=str(path), full_page=True)
    scale = 3 if phone else 1
    (width, height), nbytes = png_size(path)
    assert width == viewport["width"] * scale
    assert height >= viewport["height"] * scale
    assert nbytes > 20_000, f"{path}: only {nbytes} bytes"


# ---------------------------------------------------------------- 2. phone: no horizontal overflow

def test_phone_no_horizontal_overflow(gelf_server, ns_addr, netns, bg, open_view):
    page, _ = scene(gelf_server, ns_addr, netns, bg, open_view, PHONE, phone=True)
    # And a form error, the longest text the form shows.
    page.fill("#peer-input", "ftp://" + "x" * 80 + ".example:21")
    page.click("#add-form button[type=submit]")
    page.wait_for_selector("#add-message.error")
    res = horizontal_overflow(page)
    assert res["innerWidth"] == PHONE["width"]
    assert res["scrollWidth"] <= res["innerWidth"], res
    assert res["out"] == [], "\n".join(res["out"])


# ---------------------------------------------------------------- 3. throughput figures move

def test_throughput_figures_change_with_traffic(gelf_server, ns_addr, open_view, bg):
    (s1, s2), (ns1, ns2) = pair(gelf_server, ns_addr)
    for s in (s1, s2):
        quiet_ipv6(s)
    page = open_view(f"{s1.url}/?peer=127.0.0.1:{s2.port}", PHONE, phone=True)
    wait_link_state(page, s1.port, "open")
    wait_link_state(page, s2.port, "open")

    # Idle: every rate reads zero (bounded wait: samples are taken every second).
    page.wait_for_function(
        """sels => sels.every(sel => ['rx', 'tx'].every(d => {
            const e = document.querySelector(`${sel} .${d}-rate`);
            return e && e.dataset.value === '0' && /\\d/.test(e.textContent);
        }))""", arg=[link_selector(s1.port), link_selector(s2.port)], timeout=60_000, polling=200)
    before = {s.port: rates(page, s.port) for s in (s1, s2)}
    for r in before.values():
        assert r["rx"][0] == 0 and r["tx"][0] == 0, before

    ping_burst(bg, ns1, ADDR[1], count=1200, interval=0.05)  # 60 s: as long as the wait below
    page.wait_for_function(
        """sels => sels.every(sel => ['rx', 'tx'].every(d =>
            Number(document.querySelector(`${sel} .${d}-rate`).dataset.value) > 0))""",
        arg=[link_selector(s1.port), link_selector(s2.port)], timeout=60_000, polling=200)
    during = {s.port: rates(page, s.port) for s in (s1, s2)}
    for port in during:
        for d in ("rx", "tx"):
            assert during[port][d][0] > 0, during
            assert during[port][d][1] != before[port][d][1], (before, during)
    # The totals and the page's own API agree that traffic went both ways.
    for s in (s1, s2):
        for counter in ("rx-frames", "rx-bytes", "tx-frames", "tx-bytes"):
            assert helpers.link_counter(page, s.port, counter) > 0, (s.port, counter)
    api = page.evaluate("gelfRelay.stats().map(l => [l.rxRate, l.txRate])")
    assert len(api) == 2


# ---------------------------------------------------------------- 4. key mismatch from /stats

@pytest.mark.parametrize("extra1,extra2,reason", [
    (["--key", KEY], ["--key", OTHER_KEY], "auth"),
    (["--key", KEY], [], "no_key"),
    ([], ["--key", KEY], "not_sealed"),
], ids=["different-keys", "key-vs-none", "none-vs-key"])
def test_key_mismatch_shown_on_rejecting_server(gelf_server, ns_addr, open_view, bg, extra1, extra2, reason):
    (s1, s2), (ns1, _) = pair(gelf_server, ns_addr, extra1, extra2)
    page = open_view(f"{s1.url}/?peer=127.0.0.1:{s2.port}", PHONE, phone=True)
    wait_link_state(page, s1.port, "open")
    wait_link_state(page, s2.port, "open")
    # ns1 sends (ARP for ADDR[1]); s2 cannot take what s1 sends, whatever the direction of the key.
    ping_burst(bg, ns1, ADDR[1], count=300, interval=0.2)  # 60 s: as long as the wait below

    alert = page.locator(f"{link_selector(s2.port)} .alert-key")
    alert.wait_for(state="visible", timeout=60_000)
    text = alert.text_content()
    assert "key mismatch" in text.lower() and "--key" in text, text
    assert alert.get_attribute("data-reason") == reason
    assert s2.stats()["drops"][reason] > 0  # the page says what the server counts

    # The lock badges say which server encrypts.
    for s, extra in ((s1, extra1), (s2, extra2)):
        badge = page.locator(f"{link_selector(s.port)} .badge.enc")
        badge.wait_for(state="visible")
        assert badge.get_attribute("data-value") == ("true" if extra else "false")
        assert badge.text_content().strip() == ("encrypted" if extra else "unencrypted")


def test_matching_keys_show_no_mismatch(gelf_server, ns_addr, open_view):
    (s1, s2), (ns1, ns2) = pair(gelf_server, ns_addr, ["--key", KEY], ["--key", KEY])
    page = open_view(f"{s1.url}/?peer=127.0.0.1:{s2.port}", PHONE, phone=True)
    wait_link_state(page, s1.port, "open")
    wait_link_state(page, s2.port, "open")
    assert_pings(ns1, ADDR[1], count=10)
    assert_pings(ns2, ADDR[0], count=5)
    # Two more /stats polls of each server after the traffic: still no mismatch.
    polls = page.evaluate("gelfRelay.stats().map(l => l.statsPolls)")
    page.wait_for_function(
        "before => gelfRelay.stats().every((l, i) => l.statsPolls >= before[i] + 2)",
        arg=polls, timeout=60_000, polling=200)
    for s in (s1, s2):
        sel = link_selector(s.port)
        assert page.locator(f"{sel} .alert-key").is_hidden()
        assert page.locator(f"{sel} .badge.enc").get_attribute("data-value") == "true"
        assert s.stats()["drops"]["auth"] == 0
    assert page.evaluate("gelfRelay.stats().map(l => l.keyMismatch)") == ["", ""]


# ---------------------------------------------------------------- human errors: unreachable, refused

def test_unreachable_and_refused_in_words(gelf_server, open_view):
    s1 = gelf_server()
    s2 = gelf_server(extra=["--token", TOKEN])
    dead = helpers.free_port()
    page = open_view(f"{s1.url}/?peer=127.0.0.1:{s2.port}&peer=127.0.0.1:{dead}", PHONE, phone=True)
    wait_problem(page, card(dead), "unreachable")
    wait_problem(page, card(s2.port), "token-missing")
    unreachable = page.locator(f"{card(dead)} .alert-link").text_content()
    refused = page.locator(f"{card(s2.port)} .alert-link").text_content()
    assert unreachable.startswith("Unreachable") and f"127.0.0.1:{dead}" in unreachable, unreachable
    assert "403" in refused and "token" in refused, refused

    # A wrong token is refused too (the same server is the same card); the right one opens it,
    # and the error goes away.
    page.evaluate("url => gelfRelay.add(url)", f"127.0.0.1:{s2.port}#wrong")
    wait_problem(page, card(s2.port), "token-wrong")
    assert "does not accept this token" in page.locator(f"{card(s2.port)} .alert-link").text_content()
    page.evaluate("url => gelfRelay.add(url)", f"127.0.0.1:{s2.port}#{TOKEN}")
    page.wait_for_selector(f"{card(s2.port)}[data-state=open]", timeout=30_000)
    assert page.locator(f"{card(s2.port)} .alert-link").is_hidden()
    assert page.locator(card(s2.port)).count() == 1
    # The refusals were 403s that the server counted, not guesses.
    with urllib.request.urlopen(f"{s2.url}/stats?token={TOKEN}", timeout=30) as r:
        assert json.loads(r.read())["drops"]["forbidden"] > 0


# ---------------------------------------------------------------- tokens: memory and the tab only

# Where a token must not be: the address, the session history the page can see, the document
# (attributes and text), the page's API, and what it shows.
WHERE_TOKENS_ARE_NOT = """() => ({
    href: location.href,
    historyLength: history.length,
    html: document.documentElement.outerHTML,
    text: document.body.innerText,
    api: JSON.stringify(gelfRelay.stats()) + JSON.stringify(gelfRelay.links),
})"""


def assert_no_token(page, *tokens, entries=2):
    seen = page.evaluate(WHERE_TOKENS_ARE_NOT)
    # The tab's first entry (about:blank) and this page's one, whose address the page replaced:
    # it never pushes an entry (one would keep the address with the token, for the Back button).
    assert seen["historyLength"] == entries, seen["historyLength"]
    for token in tokens:
        forms = {token, urllib.parse.quote(token, safe=""), urllib.parse.quote_plus(token)}
        for where in ("href", "html", "text", "api"):
            for form in forms:
                assert form not in seen[where], f"token {form!r} in {where}: {seen[where][:2000]}"
        assert token not in page.url


def all_open(page, count, timeout=30):
    page.wait_for_function(
        "n => gelfRelay.links.length === n && gelfRelay.links.every(l => l.state === 'open')",
        arg=count, timeout=timeout * 1000, polling=100)


def test_tokens_stay_out_of_the_address_bar_history_and_the_dom(gelf_server, open_page):
    own, peer, typed = "own-Secret-4711", "peer/Secret&0815", "typed-Secret-9"
    s1 = gelf_server(extra=["--token", own])
    s2 = gelf_server(extra=["--token", peer])
    s3 = gelf_server(extra=["--token", typed])
    quoted = urllib.parse.quote(peer, safe="")
    page = open_page(f"{s1.url}/?token={own}&peer=127.0.0.1:{s2.port}%23{quoted}")
    all_open(page, 2)
    assert_no_token(page, own, peer)
    # The address bar keeps the peer list, so the relay can still be bookmarked.
    assert page.evaluate("location.search") == f"?peer=127.0.0.1:{s2.port}"
    # Cards are found by their public URL (tests/helpers.py link_selector).
    for s in (s1, s2):
        assert page.locator(link_selector(s.port)).count() == 1

    # A token typed into the form goes the same way.
    page.fill("#peer-input", f"127.0.0.1:{s3.port}#{typed}")
    page.click("#add-form button[type=submit]")
    all_open(page, 3)
    assert page.locator("#add-message").text_content() == f"Added ws://127.0.0.1:{s3.port}/ws."
    assert_no_token(page, own, peer, typed)
    assert page.evaluate("location.search") == f"?peer=127.0.0.1:{s2.port}&peer=127.0.0.1:{s3.port}"
    # Only this tab's sessionStorage holds them, by public URL, for a reload.
    saved = json.loads(page.evaluate("sessionStorage.getItem('gelf.tokens')"))
    assert saved == {f"ws://127.0.0.1:{s.port}/ws": t for s, t in ((s1, own), (s2, peer), (s3, typed))}

    # A removed link takes its token with it.
    page.evaluate("url => gelfRelay.remove(url)", f"127.0.0.1:{s3.port}")
    all_open(page, 2)
    saved = json.loads(page.evaluate("sessionStorage.getItem('gelf.tokens')"))
    assert f"ws://127.0.0.1:{s3.port}/ws" not in saved


def test_a_reload_keeps_the_links_and_their_tokens(gelf_server, open_page):
    peer = "peer-Secret-0815"
    s1 = gelf_server()
    s2 = gelf_server(extra=["--token", peer])
    # The # of host:port#token left unencoded: the browser makes it the page's fragment.
    page = open_page(f"{s1.url}/?peer=127.0.0.1:{s2.port}#{peer}")
    all_open(page, 2)
    assert_no_token(page, peer)
    assert page.evaluate("location.hash") == ""

    page.reload()
    all_open(page, 2)
    assert_no_token(page, peer)

    # Away and back through the session history: the entry it returns to has no token either.
    page.goto("about:blank")
    page.go_back()
    all_open(page, 2)
    assert_no_token(page, peer, entries=3)
    assert page.url == f"{s1.url}/?peer=127.0.0.1:{s2.port}"


def test_a_reload_of_a_page_from_a_server_with_a_token(gelf_server, open_page):
    own, peer = "own-Secret-4711", "peer-Secret-0815"
    s1 = gelf_server(extra=["--token", own])
    s2 = gelf_server(extra=["--token", peer])
    page = open_page(f"{s1.url}/?token={own}&peer=127.0.0.1:{s2.port}%23{peer}")
    all_open(page, 2)
    assert_no_token(page, own, peer)
    page.reload()  # the page took its token out of the address bar: GET / is served without it
    all_open(page, 2)
    assert_no_token(page, own, peer)


# ---------------------------------------------------------------- a peer that drains slowly

# Replaces the browser's bufferedAmount of chosen sockets with a figure the test sets: it grows
# by what the page sends and never drains, as for a peer behind a slow path.
HELD_BUFFER = """
(() => {
  const Real = WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Real {
    constructor(...args) { super(...args); this.__held = null; window.__sockets.push(this); }
    get bufferedAmount() { return this.__held === null ? super.bufferedAmount : this.__held; }
    send(data) { if (this.__held !== null) this.__held += data.byteLength; return super.send(data); }
  };
})();
"""


def test_a_peer_that_drains_slowly_loses_messages_instead_of_queueing_them(gelf_server, ns_addr, browser):
    """The page measures how fast each socket drains and lets only ~20 ms of it wait in the
    browser (at least 64 KiB): a peer whose 300 KB never drain gets drops (`txDropped`), where a
    fixed 8 MiB bound let a slow path's ping wait for 0.65 s. Once it drains again, it gets
    everything."""
    (s1, s2), (ns1, ns2) = pair(gelf_server, ns_addr)
    ctx = browser.new_context()
    try:
        ctx.add_init_script(HELD_BUFFER)
        page = ctx.new_page()
        page.set_default_timeout(60_000)
        page.goto(f"{s1.url}/?peer=127.0.0.1:{s2.port}")
        wait_link_state(page, s1.port, "open")
        wait_link_state(page, s2.port, "open")
        assert_pings(ns1, ADDR[1], count=5)
        held = f"__sockets.filter(w => w.url.includes(':{s2.port}/'))"
        assert page.evaluate(f"{held}.length") == 1
        page.evaluate(f"{held}.forEach(w => {{ w.__held = 300000; }})")
        loss, out = helpers.ping(ns1, ADDR[1], count=10, interval=0.2, wait=2)
        dropped = page.evaluate(f"gelfRelay.stats().find(l => l.url.includes(':{s2.port}')).txDropped")
        assert dropped > 0 and loss > 0, (dropped, out)
        page.evaluate(f"{held}.forEach(w => {{ w.__held = null; }})")  # drains again: the real figure
        assert_pings(ns1, ADDR[1], count=10)
    finally:
        ctx.close()
