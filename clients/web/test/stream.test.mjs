// The reconnect rules of kept-open streams, without a server: which
// endings stop for good, which refresh the token, how long to wait.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Code, SpineError, afterError, backoffDelay, DEFAULT_BACKOFF, keepStreaming } from "../dist/index.js";

const err = (code, reason = "", retryAfterMs) => new SpineError(code, "m", reason, {}, retryAfterMs);

test("what ends a stream for good, and what reconnects", () => {
  assert.deepEqual(afterError(err(Code.Aborted, "SESSION_REPLACED")), { stop: true, refresh: false, immediate: false });
  assert.deepEqual(afterError(err(Code.Unauthenticated, "TOKEN_EXPIRED")), { stop: false, refresh: true, immediate: true });
  assert.equal(afterError(err(Code.Unauthenticated, "CREDENTIAL_REVOKED")).stop, true);
  assert.deepEqual(afterError(err(Code.Unavailable, "NODE_DRAINING")), { stop: false, refresh: false, immediate: true });
  assert.equal(afterError(err(Code.Unavailable, "STORE_UNAVAILABLE")).stop, false);
  assert.equal(afterError(err(Code.ResourceExhausted, "WATCH_TOO_SLOW")).stop, false);
  assert.equal(afterError(err(Code.Aborted)).stop, false, "a conflict is retried");
  for (const c of [Code.InvalidArgument, Code.PermissionDenied, Code.NotFound, Code.FailedPrecondition]) {
    assert.equal(afterError(err(c)).stop, true, Code[c]);
  }
});

test("backoff grows, is capped, and is jittered within bounds", () => {
  const b = { ...DEFAULT_BACKOFF, initialMs: 100, maxMs: 1000, multiplier: 2, jitter: 0.2 };
  assert.deepEqual([0, 1, 2, 3, 4, 10].map((n) => backoffDelay(b, n, () => 0.5)), [100, 200, 400, 800, 1000, 1000]);
  assert.equal(backoffDelay(b, 0, () => 0), 80);
  assert.equal(backoffDelay(b, 0, () => 1), 120);
});

test("keepStreaming reconnects after failures, refreshes expired tokens, resets backoff once open", async () => {
  let refreshed = 0;
  const spine = { refreshToken: async () => (refreshed += 1, "t") };
  const script = [
    () => { throw err(Code.Unavailable, "STREAM_INTERRUPTED", 5); },
    () => { throw err(Code.Unauthenticated, "TOKEN_EXPIRED"); },
    async function* () { yield 1; yield 2; throw err(Code.Unavailable, "NODE_DRAINING", 1); },
    async function* () { yield 3; throw err(Code.Aborted, "SESSION_REPLACED"); },
  ];
  let opens = 0;
  const got = [];
  const states = [];
  const s = keepStreaming(
    spine,
    () => {
      const step = script[opens++];
      return (async function* () { yield* await step(); })();
    },
    (m) => got.push(m),
    { backoff: { initialMs: 1, maxMs: 5 }, onState: (st, e) => states.push(e ? `${st}:${e.reason}` : st) },
  );
  const end = await s.closed;
  assert.equal(end.reason, "SESSION_REPLACED");
  assert.deepEqual(got, [1, 2, 3]);
  assert.equal(opens, 4);
  assert.equal(refreshed, 1);
  assert.equal(s.state, "closed");
  assert.ok(states.includes("reconnecting:TOKEN_EXPIRED") && states.includes("open"));
});

test("close() ends a kept stream without an error", async () => {
  const s = keepStreaming({ refreshToken: async () => "t" }, (signal) => (async function* () {
    await new Promise((r) => signal.addEventListener("abort", r));
  })(), () => {});
  setTimeout(() => s.close(), 20);
  assert.equal(await s.closed, undefined);
});
