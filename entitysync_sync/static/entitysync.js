/*! entitysync_sync browser client. No dependencies, no build step.
 *
 * Served by the Flask extension at {ENTITYSYNC_PATH}client.js (a plain script
 * that defines the global EntitySync) and client.mjs (the same as an ES module).
 *
 *   const es = new EntitySync();   // ws(s):// + the origin and path this file was served from
 *   const sub = es.subscribe("items", "100", {onPush(row) {}, onGone() {}, onError(err) {}});
 *   es.subscribe("project_tasks", "1", {onRows(rows) {}});  // the whole current set, every time
 *   sub.unsubscribe();
 *   es.setSecret("token");         // null clears it
 *   es.on("state", (state) => {}); // "connecting" | "open" | "closed"
 *   es.close();
 *
 * After any disconnect it reconnects with exponential backoff and jitter, then
 * sends the secret and every live subscription again, each with the version
 * ("v") of the last push it got, so the server pushes only what changed since.
 * When nothing has arrived for `heartbeat` ms it sends a `ping`, which the
 * server answers with a `pong`; if nothing arrives within `timeout` ms after
 * that, the connection is dead and replaced.
 *
 * TypeScript declarations: {ENTITYSYNC_PATH}client.d.ts.
 */
var EntitySync = class EntitySync {
  // The src of this script, read while it runs; the default URL derives from it.
  static src = typeof document !== "undefined" && document.currentScript ? document.currentScript.src : "";

  static defaults = {minDelay: 500, maxDelay: 30000, heartbeat: 25000, timeout: 10000, restartDelay: 5000};

  constructor(url, options) {
    if (url && typeof url === "object") [url, options] = [null, url];
    options = options || {};
    const base = EntitySync.src ? EntitySync.src.replace(/client\.m?js([?#].*)?$/, "") : "/ws/entity-sync/";
    const target = new URL(url || base, location.href);
    target.protocol = target.protocol.replace(/^http/, "ws");
    this.url = target.href;
    this.options = {};
    for (const name in EntitySync.defaults) this.options[name] = options[name] ?? EntitySync.defaults[name];
    this.state = "closed";
    this._secret = options.secret; // undefined: never sent, the server's identify decides
    this._keys = new Map(); // "entity/id" -> {entity, id, subs: Set, denied}
    this._listeners = {};
    this._attempt = 0;
    this._stopped = false;
    this._ws = null;
    this._timer = null;
    // A page kept in the back/forward cache would keep its socket open: close
    // it on the way in, and connect again if the page is shown again.
    this._onPage = (event) => {
      if (!event.persisted || this._stopped) return;
      if (event.type === "pageshow") return this._connect();
      this._halt();
      this._setState("closed");
    };
    addEventListener("pagehide", this._onPage);
    addEventListener("pageshow", this._onPage);
    this._connect();
  }

  /** Subscribe to one row; handlers get its pushes. Returns {entity, id, unsubscribe()}. */
  subscribe(entity, id, handlers) {
    id = String(id);
    const name = entity + "/" + id;
    let key = this._keys.get(name);
    if (!key) this._keys.set(name, (key = {entity, id, subs: new Set(), denied: false}));
    const sub = {entity, id, handlers: handlers || {}, unsubscribe: () => this._unsubscribe(name, key, sub)};
    key.subs.add(sub);
    // Sent even when the key is held already: the server answers with its current state.
    this._send({action: "subscribe", body: {entity, id}});
    return sub;
  }

  /** Replace the secret (null clears it); subscriptions it forbade are tried again. */
  setSecret(secret) {
    this._secret = secret ?? null;
    this._send({action: "secret", body: this._secret});
    for (const key of this._keys.values()) {
      if (key.denied) this._subscribe(key);
    }
  }

  /** Listen to "state" (with "connecting", "open" or "closed") or "error" (errors about no one key). */
  on(event, fn) {
    (this._listeners[event] = this._listeners[event] || new Set()).add(fn);
    return () => this._listeners[event].delete(fn);
  }

  /** Close for good: no reconnect. */
  close() {
    this._stopped = true;
    removeEventListener("pagehide", this._onPage);
    removeEventListener("pageshow", this._onPage);
    this._halt();
    this._setState("closed");
  }

  _unsubscribe(name, key, sub) {
    if (!key.subs.delete(sub) || key.subs.size) return;
    this._keys.delete(name);
    this._send({action: "unsubscribe", body: {entity: key.entity, id: key.id}});
  }

  // After a reconnect the version held spares the push of rows that did not change.
  _subscribe(key, resume) {
    key.denied = false;
    const body = {entity: key.entity, id: key.id};
    if (resume && key.v) body.v = key.v;
    this._send({action: "subscribe", body});
  }

  _halt() {
    clearTimeout(this._timer);
    const ws = this._ws;
    this._ws = null; // first, so that this socket's late events are ignored
    if (ws) ws.close();
  }

  _connect() {
    this._setState("connecting");
    const ws = (this._ws = new WebSocket(this.url));
    this._watch(); // the handshake, too, must finish within `timeout`
    ws.onopen = () => {
      if (this._ws !== ws) return;
      this._setState("open");
      if (this._secret !== undefined) this._send({action: "secret", body: this._secret});
      for (const key of this._keys.values()) this._subscribe(key, true);
      this._idle();
    };
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      this._attempt = 0; // only a server that talks resets the backoff
      this._idle();
      this._receive(event.data);
    };
    ws.onclose = (event) => {
      // A server going away or restarting closes its clients a few at a time: wait a random
      // part of restartDelay, so that they do not all come back in the same second either.
      const restart = event.code === 1001 || event.code === 1012;
      if (this._ws === ws) this._retry(restart ? Math.random() * this.options.restartDelay : null);
    };
  }

  _retry(wait) {
    this._halt();
    this._setState("closed");
    if (this._stopped) return;
    const {minDelay, maxDelay} = this.options;
    const delay = Math.min(maxDelay, minDelay * 2 ** this._attempt++);
    this._timer = setTimeout(() => this._connect(), wait ?? delay / 2 + (Math.random() * delay) / 2);
  }

  // Traffic arrived: if the line then goes quiet for `heartbeat` ms, probe it.
  _idle() {
    clearTimeout(this._timer);
    if (!this.options.heartbeat) return;
    this._timer = setTimeout(() => {
      this._send({action: "ping"});
      this._watch();
    }, this.options.heartbeat);
  }

  // Expect traffic within `timeout` ms, or take the connection for dead.
  _watch() {
    clearTimeout(this._timer);
    if (!this.options.timeout) return;
    this._timer = setTimeout(() => this._retry(), this.options.timeout);
  }

  _send(frame) {
    // While not open nothing is sent: on open the secret and subscriptions go out again.
    if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify(frame));
  }

  _receive(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    const key = frame.key && this._keys.get(frame.key.entity + "/" + frame.key.id);
    if (frame.action === "error") {
      if (!frame.key) return this._emit("error", frame.error);
      if (!key) return;
      // The server holds no subscription it refused; setSecret asks again.
      if (frame.error.code === "forbidden") [key.denied, key.v] = [true, undefined];
      this._each(key, "onError", frame.error);
    } else if (key && frame.action === "push") {
      key.v = frame.v;
      if (Array.isArray(frame.rows)) this._rows(key, frame.rows);
      else this._each(key, "onPush", frame.body);
    } else if (key && frame.action === "gone") {
      key.v = frame.v;
      this._each(key, "onGone");
    }
  }

  // A set of rows (a fetch that returned a list): onRows gets the whole set, so a page
  // can render it as it is; without onRows, onPush gets each row of it in turn.
  _rows(key, rows) {
    for (const sub of [...key.subs]) {
      const {onRows, onPush} = sub.handlers;
      if (onRows) EntitySync._call(onRows, rows);
      else if (onPush) for (const row of rows) EntitySync._call(onPush, row);
    }
  }

  _each(key, handler, arg) {
    for (const sub of [...key.subs]) {
      const fn = sub.handlers[handler];
      if (fn) EntitySync._call(fn, arg);
    }
  }

  _emit(event, arg) {
    for (const fn of [...(this._listeners[event] || [])]) EntitySync._call(fn, arg);
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state);
  }

  // One handler that throws must not keep the others from running.
  static _call(fn, arg) {
    try {
      fn(arg);
    } catch (error) {
      setTimeout(() => {
        throw error;
      });
    }
  }
};
