// The browser client as a plain script (<script src="/ws/entity-sync/client.js">),
// which defines the global EntitySync; the declarations are referenced, not imported.
/// <reference path="../../entitysync_sync/static/entitysync.d.ts" />

const live: EntitySync = new EntitySync();
live.subscribe<{ id: string; total: number }>("orders", "a-17", {
  onPush: (order) => console.log(order.total.toFixed(2)),
});
live.close();
