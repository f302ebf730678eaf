// gelf relay page: this browser is an L1 hub between gelf servers.
// Every binary WebSocket message received on one link is sent, unchanged, to every
// other open link (never back to its sender). See docs/design.md for the wire format;
// the page does not parse it.
(() => {
  "use strict";

  const RETRY_MIN_MS = 1000;
  const RETRY_MAX_MS = 30000;
  const CONNECT_TIMEOUT_MS = 10000;   // give up on a socket stuck in CONNECTING
  const MAX_BUFFERED = 8 * 1024 * 1024; // a peer this far behind drops messages instead
  const UI_INTERVAL_MS = 500;

  const secure = location.protocol === "https:";
  const wsScheme = secure ? "wss:" : "ws:";

  // ---- input → WebSocket URL -------------------------------------------------------

  const HOST_PORT = /^(\[[0-9A-Fa-f:.]+(?:%25[\w.~-]+)?\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$/;

  // Returns the normalized ws:// or wss:// URL for `input`, or throws an Error whose
  // message can be shown to a person.
  function normalize(input) {
    const text = String(input ?? "").trim();
    if (!text) throw new Error("Enter a server as host:port or ws://host:port/ws.");

    let url;
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) {
      const scheme = text.slice(0, text.indexOf(":")).toLowerCase();
      if (scheme !== "ws" && scheme !== "wss") {
        throw new Error(`"${scheme}://" is not a WebSocket URL: use ws://, wss:// or host:port.`);
      }
      try {
        url = new URL(text);
      } catch {
        throw new Error(`"${text}" is not a valid URL.`);
      }
      if (!url.hostname) throw new Error(`"${text}" has no host.`);
      if (url.pathname === "" || url.pathname === "/") url.pathname = "/ws";
    } else {
      const m = HOST_PORT.exec(text);
      if (!m) {
        if (/^[^\s:/]+$/.test(text) || /^\[[^\]]*\]$/.test(text)) {
          throw new Error(`"${text}" needs a port, for example ${text}:7000.`);
        }
        throw new Error(`"${text}" is not host:port, [ipv6]:port or a ws:// URL.`);
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
        this.lastClose = err.message;
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

      // The hot path: one handler per socket, one loop over the open links.
      ws.onmessage = (ev) => {
        const data = ev.data;
        if (typeof data === "string") { this.rxText++; return; }
        const n = data.byteLength;
        this.rxFrames++;
        this.rxBytes += n;
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
        if (timedOut) this.lastClose = "timed out";
        else if (ev.code === 1006) this.lastClose = opened ? "connection lost" : "unreachable";
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
      return { url, own, state, rxFrames, rxBytes, txFrames, txBytes, rxText, txDropped };
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
      this.lastRx = 0;
      this.lastTx = 0;
      this.lastTime = performance.now();

      const remove = h("button", { type: "button", class: "remove", "aria-label": `Remove ${link.url}` }, "Remove");
      remove.addEventListener("click", () => relay.remove(link.url));

      const row = (label, frames, bytes, rate) =>
        h("tr", null, h("th", { scope: "row" }, label), frames.el, bytes.el, rate);
      this.el = h("li", { class: "link", "data-url": link.url, "data-state": link.state },
        h("div", { class: "link-head" },
          this.state,
          link.own ? h("span", { class: "own" }, "this server") : "",
          h("span", { class: "url", title: link.url }, link.url),
          remove),
        h("table", { class: "stats" },
          h("thead", null, h("tr", null,
            h("td"), h("th", { scope: "col" }, "frames"), h("th", { scope: "col" }, "bytes"),
            h("th", { scope: "col" }, "rate"))),
          h("tbody", null,
            row("Received", this.rxFrames, this.rxBytes, this.rxRate),
            row("Sent", this.txFrames, this.txBytes, this.txRate))),
        h("p", { class: "note" }, this.retry, this.extra));
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

  // Keep ?peer=... in the address bar in sync, so the current relay can be bookmarked.
  // A URL that host:port would produce again is written as host:port.
  function peerParam(url) {
    const u = new URL(url);
    if (u.protocol === wsScheme && u.port && u.pathname === "/ws" && !u.search) return u.host;
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
      say(`${url} is already linked.`, false);
      return;
    }
    add(url);
    say(`Added ${url}.`, false);
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
    stats: () => links.map((l) => l.toJSON()),
  };
  window.gelfRelay = relay;

  // ---- start -----------------------------------------------------------------------

  const peers = new URLSearchParams(location.search).getAll("peer");
  add(`${wsScheme}//${location.host}/ws`, true);

  const problems = [];
  for (const peer of peers) {
    try { add(peer); } catch (err) { problems.push(`peer=${peer}: ${err.message}`); }
  }
  if (problems.length) say(problems.join(" "), true);

  refresh();
  setInterval(refresh, UI_INTERVAL_MS);
})();
