/**
 * TypeScript declarations for the entitysync_sync browser client.
 *
 * The Flask extension serves them beside the client, at
 * {ENTITYSYNC_PATH}client.d.ts. The client itself is served as a plain script
 * ({ENTITYSYNC_PATH}client.js, which defines the global `EntitySync`) and as an
 * ES module ({ENTITYSYNC_PATH}client.mjs, which exports it, also as default).
 * Save this file beside your code, e.g. as `entitysync.d.ts`, and either
 * import from a module path mapped to it, or reference it for the global:
 *
 *   /// <reference path="./entitysync.d.ts" />
 *   const es = new EntitySync();
 */

/** The connection's state, as `es.state` holds it and the "state" event reports it. */
export type ConnectionState = "connecting" | "open" | "closed";

/** The codes of the server's error frames; see the documentation's wire protocol page. */
export type ErrorCode =
  | "bad_json"
  | "bad_message"
  | "unknown_action"
  | "unknown_entity"
  | "forbidden"
  | "too_many_subscriptions"
  | "fetch_failed"
  | "internal_error";

/** The `error` of a server error frame. */
export interface ErrorInfo {
  code: ErrorCode;
  message: string;
}

/** The key of a row: its entity name and its id (always a string on the wire). */
export interface Key {
  entity: string;
  id: string;
}

/** Options of `new EntitySync(url, options)`. Times are in milliseconds. */
export interface EntitySyncOptions {
  /**
   * Sent as the connection's secret after every (re)connection; `null` sends
   * "no secret". Left out, none is sent and the server's `@es.identify` decides.
   */
  secret?: string | null;
  /** Reconnect backoff: the first delay (500), doubled per failed attempt, with jitter. */
  minDelay?: number;
  /** Reconnect backoff: the longest delay (30000). */
  maxDelay?: number;
  /** After this long without a frame, send a `ping` (25000); 0 turns probing off. */
  heartbeat?: number;
  /** A ping or handshake not answered within this long means the connection is dead (10000). */
  timeout?: number;
  /**
   * After the server closes with 1001 (going away) or 1012 (restarting), wait a
   * random part of this before reconnecting, instead of the backoff (5000).
   */
  restartDelay?: number;
}

/**
 * What a subscription calls. A push carries one row (`onPush`) or a set of rows
 * (`onRows`, the whole current set every time; without `onRows`, `onPush` is
 * called once per row of the set, and removals cannot be seen).
 */
export interface SubscriptionHandlers<Row = unknown> {
  /** A row of the key, fetched for this connection's secret. */
  onPush?(row: Row): void;
  /**
   * The whole current set of the key (its fetch returned a list), in the
   * fetch's order, possibly empty: render it as it is.
   */
  onRows?(rows: Row[]): void;
  /** The fetch returned `None`: the row does not exist (any more), or is not for this user. */
  onGone?(): void;
  /** An error about this key, e.g. `forbidden` or `fetch_failed`. */
  onError?(error: ErrorInfo): void;
}

/** What `subscribe` returns. */
export interface Subscription {
  readonly entity: string;
  readonly id: string;
  /** Ends this subscription; the last one of a key ends the server's subscription. */
  unsubscribe(): void;
}

/** The client: one websocket, reconnected after any disconnect, holding every subscription. */
declare class EntitySyncClient {
  /** The URL of the script this class was loaded from; the default websocket URL derives from it. */
  static src: string;
  /** The default options. */
  static defaults: Required<Omit<EntitySyncOptions, "secret">>;

  /**
   * Connects at once. `url` defaults to the path the client was served from,
   * with `ws:` or `wss:` to match the page; a relative or `http(s):` URL is
   * turned into `ws(s):`.
   */
  constructor(url?: string | null, options?: EntitySyncOptions);
  constructor(options: EntitySyncOptions);

  /** The websocket URL, absolute. */
  readonly url: string;
  /** The options in force, defaults filled in. */
  readonly options: Required<Omit<EntitySyncOptions, "secret">>;
  /** The current state of the connection. */
  readonly state: ConnectionState;

  /**
   * Subscribes to one key (a row, or a set of rows). With push-on-subscribe (the server's default) its
   * current state arrives first. Several subscriptions to one key share one
   * server subscription.
   */
  subscribe<Row = unknown>(entity: string, id: string | number, handlers?: SubscriptionHandlers<Row>): Subscription;

  /** Replaces the secret (`null` clears it); subscriptions it forbade are asked for again. */
  setSecret(secret: string | null): void;

  /** Listens to the connection's state. Returns a function that removes the listener. */
  on(event: "state", listener: (state: ConnectionState) => void): () => void;
  /** Listens to errors about no one key (e.g. `bad_message`). Returns a function that removes the listener. */
  on(event: "error", listener: (error: ErrorInfo) => void): () => void;

  /** Closes for good: no reconnect. */
  close(): void;
}

export { EntitySyncClient as EntitySync };
export default EntitySyncClient;

/* The wire protocol, for code that speaks it without this client. */

/** Any client frame may carry a `ref`; the server then answers with an `ack` (a `pong` for `ping`). */
export type Ref = string | number;

export type ClientFrame =
  /** `v`: the version of the last push or gone received for the key; no push follows if it is still current. */
  | { action: "subscribe"; body: { entity: string; id: string | number; v?: string }; ref?: Ref }
  | { action: "unsubscribe"; body: { entity: string; id: string | number }; ref?: Ref }
  | { action: "secret"; body: string | null; ref?: Ref }
  | { action: "ping"; ref?: Ref };

export type ServerFrame<Row = unknown> =
  | { action: "ack"; ref: Ref }
  | { action: "pong"; ref: Ref | null }
  /** `v`: the version of what the frame holds, an opaque string that changes exactly when its rows do. */
  | { action: "push"; key: Key; v?: string; body: Row }
  | { action: "push"; key: Key; v?: string; rows: Row[] }
  | { action: "gone"; key: Key; v?: string }
  | { action: "error"; ref: Ref | null; error: ErrorInfo; key?: Key };

declare global {
  /** The client, as the plain script `client.js` defines it. */
  var EntitySync: typeof EntitySyncClient;
  type EntitySync = EntitySyncClient;
}
