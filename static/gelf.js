// gelf relay page: this browser is an L1 hub between gelf servers.
// Every binary WebSocket message received on one link is sent, unchanged, to every
// other open link (never back to its sender), once: see docs/design.md for the wire
// format. The page reads only the 16-byte header (version, origin, seq) to drop
// malformed messages and duplicates; it never looks into the body (which may be sealed).
(() => {
  "use strict";

  const RETRY_MIN_MS = 1000;
  const RETRY_MAX_MS = 30000;
  const CONNECT_TIMEOUT_MS = 10000;   // give up on a socket stuck in CONNECTING
  const MAX_BUFFERED = 8 * 1024 * 1024; // a peer this far behind drops messages instead
  const UI_INTERVAL_MS = 500;

  const secure = location.protocol === "https:";
  const wsScheme = secure ? "wss:" : "ws:";
  // The token the page itself was loaded with (?token=...), for our own server's /ws.
  const ownToken = new URLSearchParams(location.search).get("token");

  // ---- duplicate suppression -------------------------------------------------------

  const HEADER_SIZE = 16;   // wire format v1: version, type, flags, reserved, origin, seq
  const VERSION = 1;
  const WINDOW = 2048;      // as gelf/seen.py WINDOW; a power of two (ring index = seq & MASK)
  const MASK = WINDOW - 1;
  const MAX_ORIGINS = 1024; // as gelf/seen.py MAX_ORIGINS
  const TWO32 = 4294967296;

  // Which (origin, seq) message ids this page already relayed. Mirrors gelf/seen.py
  // (SeenFilter): per origin, the highest seq seen and a bitmap of the WINDOW seqs up to
  // it; a seq older than the window, or already in it, is refused. That makes the page
  // relay each message at most once, so any topology of pages and servers is loop-free.
  // Same decisions as seen.py, stored differently: seqs (near 2**61, beyond Number
  // precision) arrive as two uint32 halves, and the bitmap is a ring of WINDOW bits indexed
  // by seq % WINDOW (slots of the seqs the top moves past are cleared) rather than a shifted
  // integer, so the per-message path allocates nothing. Beyond MAX_ORIGINS the least
  // recently used origin is forgotten, as in seen.py; recency is a use stamp rather than
  // a reordering (reordering a Map per message costs more than the rest of the relay).
  class SeenFilter {
    constructor() {
      this.origins = new Map(); // origin -> {hi, lo, bits, used}
      this._clock = 0;          // use stamps: a higher `used` is more recent
      this._lastOrigin = -1;    // cache: the origin of the previous call, the most recent
      this._last = null;
    }

    get size() { return this.origins.size; }

    // True the first time (origin, seq) is offered inside the window; records it.
    // `hi` and `lo` are the high and low 32 bits of seq (DataView.getUint32).
    fresh(origin, hi, lo) {
      let s = this._last;
      if (origin !== this._lastOrigin) {
        s = this.origins.get(origin);
        this._lastOrigin = origin;
        if (s === undefined) {
          s = { hi, lo, bits: new Uint32Array(WINDOW >>> 5), used: ++this._clock };
          s.bits[(lo & MASK) >>> 5] = 1 << (lo & 31);
          this.origins.set(origin, s);
          if (this.origins.size > MAX_ORIGINS) this._evict();
          this._last = s;
          return true;
        }
        s.used = ++this._clock;
        this._last = s;
      }
      const bits = s.bits;
      // seq - top: exact while |difference| < 2**53, and far beyond WINDOW otherwise.
      const d = (hi - s.hi) * TWO32 + (lo - s.lo);
      if (d > 0) {
        // New top: the slots of seqs top+1 .. seq held seqs now out of the window.
        if (d >= WINDOW) {
          bits.fill(0);
        } else {
          let slot = (s.lo + 1) & MASK;
          for (let k = d; k > 0;) {
            if ((slot & 31) === 0 && k >= 32) {
              bits[slot >>> 5] = 0;
              slot = (slot + 32) & MASK;
              k -= 32;
            } else {
              bits[slot >>> 5] &= ~(1 << (slot & 31));
              slot = (slot + 1) & MASK;
              k--;
            }
          }
        }
        s.hi = hi;
        s.lo = lo;
        bits[(lo & MASK) >>> 5] |= 1 << (lo & 31);
        return true;
      }
      if (-d >= WINDOW) return false; // older than the window
      const slot = lo & MASK;
      const bit = 1 << (slot & 31);
      if ((bits[slot >>> 5] & bit) !== 0) return false; // already seen
      bits[slot >>> 5] |= bit;
      return true;
    }

    // Forget the least recently used origin (only when a new origin overflows the table).
    _evict() {
      let oldest = -1;
      let stamp = Infinity;
      this.origins.forEach((s, origin) => {
        if (s.used < stamp) { stamp = s.used; oldest = origin; }
      });
      this.origins.delete(oldest);
    }
  }

  const seen = new SeenFilter();

  // ---- input → WebSocket URL -------------------------------------------------------

  const HOST_PORT = /^(\[[0-9A-Fa-f:.]+(?:%25[\w.~-]+)?\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$/;

  // Hides access tokens in text shown to people: `token=...` in a query, `#...` after an
  // address. The real URL stays in data-url and in gelfRelay.
  function mask(text) {
    return String(text).replace(/([?&]token=)[^&#]*/gi, "$1\u2026").replace(/#.+$/, "#\u2026");
  }

  // Returns the normalized ws:// or wss:// URL for `input`, or throws an Error whose
  // message can be shown to a person. An access token is given as `host:port#token`
  // (or `ws://host:port/ws#token`) and becomes `?token=token`; a URL that already has
  // `?token=` keeps it.
  function normalize(input) {
    let text = String(input ?? "").trim();
    if (!text) throw new Error("Enter a server as host:port or ws://host:port/ws.");

    let token = null;
    const hash = text.indexOf("#");
    if (hash !== -1) {
      token = text.slice(hash + 1);
      text = text.slice(0, hash);
      if (!token) throw new Error(`"${mask(text)}#" has an empty token: write ${mask(text)}#token, or leave out the #.`);
    }

    let url;
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) {
      const scheme = text.slice(0, text.indexOf(":")).toLowerCase();
      if (scheme !== "ws" && scheme !== "wss") {
        throw new Error(`"${scheme}://" is not a WebSocket URL: use ws://, wss:// or host:port.`);
      }
      try {
        url = new URL(text);
      } catch {
        throw new Error(`"${mask(text)}" is not a valid URL.`);
      }
      if (!url.hostname) throw new Error(`"${mask(text)}" has no host.`);
      if (url.pathname === "" || url.pathname === "/") url.pathname = "/ws";
    } else {
      const m = HOST_PORT.exec(text);
      if (!m) {
        if (/^[^\s:/]+$/.test(text) || /^\[[^\]]*\]$/.test(text)) {
          throw new Error(`"${mask(text)}" needs a port, for example ${mask(text)}:7000.`);
        }
        throw new Error(`"${mask(text)}" is not host:port, [ipv6]:port or a ws:// URL.`);
      }
      const port = Number(m[2]);
      if (port < 1 || port > 65535) throw new Error(`Port ${m[2]} is out of range (1-65535).`);
      try {
        url = new URL(`${wsScheme}//${m[1]}:${port}/ws`);
      } catch {
        throw new Error(`"${m[1]}" is not a valid host.`);
      }
    }
    url.hash = "";
    if (token !== null) {
      if (url.searchParams.has("token")) {
        throw new Error(`"${mask(input)}" gives a token twice (#token and ?token=): keep one.`);
      }
      url.searchParams.set("token", token);
    }
    return url.href;
  }

  function ownUrl() {
    const url = new URL(`${wsScheme}//${location.host}/ws`);
    if (ownToken !== null) url.searchParams.set("token", ownToken);
    return url.href;
  }

  // ---- links -----------------------------------------------------------------------

  const links = [];      // every link, in display order
  const openLinks = [];  // links whose socket is open: the relay fan-out list

  function detach(link) {
    const i = openLinks.indexOf(link);
    if (i !== -1) openLinks.splice(i, 1);
  }

  class Link {
    constructor(url, own) {
      this.url = url;
      this.own = own;
      this.state = "connecting";
      this.rxFrames = 0;
      this.rxBytes = 0;
      this.txFrames = 0;
      this.txBytes = 0;
      this.rxText = 0;     // text messages received and ignored
      this.rxBad = 0;      // binary messages dropped: shorter than a header or not version 1
      this.rxDup = 0;      // messages dropped: (origin, seq) already relayed or too old
      this.txDropped = 0;  // messages not sent because this socket was too far behind
      this.attempts = 0;
      this.retryDelay = RETRY_MIN_MS;
      this.retryAt = 0;
      this.lastClose = "";
      this.ws = null;
      this.removed = false;
      this._retryTimer = 0;
      this._connectTimer = 0;
      this._errored = false;
      this.view = new LinkView(this);
    }

    connect() {
      if (this.removed) return;
      clearTimeout(this._retryTimer);
      this._retryTimer = 0;
      this.retryAt = 0;
      this._errored = false;
      this.state = "connecting";
      this.attempts++;

      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (err) {
        this.state = "error";
        this.lastClose = secure && this.url.startsWith("ws:")
          ? "blocked: an https page can only reach wss:// servers"
          : mask(err.message);
        this._scheduleRetry();
        return;
      }
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      let opened = false;
      let timedOut = false;
      this._connectTimer = setTimeout(() => {
        if (this.ws === ws && ws.readyState === WebSocket.CONNECTING) {
          timedOut = true;
          ws.close();
        }
      }, CONNECT_TIMEOUT_MS);

      ws.onopen = () => {
        if (this.ws !== ws) return;
        clearTimeout(this._connectTimer);
        opened = true;
        this.state = "open";
        this.retryDelay = RETRY_MIN_MS;
        this.attempts = 0;
        this.lastClose = "";
        openLinks.push(this);
      };

      // The hot path: one handler per socket, a header check, one loop over the open links.
      // It allocates only the DataView over the header.
      ws.onmessage = (ev) => {
        const data = ev.data;
        if (typeof data === "string") { this.rxText++; return; }
        const n = data.byteLength;
        this.rxFrames++;
        this.rxBytes += n;
        if (n < HEADER_SIZE) { this.rxBad++; return; }
        const head = new DataView(data, 0, HEADER_SIZE);
        if (head.getUint8(0) !== VERSION) { this.rxBad++; return; }
        if (!seen.fresh(head.getUint32(4), head.getUint32(8), head.getUint32(12))) {
          this.rxDup++;
          return;
        }
        for (let i = 0; i < openLinks.length; i++) {
          const peer = openLinks[i];
          if (peer === this) continue;
          if (peer.ws.bufferedAmount > MAX_BUFFERED) { peer.txDropped++; continue; }
          peer.ws.send(data);
          peer.txFrames++;
          peer.txBytes += n;
        }
      };

      ws.onerror = () => {
        if (this.ws !== ws) return;
        this._errored = true;
        this.state = "error";
      };

      ws.onclose = (ev) => {
        if (this.ws !== ws) return;
        clearTimeout(this._connectTimer);
        detach(this);
        this.ws = null;
        // A refused upgrade (403: missing or wrong token) looks exactly like an unreachable
        // server from here, and probing it with a cross-origin fetch would be no better.
        if (timedOut) this.lastClose = "timed out";
        else if (ev.code === 1006) {
          this.lastClose = opened ? "connection lost" : "unreachable or refused (check the address and token)";
        }
        else this.lastClose = `closed (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`;
        this.state = this._errored ? "error" : "closed";
        this._scheduleRetry();
      };
    }

    _scheduleRetry() {
      if (this.removed) return;
      const delay = this.retryDelay;
      this.retryDelay = Math.min(delay * 2, RETRY_MAX_MS);
      this.retryAt = Date.now() + delay;
      this._retryTimer = setTimeout(() => this.connect(), delay);
    }

    // Retry now instead of waiting for the backoff timer (used when the network returns).
    retryNow() {
      if (!this.removed && !this.ws) this.connect();
    }

    close() {
      this.removed = true;
      clearTimeout(this._retryTimer);
      clearTimeout(this._connectTimer);
      detach(this);
      const ws = this.ws;
      this.ws = null;
      this.state = "closed";
      if (ws) {
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        try { ws.close(1000, "removed"); } catch { /* already closing */ }
      }
      this.view.el.remove();
    }

    toJSON() {
      const { url, own, state, rxFrames, rxBytes, txFrames, txBytes, rxText, txDropped } = this;
      return {
        url, own, state, rxFrames, rxBytes, txFrames, txBytes, rxText, txDropped,
        dupDropped: this.rxDup, badDropped: this.rxBad,
      };
    }
  }

  // ---- DOM -------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    if (attrs) for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    for (const c of children) el.append(c);
    return el;
  }

  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  function humanBytes(n) {
    let i = 0;
    while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${n} B` : `${n < 10 ? n.toFixed(1) : Math.round(n)} ${UNITS[i]}`;
  }
  const count = new Intl.NumberFormat();

  // Writes only when the value changed, so an idle page does no DOM work.
  class Counter {
    constructor(cls, fmt) {
      this.fmt = fmt;
      this.value = -1;
      this.el = h("td", { class: cls, "data-value": "0" }, fmt(0));
    }
    set(v) {
      if (v === this.value) return;
      this.value = v;
      this.el.dataset.value = String(v);
      this.el.textContent = this.fmt(v);
    }
  }

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function setDrops(el, n, one, many) {
    const v = String(n);
    if (el.dataset.value === v) return;
    el.dataset.value = v;
    el.textContent = n ? `${count.format(n)} ${n === 1 ? one : many} dropped` : "";
  }

  class LinkView {
    constructor(link) {
      this.link = link;
      this.rxFrames = new Counter("rx-frames", (v) => count.format(v));
      this.rxBytes = new Counter("rx-bytes", humanBytes);
      this.txFrames = new Counter("tx-frames", (v) => count.format(v));
      this.txBytes = new Counter("tx-bytes", humanBytes);
      this.rxRate = h("td", { class: "rate rx-rate" }, "–");
      this.txRate = h("td", { class: "rate tx-rate" }, "–");
      this.state = h("span", { class: "state" }, link.state);
      this.retry = h("span", { class: "retry" });
      this.extra = h("span", { class: "extra" });
      this.dup = h("span", { class: "dup", "data-value": "0",
        title: "messages this page had already relayed (a loop or a second path): not sent again" });
      this.bad = h("span", { class: "bad", "data-value": "0",
        title: "binary messages that are not gelf version 1 (too short or wrong version): not relayed" });
      this.lastRx = 0;
      this.lastTx = 0;
      this.lastTime = performance.now();

      const shown = mask(link.url);
      const remove = h("button", { type: "button", class: "remove", "aria-label": `Remove ${shown}` }, "Remove");
      remove.addEventListener("click", () => relay.remove(link.url));

      const row = (label, frames, bytes, rate) =>
        h("tr", null, h("th", { scope: "row" }, label), frames.el, bytes.el, rate);
      this.el = h("li", { class: "link", "data-url": link.url, "data-state": link.state },
        h("div", { class: "link-head" },
          this.state,
          link.own ? h("span", { class: "own" }, "this server") : "",
          h("span", { class: "url", title: shown }, shown),
          remove),
        h("table", { class: "stats" },
          h("thead", null, h("tr", null,
            h("td"), h("th", { scope: "col" }, "frames"), h("th", { scope: "col" }, "bytes"),
            h("th", { scope: "col" }, "rate"))),
          h("tbody", null,
            row("Received", this.rxFrames, this.rxBytes, this.rxRate),
            row("Sent", this.txFrames, this.txBytes, this.txRate))),
        h("p", { class: "note" }, this.retry, this.extra, this.dup, this.bad));
      if (link.own) this.el.dataset.own = "";
    }

    update(now, wall) {
      const l = this.link;
      if (this.el.dataset.state !== l.state) {
        this.el.dataset.state = l.state;
        setText(this.state, l.state);
      }
      this.rxFrames.set(l.rxFrames);
      this.rxBytes.set(l.rxBytes);
      this.txFrames.set(l.txFrames);
      this.txBytes.set(l.txBytes);

      const dt = (now - this.lastTime) / 1000;
      if (dt >= 0.9) {
        const open = l.state === "open";
        const rate = (bytes, last) => (open ? `${humanBytes(Math.round((bytes - last) / dt))}/s` : "–");
        setText(this.rxRate, rate(l.rxBytes, this.lastRx));
        setText(this.txRate, rate(l.txBytes, this.lastTx));
        this.lastRx = l.rxBytes;
        this.lastTx = l.txBytes;
        this.lastTime = now;
      }

      let retry = "";
      if (l.retryAt) {
        const s = Math.max(0, Math.ceil((l.retryAt - wall) / 1000));
        retry = `${l.lastClose ? l.lastClose + " · " : ""}retry in ${s} s`;
      } else if (l.state === "connecting" && l.attempts > 1) {
        retry = `attempt ${l.attempts}`;
      }
      setText(this.retry, retry);

      const extra = [];
      if (l.txDropped) extra.push(`${count.format(l.txDropped)} dropped (slow link)`);
      if (l.rxText) extra.push(`${count.format(l.rxText)} text ignored`);
      setText(this.extra, extra.join(" · "));
      setDrops(this.dup, l.rxDup, "duplicate", "duplicates");
      setDrops(this.bad, l.rxBad, "bad message", "bad messages");
    }
  }

  // ---- relay -----------------------------------------------------------------------

  const list = document.getElementById("links");
  const empty = document.getElementById("empty");
  const summary = document.getElementById("summary");
  const form = document.getElementById("add-form");
  const input = document.getElementById("peer-input");
  const message = document.getElementById("add-message");

  function find(urlOrHostPort) {
    let url;
    try { url = normalize(urlOrHostPort); } catch { url = String(urlOrHostPort); }
    return links.find((l) => l.url === url) || null;
  }

  function add(urlOrHostPort, own = false) {
    const url = normalize(urlOrHostPort);
    const existing = links.find((l) => l.url === url);
    if (existing) return existing;
    const link = new Link(url, own);
    links.push(link);
    list.append(link.view.el);
    link.connect();
    link.view.update(performance.now(), Date.now());
    rememberPeers();
    refresh();
    return link;
  }

  function remove(urlOrHostPort) {
    const link = find(urlOrHostPort);
    if (!link) return false;
    link.close();
    links.splice(links.indexOf(link), 1);
    rememberPeers();
    refresh();
    return true;
  }

  // Keep ?peer=... in the address bar in sync, so the current relay can be bookmarked
  // (other parameters, such as the page's own ?token=, stay). A URL that host:port or
  // host:port#token would produce again is written that way; anything else as the URL.
  function peerParam(url) {
    const u = new URL(url);
    if (u.protocol === wsScheme && u.port && u.pathname === "/ws") {
      if (!u.search) return u.host;
      const token = u.searchParams.get("token");
      if (token) {
        const short = `${u.host}#${token}`;
        try { if (normalize(short) === url) return short; } catch { /* keep the URL */ }
      }
    }
    return url;
  }
  function rememberPeers() {
    const params = new URLSearchParams(location.search);
    params.delete("peer");
    let qs = params.toString();
    for (const l of links) {
      if (l.own) continue;
      const v = encodeURIComponent(peerParam(l.url)).replace(/%3A/g, ":").replace(/%2F/g, "/");
      qs += `${qs ? "&" : ""}peer=${v}`;
    }
    const next = location.pathname + (qs ? `?${qs}` : "") + location.hash;
    if (next !== location.pathname + location.search + location.hash) {
      history.replaceState(history.state, "", next);
    }
  }

  function refresh() {
    const now = performance.now();
    const wall = Date.now();
    let open = 0;
    for (const l of links) {
      l.view.update(now, wall);
      if (l.state === "open") open++;
    }
    empty.hidden = links.length !== 0;
    setText(summary, links.length ? `${open} of ${links.length} open` : "");
  }

  function say(text, isError) {
    message.textContent = text;
    message.classList.toggle("error", !!isError);
    if (isError) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    let url;
    try {
      url = normalize(input.value);
    } catch (err) {
      say(err.message, true);
      input.focus();
      return;
    }
    if (links.some((l) => l.url === url)) {
      say(`${mask(url)} is already linked.`, false);
      return;
    }
    add(url);
    say(`Added ${mask(url)}.`, false);
    input.value = "";
  });
  input.addEventListener("input", () => {
    if (message.textContent) say("", false);
  });

  window.addEventListener("online", () => { for (const l of links) l.retryNow(); });

  const relay = {
    get links() { return links; },
    get open() { return openLinks; },
    add: (urlOrHostPort) => add(urlOrHostPort),
    remove,
    find,
    normalize,
    mask,
    stats: () => links.map((l) => l.toJSON()),
    get seenOrigins() { return seen.size; },
    SeenFilter,  // exposed for tests (compare with gelf/seen.py)
  };
  window.gelfRelay = relay;

  // ---- start -----------------------------------------------------------------------

  const peers = new URLSearchParams(location.search).getAll("peer");
  add(ownUrl(), true);

  const problems = [];
  for (const peer of peers) {
    try { add(peer); } catch (err) { problems.push(`peer=${mask(peer)}: ${err.message}`); }
  }
  if (problems.length) say(problems.join(" "), true);

  refresh();
  setInterval(refresh, UI_INTERVAL_MS);
})();
