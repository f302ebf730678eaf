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
  // What a peer's socket may have waiting in the browser before the page drops messages for it:
  // what it drains in BUFFER_DELAY_MS (its rate measured while it had a backlog), within
  // [MIN_BUFFERED, MAX_BUFFERED]. A fixed 8 MiB held 0.65 s on a loaded 20 Mbit/s path, where
  // the servers' own queues keep 20 ms (gelf/links.py): the TCP inside the tunnel must see a
  // drop to slow down. On a LAN the rate is high and the bound stays megabytes.
  const MIN_BUFFERED = 64 * 1024;
  const MAX_BUFFERED = 8 * 1024 * 1024;
  const BUFFER_DELAY_MS = 20;
  const RATE_PERIOD_MS = 100;  // how often a backlogged peer's drain rate is measured
  const UI_INTERVAL_MS = 500;

  const secure = location.protocol === "https:";
  const wsScheme = secure ? "wss:" : "ws:";

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
  // address. Links show their public URL (publicUrl) anyway; this is for what people typed.
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

  // A normalized URL without its token: what a link is known by, and the only form of it that
  // reaches the DOM, the address bar and the page's API.
  function publicUrl(url) {
    const u = new URL(url);
    u.searchParams.delete("token");
    return u.href;
  }

  function tokenOf(url) {
    return new URL(url).searchParams.get("token");
  }

  function withToken(url, token) {
    const u = new URL(url);
    if (token !== null && token !== undefined) u.searchParams.set("token", token);
    return u.href;
  }

  const ownPublicUrl = `${wsScheme}//${location.host}/ws`;

  // ---- tokens: in memory and in this tab's sessionStorage, never in the address bar -------
  //
  // A token in the address bar ends up in the history, in bookmarks and on screen, and one in an
  // attribute in anything that reads the DOM. So the page takes its own ?token= and the peers'
  // host:port#token from the address it was opened with, removes them from the address bar
  // (history.replaceState, before anything else runs), and keeps them in memory and in
  // sessionStorage: that survives a reload of the tab, never leaves it (a new tab starts empty)
  // and is gone when the tab closes. The address bar keeps the peer list, without tokens.

  const TOKENS_KEY = "gelf.tokens";

  function loadTokens() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(TOKENS_KEY) || "{}");
      return saved && typeof saved === "object" ? saved : {};
    } catch {
      return {};  // storage disabled or garbled: tokens then last until a reload
    }
  }

  function saveTokens(tokens) {
    try {
      if (Object.keys(tokens).length) sessionStorage.setItem(TOKENS_KEY, JSON.stringify(tokens));
      else sessionStorage.removeItem(TOKENS_KEY);
    } catch { /* storage disabled or full: tokens last until a reload */ }
  }

  // What the page was opened with: its own token and the peers, as given. A peer written
  // `?peer=host:port#token` without encoding the # leaves its token in the address's fragment:
  // that is taken as the last peer's token, as the README's form (host:port#token) means.
  function takeAddress() {
    const params = new URLSearchParams(location.search);
    const own = params.get("token");
    const peers = params.getAll("peer");
    const hash = location.hash.slice(1);
    if (hash && peers.length && !peers[peers.length - 1].includes("#")) {
      let token = hash;
      try { token = decodeURIComponent(hash); } catch { /* keep it as written */ }
      peers[peers.length - 1] += `#${token}`;
    }
    params.delete("token");
    const qs = params.toString();
    history.replaceState(history.state, "", location.pathname + (qs ? `?${qs}` : ""));
    return { own, peers };
  }

  // ---- links -----------------------------------------------------------------------

  const STATS_MS = 3000;           // /stats poll period of an open link
  const STATS_MAX_MS = 30000;      // ... backing off up to this while /stats does not answer
  const FETCH_TIMEOUT_MS = 5000;
  const MISMATCH_HOLD_MS = 60000;  // a key mismatch stays shown this long after its drops last grew
  // Drop reasons (docs/design.md) that mean "the servers do not share one key".
  const KEY_REASONS = ["auth", "not_sealed", "no_key"];

  const links = [];      // every link, in display order
  const openLinks = [];  // links whose socket is open: the relay fan-out list

  function detach(link) {
    const i = openLinks.indexOf(link);
    if (i !== -1) openLinks.splice(i, 1);
  }

  // The server's GET /stats for a link's ws:// URL: same host, port and ?token=, over http(s).
  function statsUrl(wsUrl) {
    const u = new URL(wsUrl);
    u.protocol = u.protocol === "wss:" ? "https:" : "http:";
    u.pathname = u.pathname.endsWith("/ws") ? `${u.pathname.slice(0, -3)}/stats` : "/stats";
    u.hash = "";
    return u.href;
  }

  // ---- why a link does not open ----------------------------------------------------
  //
  // A browser tells a page nothing about a failed WebSocket (every failure is close code 1006),
  // so the page asks the address over http(s) what is there. Every gelf response, refusals
  // included, says X-Gelf and is readable from any page; its 403s say whether the token or the
  // page's origin was refused, and its TLS port answers a plain http request with a 400 that
  // says "HTTPS". Anything else that answers is some other web server.

  const GELF_HEADER = "X-Gelf";
  const REFUSED_HEADER = "X-Gelf-Refused";  // on gelf's refusals: token, origin, tls, limit, request

  // Hosts a browser treats as potentially trustworthy: an https page may still reach them
  // over http and ws (mixed content rules spare them).
  function isLoopback(hostname) {
    const h = hostname.replace(/^\[|\]$/g, "").toLowerCase();
    return h === "localhost" || h.endsWith(".localhost") || h === "::1" || /^127\.\d+\.\d+\.\d+$/.test(h);
  }

  // A /stats answer without X-Gelf from a gelf server older than that header.
  function looksLikeStats(text) {
    try {
      const s = JSON.parse(text);
      return !!s && typeof s.origin === "string" && !!s.tap && typeof s.tap === "object";
    } catch {
      return false;
    }
  }

  // What answers a GET of `url`, as far as a page may know: {answer, status, text} where answer
  // is "gelf" (a readable answer from gelf), "other" (a readable answer from some other server),
  // "opaque" (something answered, but not readably: never gelf, whose answers all are), or "none"
  // (no answer within FETCH_TIMEOUT_MS: nothing listens, a reset, a TLS failure such as an
  // untrusted certificate, or a request the browser would not send).
  async function look(url) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    const options = { cache: "no-store", credentials: "omit", signal: ctl.signal };
    try {
      const r = await fetch(url, options);
      let gelf = r.headers.has(GELF_HEADER);
      let text = "";
      if (gelf && r.ok) r.body?.cancel().catch(() => {});  // its /stats: the header says enough
      else text = (await r.text()).slice(0, 16384);
      if (!gelf && r.ok) gelf = looksLikeStats(text);
      return { answer: gelf ? "gelf" : "other", status: r.status, text, refused: r.headers.get(REFUSED_HEADER) || "" };
    } catch {
      if (ctl.signal.aborted) return { answer: "none" };
      try {
        await fetch(url, { ...options, mode: "no-cors" });
        return { answer: "opaque" };
      } catch {
        return { answer: "none" };
      }
    } finally {
      clearTimeout(timer);
    }
  }

  const SAYS_HTTPS = /https/i;  // gelf's TLS port to a plain request: "... only speaks HTTPS ..."

  // Why the WebSocket to `wsUrl` (with its token, if any) did not open, as a problem kind (see
  // problemText). First /stats on the link's own scheme, then, unless that settled it, on the
  // other one (ws:// to a TLS server, wss:// to a plain one): that probe carries no token, so a
  // token meant for TLS never crosses the network in clear.
  async function diagnose(wsUrl) {
    const url = new URL(wsUrl);
    const tls = url.protocol === "wss:";
    const other = new URL(publicUrl(wsUrl));
    other.protocol = tls ? "ws:" : "wss:";
    // An https page may not fetch plain http from anything but loopback (mixed content).
    const otherAllowed = !(secure && tls && !isLoopback(url.hostname));

    const here = await look(statsUrl(wsUrl));
    if (here.answer === "gelf") {
      const status = here.status;
      if (status >= 200 && status < 300) return "ws-refused";
      if (status === 403) {
        // X-Gelf-Refused says why; the text, for servers older than that header.
        if (here.refused === "origin" || /Pages from this origin|--allow-origin/.test(here.text)) return "origin";
        if (here.refused === "token" || /token/i.test(here.text)) {
          return url.searchParams.has("token") ? "token-wrong" : "token-missing";
        }
        return "refused";
      }
      if (!tls && status === 400 && (here.refused === "tls" || SAYS_HTTPS.test(here.text))) {
        const there = await look(statsUrl(other.href));
        return there.answer === "gelf" ? "use-wss" : "use-wss-cert";
      }
      return `http-${status}`;
    }
    if (here.answer === "other") return "not-gelf";
    const there = otherAllowed ? await look(statsUrl(other.href)) : { answer: "none" };
    if (there.answer === "gelf") {
      if (!tls) return "use-wss";
      // Over http it is gelf. A TLS server says so (its https failed on the certificate);
      // otherwise it is a plain server.
      return there.status === 400 && (there.refused === "tls" || SAYS_HTTPS.test(there.text)) ? "cert" : "use-ws";
    }
    if (here.answer === "opaque" || there.answer !== "none") return "not-gelf";
    if (tls) return otherAllowed ? "unreachable-tls" : "unreachable-https-only";
    return "unreachable";
  }

  function problemText(kind, link) {
    const host = link.host;
    const path = new URL(link.url).pathname;
    const origin = location.origin;
    switch (kind) {
      case "unreachable":
        return `Unreachable: nothing answers at ${host}, over http or https. Is gelf running there, and can this browser reach that port?`;
      case "unreachable-tls":
        return `Unreachable: nothing answers at ${host}, over https or http. Is gelf running there, and can this browser reach that port? If its certificate is self-signed, open https://${host}/ once and accept it.`;
      case "unreachable-https-only":
        return `Unreachable: nothing answers at ${host} over https (an https page cannot try plain http there). Is gelf running there with --ssl-cert, and can this browser reach that port? If its certificate is self-signed, open https://${host}/ once and accept it.`;
      case "not-gelf":
        return `Something answers at ${host}, but it is not a gelf server. Check the address and the port.`;
      case "token-missing":
        return `Refused (403): the gelf server at ${host} needs a token. Add it as ${host}#token.`;
      case "token-wrong":
        return `Refused (403): the gelf server at ${host} does not accept this token. Add it again as ${host}#token with the right one.`;
      case "origin":
        return `Refused (403): the gelf server at ${host} does not accept pages from ${origin}. Start it with --allow-origin ${origin}, or open this page from a server it accepts.`;
      case "refused":
        return `Refused (403) by the gelf server at ${host}.`;
      case "use-wss":
        return `${host} speaks TLS: use wss://${host}${path}.`;
      case "use-wss-cert":
        return `${host} speaks TLS: use wss://${host}${path}. This browser does not trust its certificate yet: open https://${host}/ once and accept it.`;
      case "cert":
        return `${host} is a gelf server with TLS, but this browser does not trust its certificate: open https://${host}/ once and accept it.`;
      case "use-ws":
        return `${host} serves plain http, not TLS: use ws://${host}${path}.`;
      case "ws-refused":
        return path.endsWith("/ws")
          ? `${host} is a gelf server and answers, but refused the WebSocket (a proxy in between?).`
          : `${host} is a gelf server, but has no WebSocket at ${path}: use ${new URL(link.url).protocol}//${host}/ws.`;
      case "timeout":
        return `Timed out: ${host} did not complete the connection within ${CONNECT_TIMEOUT_MS / 1000} s.`;
      case "lost":
        return "Connection lost: reconnecting.";
      case "blocked":
        return "Blocked: an https page can only reach wss:// servers.";
      case "cannot":
        return `Cannot connect to ${host}.`;
      case "closed":
        return `Closed by ${host} (${link.problemDetail}).`;
      case "invalid":
        return `Cannot open a WebSocket to ${host}: ${link.problemDetail}`;
      default:
        if (kind.startsWith("http-")) return `The gelf server at ${host} answers HTTP ${kind.slice(5)} (a proxy in between?).`;
        return kind;
    }
  }

  const MISMATCH_DETAIL = {
    auth: "Its messages from the others fail authentication: they use a different key.",
    not_sealed: "The others send unencrypted messages, and this server has a key.",
    no_key: "The others send encrypted messages, and this server has no key.",
  };

  class Link {
    #token;  // the access token, or null: kept here only, never in url, the DOM or toJSON

    // `url` is the public URL (publicUrl), `token` the access token or null.
    constructor(url, own, token = null) {
      this.url = url;
      this.own = own;
      this.#token = token;
      this.host = new URL(url).host;
      this.state = "connecting";
      this.rxFrames = 0;
      this.rxBytes = 0;
      this.txFrames = 0;
      this.txBytes = 0;
      this.rxText = 0;     // text messages received and ignored
      this.rxBad = 0;      // binary messages dropped: shorter than a header or not version 1
      this.rxDup = 0;      // messages dropped: (origin, seq) already relayed or too old
      this.txDropped = 0;  // messages not sent because this socket was too far behind
      this.sendLimit = MAX_BUFFERED;  // bytes bufferedAmount may reach (see MIN_BUFFERED)
      this._rateAt = 0;     // when the drain rate was last measured
      this._drainedAt = 0;  // bytes the socket had drained then (txBytes - bufferedAmount)
      this.attempts = 0;
      this.retryDelay = RETRY_MIN_MS;
      this.retryAt = 0;
      this.problem = "";   // why the link is not open, as a kind: see problemText
      this.problemDetail = "";
      this.ws = null;
      this.removed = false;
      this.everOpen = false;
      // What the server's /stats said (polled while the link is open, off the relay path).
      this.server = null;  // {encryption, tap, mtu, offload, version, origin}
      this.statsPolls = 0; // /stats answers taken
      this.keyDrops = null; // the KEY_REASONS counters at the previous poll
      this.mismatch = null; // {reason, at}: which key counter grew most, and when it last grew
      this._retryTimer = 0;
      this._connectTimer = 0;
      this._errored = false;
      this._statsTimer = 0;
      this._statsCtl = null;
      this._statsDelay = STATS_MS;
      this._probeId = 0;
      this.view = new LinkView(this);
    }

    get hasToken() { return this.#token !== null; }
    get token() { return this.#token; }

    // The URLs with the token, for the socket and /stats only.
    get #socketUrl() { return withToken(this.url, this.#token); }
    get #statsUrl() { return statsUrl(this.#socketUrl); }

    // A new token (from the form or the page's API): forget what the old one led to, try again.
    setToken(token) {
      if (token === this.#token) return;
      this.#token = token;
      this.problem = "";
      this._probeId++;
      const ws = this.ws;
      if (ws) {
        this.ws = null;
        clearTimeout(this._connectTimer);
        detach(this);
        this._stopStats();
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        try { ws.close(1000, "new token"); } catch { /* already closing */ }
      }
      this.retryDelay = RETRY_MIN_MS;
      this.attempts = 0;
      this.connect();
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
        ws = new WebSocket(this.#socketUrl);
      } catch (err) {
        this.state = "error";
        this.problem = secure && this.url.startsWith("ws:") ? "blocked" : "invalid";
        this.problemDetail = mask(err.message);
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
        this.everOpen = true;
        this.retryDelay = RETRY_MIN_MS;
        this.attempts = 0;
        this.problem = "";
        this.sendLimit = MAX_BUFFERED;
        this._rateAt = 0;
        this._probeId++;
        openLinks.push(this);
        this._startStats();
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
        const now = performance.now();
        for (let i = 0; i < openLinks.length; i++) {
          const peer = openLinks[i];
          if (peer === this) continue;
          const buffered = peer.ws.bufferedAmount;
          if (buffered > 0 && now - peer._rateAt >= RATE_PERIOD_MS) peer._measure(now, buffered);
          else if (buffered === 0) { peer._rateAt = now; peer._drainedAt = peer.txBytes; }  // no backlog yet
          if (buffered > peer.sendLimit) { peer.txDropped++; continue; }
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
        this._stopStats();
        this.ws = null;
        if (timedOut) {
          this.problem = "timeout";
          this._explain(true);
        } else if (ev.code === 1006 && opened) this.problem = "lost";
        else if (ev.code === 1006) {
          // Unreachable, refused, the wrong scheme, not gelf? Ask; until the answer, keep what
          // an earlier attempt found.
          if (!this.problem || this.problem === "lost") this.problem = "cannot";
          this._explain(false);
        } else {
          this.problem = "closed";
          this.problemDetail = `code ${ev.code}${ev.reason ? `: ${mask(ev.reason)}` : ""}`;
        }
        this.state = this._errored ? "error" : "closed";
        this._scheduleRetry();
      };
    }

    // After a timeout, "it answers" or "nothing answers" add nothing to "timed out".
    async _explain(timedOut) {
      const id = ++this._probeId;
      const kind = await diagnose(this.#socketUrl);
      if (id !== this._probeId || this.removed || this.state === "open") return;
      if (timedOut && (kind === "ws-refused" || kind.startsWith("unreachable"))) return;
      this.problem = kind;
    }

    // ---- /stats: timers and fetches, never on the relay path; one request in flight at most.

    // A backlogged socket's drain rate over the last period, and from it the bound on what may
    // wait in it (the socket had a backlog all along: the mark moves while it has none).
    _measure(now, buffered) {
      const drained = this.txBytes - buffered;
      if (this._rateAt > 0) {
        const perMs = (drained - this._drainedAt) / (now - this._rateAt);
        this.sendLimit = Math.min(MAX_BUFFERED, Math.max(MIN_BUFFERED, perMs * BUFFER_DELAY_MS));
      }
      this._rateAt = now;
      this._drainedAt = drained;
    }

    _startStats() {
      this._stopStats();
      this._statsDelay = STATS_MS;
      this._pollStats();
    }

    _stopStats() {
      clearTimeout(this._statsTimer);
      this._statsTimer = 0;
      if (this._statsCtl) this._statsCtl.abort();
      this._statsCtl = null;
    }

    async _pollStats() {
      this._statsTimer = 0;
      const ctl = new AbortController();
      this._statsCtl = ctl;
      const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
      let stats = null;
      try {
        const r = await fetch(this.#statsUrl, { cache: "no-store", credentials: "omit", signal: ctl.signal });
        if (r.ok) stats = await r.json();
      } catch { /* not answering, not readable, aborted, or not JSON: try again later */ }
      clearTimeout(timer);
      if (this._statsCtl !== ctl) return; // stopped meanwhile (closed, removed or restarted)
      this._statsCtl = null;
      if (stats && typeof stats === "object") {
        this._takeStats(stats);
        this._statsDelay = STATS_MS;
      } else {
        this._statsDelay = Math.min(this._statsDelay * 2, STATS_MAX_MS);
      }
      this._statsTimer = setTimeout(() => this._pollStats(), this._statsDelay);
    }

    _takeStats(s) {
      this.statsPolls++;
      const tap = s.tap && typeof s.tap === "object" ? s.tap : {};
      const origin = typeof s.origin === "string" ? s.origin : "";
      if (this.server && this.server.origin !== origin) {
        // The server restarted (a new origin): its counters start again, and so does the verdict.
        this.keyDrops = null;
        this.mismatch = null;
      }
      this.server = {
        encryption: typeof s.encryption === "boolean" ? s.encryption : null,
        tap: typeof tap.name === "string" ? tap.name : "",
        mtu: Number(tap.mtu) || 0,
        offload: tap.offload === true,
        version: typeof s.version === "string" ? s.version : "",
        origin,
      };
      const drops = s.drops && typeof s.drops === "object" ? s.drops : {};
      const now = {};
      for (const r of KEY_REASONS) now[r] = Number(drops[r]) || 0;
      const before = this.keyDrops;
      if (before) {
        let grew = "";
        let most = 0;
        for (const r of KEY_REASONS) {
          const d = now[r] - before[r];
          if (d > most) { most = d; grew = r; }
        }
        if (grew) this.mismatch = { reason: grew, at: Date.now() };
      }
      this.keyDrops = now;
    }

    // The key-mismatch reason to show now, or "".
    keyMismatch(wall = Date.now()) {
      const m = this.mismatch;
      return m && wall - m.at < MISMATCH_HOLD_MS ? m.reason : "";
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
      this._stopStats();
      this._probeId++;
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
      const { url, own, hasToken, state, rxFrames, rxBytes, txFrames, txBytes, rxText, txDropped } = this;
      return {
        url, own, hasToken, state, rxFrames, rxBytes, txFrames, txBytes, rxText, txDropped,
        dupDropped: this.rxDup, badDropped: this.rxBad,
        rxRate: this.view.rx.last, txRate: this.view.tx.last,
        problem: this.problem, server: this.server, statsPolls: this.statsPolls,
        keyMismatch: this.keyMismatch(),
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

  const SVG_NS = "http://www.w3.org/2000/svg";
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    if (attrs) for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    for (const c of children) el.append(c);
    return el;
  }

  // A padlock, closed or open (16 × 16, drawn in the current text colour).
  function lockIcon(closed) {
    return s("svg", { class: "icon", viewBox: "0 0 16 16", "aria-hidden": "true", focusable: "false" },
      s("path", { d: closed ? "M5 7V5a3 3 0 0 1 6 0v2" : "M5 7V5a3 3 0 0 1 5.6-1.5",
        fill: "none", stroke: "currentColor", "stroke-width": "1.6", "stroke-linecap": "round" }),
      s("rect", { x: "3", y: "7", width: "10", height: "7.5", rx: "1.6", fill: "currentColor" }));
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
      this.el = h("span", { class: cls, "data-value": "0" }, fmt(0));
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

  function show(el, on) {
    if (el.hidden === on) el.hidden = !on;
  }

  const SAMPLE_MS = 1000;  // throughput is sampled every second ...
  const HISTORY = 60;      // ... and graphed over the last minute
  const GRAPH_H = 32;      // graph viewBox height; the width is HISTORY - 1

  // One direction of a link: its rate (bytes/s over the last sample), a graph of the last
  // minute of rates, and its totals.
  class Direction {
    constructor(cls, label, hint) {
      this.hist = new Float64Array(HISTORY); // ring of bytes/s samples
      this.head = 0;                         // next slot to write
      this.n = 0;                            // samples held (up to HISTORY)
      this.last = 0;                         // newest sample, rounded
      this.frames = new Counter(`${cls}-frames`, (v) => count.format(v));
      this.bytes = new Counter(`${cls}-bytes`, humanBytes);
      this.rate = h("span", { class: `rate ${cls}-rate`, "data-value": "0" }, "–");
      this.area = s("path", { class: "area" });
      this.line = s("path", { class: "line", "vector-effect": "non-scaling-stroke" });
      this.graph = s("svg", { class: "spark", viewBox: `0 0 ${HISTORY - 1} ${GRAPH_H}`,
        preserveAspectRatio: "none", "aria-hidden": "true", focusable: "false" },
      s("line", { class: "base", x1: "0", x2: String(HISTORY - 1), y1: String(GRAPH_H - 0.5),
        y2: String(GRAPH_H - 0.5), "vector-effect": "non-scaling-stroke" }),
      this.area, this.line);
      this.el = h("div", { class: `dir dir-${cls}`, role: "group", "aria-label": label },
        h("div", { class: "dir-head" },
          h("span", { class: "dir-label", title: hint }, label),
          this.rate),
        this.graph,
        h("div", { class: "totals" },
          this.frames.el, h("span", { class: "unit" }, " msgs"), h("span", { class: "sep" }, " · "),
          this.bytes.el));
    }

    push(rate, k) {
      for (let j = 0; j < k; j++) {
        this.hist[this.head] = rate;
        this.head = (this.head + 1) % HISTORY;
      }
      this.n = Math.min(HISTORY, this.n + k);
      this.last = Math.round(rate);
    }

    peak() {
      let m = 0;
      for (let j = 0; j < this.n; j++) m = Math.max(m, this.hist[(this.head - 1 - j + HISTORY) % HISTORY]);
      return m;
    }

    setRate(open) {
      const v = open ? this.last : 0;
      const text = open ? `${humanBytes(v)}/s` : "–";
      if (this.rate.dataset.value !== String(v)) this.rate.dataset.value = String(v);
      setText(this.rate, text);
    }

    // Oldest sample at the left; the newest at the right edge. `max` is the card's scale.
    draw(max) {
      if (this.n === 0) return;
      const top = 2;
      const span = GRAPH_H - 0.5 - top;
      let line = "";
      let x0 = 0;
      for (let j = this.n - 1; j >= 0; j--) {
        const v = this.hist[(this.head - 1 - j + HISTORY) % HISTORY];
        const x = HISTORY - 1 - j;
        const y = GRAPH_H - 0.5 - (max > 0 ? (v / max) * span : 0);
        if (!line) x0 = x;
        line += `${line ? "L" : "M"}${x} ${y.toFixed(2)}`;
      }
      this.line.setAttribute("d", line);
      this.area.setAttribute("d", `${line}L${HISTORY - 1} ${GRAPH_H}L${x0} ${GRAPH_H}Z`);
    }
  }

  class LinkView {
    constructor(link) {
      this.link = link;
      this.rx = new Direction("rx", "From server", "what this server sent, relayed to the others");
      this.tx = new Direction("tx", "To server", "what the others sent, relayed to this server");
      // Kept for the existing contract: the raw counters under their historic names.
      this.rxFrames = this.rx.frames;
      this.rxBytes = this.rx.bytes;
      this.txFrames = this.tx.frames;
      this.txBytes = this.tx.bytes;
      this.lastRx = 0;
      this.lastTx = 0;

      this.state = h("span", { class: "state" }, link.state);
      this.enc = h("span", { class: "badge enc", hidden: "" });
      this.tap = h("span", { class: "badge tap", hidden: "" });
      this.linkAlert = h("p", { class: "alert alert-link", hidden: "" });
      this.keyAlert = h("p", { class: "alert alert-key", hidden: "" });
      this.retry = h("span", { class: "retry" });
      this.extra = h("span", { class: "extra" });
      this.dup = h("span", { class: "dup", "data-value": "0",
        title: "messages this page had already relayed (a loop or a second path): not sent again" });
      this.bad = h("span", { class: "bad", "data-value": "0",
        title: "binary messages that are not gelf version 1 (too short or wrong version): not relayed" });
      this._enc = undefined;
      this._key = "";

      const shown = mask(link.url);
      const remove = h("button", { type: "button", class: "remove", "aria-label": `Remove ${shown}` }, "Remove");
      remove.addEventListener("click", () => relay.remove(link.url));

      this.el = h("li", { class: "link", "data-url": link.url, "data-state": link.state },
        h("div", { class: "link-head" },
          this.state,
          h("span", { class: "url", title: shown }, shown),
          remove),
        h("div", { class: "badges" },
          link.own ? h("span", { class: "badge own" }, "this server") : "",
          this.enc, this.tap),
        h("div", { class: "alerts", "aria-live": "polite" }, this.linkAlert, this.keyAlert),
        h("div", { class: "dirs" }, this.rx.el, this.tx.el),
        h("p", { class: "note" }, this.retry, this.extra, this.dup, this.bad));
      if (link.own) this.el.dataset.own = "";
    }

    // Every SAMPLE_MS: rates over the last dt seconds, into the graphs.
    sample(dt) {
      const l = this.link;
      const open = l.state === "open";
      const k = Math.min(HISTORY, Math.max(1, Math.round(dt)));
      this.rx.push(open ? (l.rxBytes - this.lastRx) / dt : 0, k);
      this.tx.push(open ? (l.txBytes - this.lastTx) / dt : 0, k);
      this.lastRx = l.rxBytes;
      this.lastTx = l.txBytes;
      this.rx.setRate(open);
      this.tx.setRate(open);
      const max = Math.max(this.rx.peak(), this.tx.peak());
      this.rx.draw(max);
      this.tx.draw(max);
    }

    update(wall) {
      const l = this.link;
      const open = l.state === "open";
      if (this.el.dataset.state !== l.state) {
        this.el.dataset.state = l.state;
        setText(this.state, l.state);
        this.rx.setRate(open);
        this.tx.setRate(open);
        // Throughput shows once the link has been open; before, the card is about the error.
        if (l.everOpen) this.el.dataset.everOpen = "";
      }
      this.rx.frames.set(l.rxFrames);
      this.rx.bytes.set(l.rxBytes);
      this.tx.frames.set(l.txFrames);
      this.tx.bytes.set(l.txBytes);

      // What the server says about itself (last known, kept while the link is down).
      const srv = l.server;
      const enc = srv ? srv.encryption : null;
      if (enc !== this._enc) {
        this._enc = enc;
        this.enc.replaceChildren();
        if (enc !== null) {
          this.enc.append(lockIcon(enc), enc ? "encrypted" : "unencrypted");
          this.enc.title = enc ? "this server seals its frames with a key (--key)" : "this server has no key";
          this.enc.dataset.value = String(enc);
        }
        show(this.enc, enc !== null);
      }
      const tapName = srv ? srv.tap : "";
      if (tapName && this.tap.textContent !== tapName) {
        this.tap.textContent = tapName;
        this.tap.title = `tap device ${tapName}${srv.mtu ? `, MTU ${srv.mtu}` : ""}${srv.offload ? ", offload on" : ""}`;
      }
      show(this.tap, !!tapName);

      // Human errors: why the link is down, and what the server's drop counters say.
      const problem = open ? "" : l.problem;
      if (this.el.dataset.problem !== problem) {
        this.el.dataset.problem = problem;
        this.linkAlert.dataset.kind = problem;
        show(this.linkAlert, !!problem);
      }
      setText(this.linkAlert, problem ? problemText(problem, l) : "");
      const key = l.keyMismatch(wall);
      if (key !== this._key) {
        this._key = key;
        this.keyAlert.replaceChildren();
        if (key) {
          this.keyAlert.append(h("strong", null, "Key mismatch:"),
            " this server drops what the others send (check --key). ",
            h("span", { class: "detail" }, MISMATCH_DETAIL[key]));
        }
        this.keyAlert.dataset.reason = key;
        show(this.keyAlert, !!key);
      }

      let retry = "";
      if (l.retryAt) {
        const secs = Math.max(0, Math.ceil((l.retryAt - wall) / 1000));
        retry = `retry in ${secs} s`;
        if (l.attempts > 1) retry += ` (attempt ${l.attempts + 1})`;
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

  // Links are known by their public URL: the same server with another token is the same link.
  function find(urlOrHostPort) {
    let url;
    try { url = publicUrl(normalize(urlOrHostPort)); } catch { url = String(urlOrHostPort); }
    return links.find((l) => l.url === url) || null;
  }

  // Adds a link, or gives the link already there the token this one comes with. `saved` holds
  // tokens by public URL (sessionStorage), for an address that comes without one. Returns the
  // link; throws normalize's errors.
  function add(urlOrHostPort, own = false, saved = {}) {
    const full = normalize(urlOrHostPort);
    const url = publicUrl(full);
    const kept = Object.hasOwn(saved, url) && typeof saved[url] === "string" ? saved[url] : null;
    const token = tokenOf(full) ?? kept;
    const existing = links.find((l) => l.url === url);
    if (existing) {
      if (token !== null && token !== existing.token) {
        existing.setToken(token);
        rememberPeers();
      }
      return existing;
    }
    const link = new Link(url, own, token);
    links.push(link);
    list.append(link.view.el);
    link.connect();
    link.view.update(Date.now());
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

  // Keep ?peer=... in the address bar in sync, so the current relay can be bookmarked (other
  // parameters stay), with no token in it: the tokens go to this tab's sessionStorage. A URL
  // that host:port would produce again is written that way; anything else as the URL.
  function peerParam(url) {
    const u = new URL(url);
    if (u.protocol === wsScheme && u.port && u.pathname === "/ws" && !u.search) return u.host;
    return url;
  }
  function rememberPeers() {
    const params = new URLSearchParams(location.search);
    params.delete("peer");
    params.delete("token");
    let qs = params.toString();
    const tokens = {};
    for (const l of links) {
      if (l.hasToken) tokens[l.url] = l.token;
      if (l.own) continue;
      const v = encodeURIComponent(peerParam(l.url)).replace(/%3A/g, ":").replace(/%2F/g, "/");
      qs += `${qs ? "&" : ""}peer=${v}`;
    }
    saveTokens(tokens);
    const next = location.pathname + (qs ? `?${qs}` : "") + location.hash;
    if (next !== location.pathname + location.search + location.hash) {
      history.replaceState(history.state, "", next);
    }
  }

  function refresh() {
    const wall = Date.now();
    let open = 0;
    for (const l of links) {
      l.view.update(wall);
      if (l.state === "open") open++;
    }
    empty.hidden = links.length !== 0;
    setText(summary, links.length ? `${open} of ${links.length} open` : "");
    summary.dataset.state = !links.length ? "" : open === links.length ? "ok" : open ? "partial" : "down";
  }

  let lastSample = performance.now();
  function sample() {
    const now = performance.now();
    const dt = (now - lastSample) / 1000;
    lastSample = now;
    if (dt <= 0) return;
    for (const l of links) l.view.sample(dt);
  }

  function say(text, isError) {
    message.textContent = text;
    message.classList.toggle("error", !!isError);
    if (isError) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    let full;
    try {
      full = normalize(input.value);
    } catch (err) {
      say(err.message, true);
      input.focus();
      return;
    }
    const url = publicUrl(full);
    const token = tokenOf(full);
    const existing = find(url);
    if (existing && (token === null || token === existing.token)) {
      say(`${url} is already linked.`, false);
      return;
    }
    add(full);
    say(existing ? `New token for ${url}: trying again.` : `Added ${url}.`, false);
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
    publicUrl,
    mask,
    statsUrl,
    stats: () => links.map((l) => l.toJSON()),
    get seenOrigins() { return seen.size; },
    SeenFilter,  // exposed for tests (compare with gelf/seen.py)
  };
  window.gelfRelay = relay;

  // ---- start -----------------------------------------------------------------------

  const address = takeAddress();
  const saved = loadTokens();
  add(withToken(ownPublicUrl, address.own), true, saved);

  const problems = [];
  for (const peer of address.peers) {
    try { add(peer, false, saved); } catch (err) { problems.push(`peer=${mask(peer)}: ${err.message}`); }
  }
  if (problems.length) say(problems.join(" "), true);
  rememberPeers();  // the address bar as the links are, even when no peer was valid

  refresh();
  setInterval(refresh, UI_INTERVAL_MS);
  setInterval(sample, SAMPLE_MS);
})();
