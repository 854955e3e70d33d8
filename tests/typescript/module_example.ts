// The browser client as an ES module, imported from the URL the extension serves it at,
// with that URL mapped to client.d.ts in tsconfig.json's "paths", as the docs show.
import EntitySyncDefault, { EntitySync } from "/ws/entity-sync/client.mjs";
import type { ClientFrame, ConnectionState, ErrorInfo, ServerFrame, Subscription } from "/ws/entity-sync/client.mjs";

interface Item {
  id: number;
  name: string;
  value: string;
}

const es: EntitySync = new EntitySync({ secret: "token", heartbeat: 25_000, timeout: 10_000, restartDelay: 5_000 });
const same: EntitySync = new EntitySyncDefault("/ws/entity-sync/", { minDelay: 250 });
const url: string = es.url;
const state: ConnectionState = es.state;

const sub: Subscription = es.subscribe<Item>("items", 100, {
  onPush(item) {
    const name: string = item.name;
    console.log(name.toUpperCase(), item.value);
  },
  onGone() {
    console.log("item 100 was deleted");
  },
  onError(error: ErrorInfo) {
    if (error.code === "forbidden") console.warn(error.message);
  },
});
sub.unsubscribe();

// A key whose fetch returns a set: onRows gets the whole current set every time.
const list: Subscription = es.subscribe<Item>("project_tasks", 7, {
  onRows(items) {
    const names: string[] = items.map((item) => item.name);
    console.log(names.join(", "));
  },
});
list.unsubscribe();

const stop: () => void = es.on("state", (s) => console.log(s === "open"));
es.on("error", (error) => console.warn(error.code, error.message));
stop();
es.setSecret(null);
same.close();

// Frames, for code that speaks the protocol without the client.
const ping: ClientFrame = { action: "ping", ref: 1 };
const resume: ClientFrame = { action: "subscribe", body: { entity: "items", id: 100, v: "FL-mhbw0Hy2kS1-e" } };
const frame = JSON.parse("{}") as ServerFrame<Item>;
if (frame.action === "push") {
  if ("rows" in frame) console.log(frame.key.entity, frame.rows.map((item) => item.name));
  else console.log(frame.key.entity, frame.body.name);
}
if (frame.action === "pong") console.log(frame.ref);
if (frame.action === "gone") console.log(frame.key.id, frame.v ?? "no version");

// What the declarations refuse.
// @ts-expect-error: the handlers' row type is Item, which has no "price".
es.subscribe<Item>("items", 1, { onPush: (item) => item.price });
// @ts-expect-error: onRows gets an array of rows, not one row.
es.subscribe<Item>("project_tasks", 7, { onRows: (items) => items.name });
// @ts-expect-error: an id is a string or a number.
es.subscribe("items", { id: 1 });
// @ts-expect-error: the events are "state" and "error".
es.on("message", () => undefined);
// @ts-expect-error: a state is "connecting", "open" or "closed".
const wrong: ConnectionState = "reconnecting";
// @ts-expect-error: the secret is a string or null.
es.setSecret(42);
// @ts-expect-error: there is no "heartbeat" action; the heartbeat is "ping".
const probe: ClientFrame = { action: "heartbeat" };

// @ts-expect-error: a version is a string.
const badVersion: ClientFrame = { action: "subscribe", body: { entity: "items", id: 1, v: 7 } };

export { badVersion, ping, probe, resume, state, url, wrong };
