// gRPC-Web against a real `spine dev`, through @spine/web and by hand:
// origins (allowed, refused, preflights), malformed gRPC-Web bodies, the
// same auth, silo and limits as gRPC, the three server streams over
// gRPC-Web, and the Events stream kept open across token expiry.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Code, SpineError, calls, createSpine, create, identity, openCallEvents, presence, toBinary, watchPresence } from "../dist/index.js";
import { freePort, startSpineDev } from "../demo/server.mjs";

const PAGE = "http://127.0.0.1:7999"; // the allowed origin
const EVIL = "http://evil.example";
let spine;
let state;
const children = [];
let op;

before(async () => {
  state = fs.mkdtempSync(path.join(os.tmpdir(), "spine-web-test-"));
  spine = await startSpineDev({ port: await freePort(), state, origins: [PAGE], children });
  op = createSpine({ baseUrl: spine.spineUrl, token: async () => spine.operator });
});

after(async () => {
  for (const c of children) c.kill("SIGTERM");
  await Promise.all(children.map((c) => (c.exitCode !== null ? null : new Promise((r) => c.once("exit", r)))));
  fs.rmSync(state, { recursive: true, force: true });
});

let n = 0;
async function tenant() {
  const r = await op.tenantAdmin.createTenant({ requestId: `t${++n}-${Date.now()}`, displayName: `t${n}` });
  const server = createSpine({ baseUrl: spine.spineUrl, token: async () => r.credential.secret });
  return { id: r.tenant.tenantId, cred: r.credential.secret, server };
}

async function device(t, accountId, ttlSeconds = 600) {
  accountId ??= (await t.server.identity.createAccount({ requestId: crypto.randomUUID() })).accountId;
  const { publicKey } = crypto.generateKeyPairSync("ed25519");
  const d = await t.server.identity.registerDevice({
    requestId: crypto.randomUUID(),
    accountId,
    signatureScheme: identity.SignatureScheme.ED25519,
    signaturePublicKey: Buffer.from(publicKey.export({ format: "jwk" }).x, "base64url"),
  });
  const issue = async (ttl = ttlSeconds) =>
    (await t.server.identity.issueDeviceToken({ accountId, deviceId: d.deviceId, ttlSeconds: ttl })).token;
  return { accountId, deviceId: d.deviceId, token: await issue(), issue };
}

/** A page's fetch: every request carries the page's Origin, as browsers do. */
const fromOrigin = (origin) => (input, init = {}) => {
  const headers = new Headers(init.headers);
  headers.set("origin", origin);
  return fetch(input, { ...init, headers });
};

const asDevice = (d, origin = PAGE) =>
  createSpine({ baseUrl: spine.spineUrl, token: async () => d.token, fetch: fromOrigin(origin) });

/** A raw gRPC-Web request: returns HTTP status, headers, and grpc-status
 *  (from headers, or from the trailer frame). */
async function raw(method, body, { origin, token, text = false, headers = {} } = {}) {
  const type = text ? "application/grpc-web-text" : "application/grpc-web+proto";
  // The answer's encoding follows Accept.
  const h = { "content-type": type, accept: type, "x-grpc-web": "1", ...headers };
  if (origin) h.origin = origin;
  if (token) h.authorization = `Bearer ${token}`;
  const res = await fetch(`${spine.spineUrl}/${method}`, { method: "POST", headers: h, body });
  let bytes = Buffer.from(await res.arrayBuffer());
  // gRPC-Web text: each frame base64-encoded on its own (padding inside).
  if (text) bytes = Buffer.concat((bytes.toString().match(/[^=]+=*/g) ?? []).map((c) => Buffer.from(c, "base64")));
  let status = res.headers.get("grpc-status");
  let message = res.headers.get("grpc-message");
  for (let at = 0; at + 5 <= bytes.length; ) {
    const len = bytes.readUInt32BE(at + 1);
    if (bytes[at] & 0x80) {
      const trailers = bytes.subarray(at + 5, at + 5 + len).toString();
      status = /grpc-status:\s*(\d+)/i.exec(trailers)?.[1] ?? status;
      message = decodeURIComponent(/grpc-message:\s*(.*)/i.exec(trailers)?.[1]?.trim() ?? message ?? "");
    }
    at += 5 + len;
  }
  return { http: res.status, headers: res.headers, status: status === null ? null : Number(status), message };
}

const frame = (msg, declared = msg.length) => {
  const b = Buffer.alloc(5 + msg.length);
  b.writeUInt32BE(declared, 1);
  Buffer.from(msg).copy(b, 5);
  return b;
};

describe("gRPC-Web and origins", () => {
  test("a preflight from an allowed origin gets CORS; from any other, 403 and none", async () => {
    const ask = (origin) =>
      fetch(`${spine.spineUrl}/spine.calls.v1.Calls/StartCall`, {
        method: "OPTIONS",
        headers: {
          origin,
          "access-control-request-method": "POST",
          "access-control-request-headers": "authorization,content-type,x-grpc-web,x-user-agent",
        },
      });
    const ok = await ask(PAGE);
    assert.equal(ok.status, 200);
    assert.equal(ok.headers.get("access-control-allow-origin"), PAGE);
    assert.match(ok.headers.get("access-control-allow-headers"), /authorization/);
    const bad = await ask(EVIL);
    assert.equal(bad.status, 403);
    assert.equal(bad.headers.get("access-control-allow-origin"), null);
  });

  test("a page of another origin is refused before anything runs, even with a good token", async () => {
    const t = await tenant();
    const caller = await device(t);
    const callee = await device(t);
    await t.server.identity.updateSettings({
      accountId: callee.accountId,
      settings: { whoCanCall: identity.WhoCanCall.EVERYONE },
      updateMask: { paths: ["who_can_call"] },
    });
    const rings = [];
    const ev = openCallEvents(asDevice(callee), { onCall: (c) => rings.push(c) });
    const evil = asDevice(caller, EVIL);
    await assert.rejects(
      evil.calls.startCall({ requestId: "r1", callee: { peer: { case: "accountId", value: callee.accountId } } }),
      (e) => e instanceof SpineError && e.code === Code.PermissionDenied && e.reason === "ORIGIN_NOT_ALLOWED",
    );
    // The raw answer carries no CORS header: a browser shows the page nothing.
    const r = await raw("spine.identity.v1.Identity/GetSettings", frame(Buffer.alloc(0)), { origin: EVIL, token: caller.token });
    assert.equal(r.status, 7);
    assert.equal(r.headers.get("access-control-allow-origin"), null);
    await new Promise((res) => setTimeout(res, 500));
    assert.deepEqual(rings, [], "nothing rang");
    // From the allowed origin the same call goes through, with CORS.
    const good = asDevice(caller);
    const call = await good.calls.startCall({ requestId: "r2", callee: { peer: { case: "accountId", value: callee.accountId } } });
    assert.equal(call.state, calls.CallState.RINGING);
    const ok = await raw("spine.identity.v1.Identity/GetSettings", frame(Buffer.alloc(0)), { origin: PAGE, token: caller.token });
    assert.equal(ok.status, 0);
    assert.equal(ok.headers.get("access-control-allow-origin"), PAGE);
    await good.calls.hangUp({ callId: call.callId });
    ev.close();
    await ev.closed;
  });

  test("malformed gRPC-Web bodies get INVALID_ARGUMENT, and the node serves on", async () => {
    const t = await tenant();
    const d = await device(t);
    const m = "spine.identity.v1.Identity/GetSettings";
    const cases = {
      "bad base64": [Buffer.from("!!!not base64!!"), { text: true }],
      "a frame cut short": [frame(Buffer.from([0x0a, 0x02, 0x61, 0x62]), 40), {}],
      "a header cut short": [Buffer.from([0, 0, 0]), {}],
      "bytes that are not the message": [frame(Buffer.from([0xff, 0xff, 0xff, 0xff, 0x0f])), {}],
      "a length over the limit": [frame(Buffer.alloc(8), 64 * 1024 * 1024), {}],
    };
    for (const [name, [body, opts]] of Object.entries(cases)) {
      const r = await raw(m, body, { origin: PAGE, token: d.token, ...opts });
      assert.equal(r.status, Code.InvalidArgument, `${name}: ${r.status} ${r.message}`);
    }
    // Well-formed gRPC-Web text works.
    const good = await raw(m, Buffer.from(frame(Buffer.alloc(0)).toString("base64")), { origin: PAGE, token: d.token, text: true });
    assert.equal(good.status, 0, good.message);
  });

  test("auth and silos are gRPC's: forged tokens, other tenants' accounts", async () => {
    const t = await tenant();
    const other = await tenant();
    const d = await device(t);
    const stranger = await device(other);
    const [kind, kid, claims, sig] = d.token.split(".");
    const forged = [kind, kid, claims, sig.slice(0, -4) + (sig.endsWith("AAAA") ? "BBBB" : "AAAA")].join(".");
    await assert.rejects(
      createSpine({ baseUrl: spine.spineUrl, token: async () => forged, fetch: fromOrigin(PAGE) }).identity.getSettings({}),
      (e) => e.code === Code.Unauthenticated,
    );
    await assert.rejects(asDevice(d).identity.getSettings({ accountId: stranger.accountId }), (e) => e.code === Code.NotFound);
    await assert.rejects(t.server.identity.getAccount({ accountId: stranger.accountId }), (e) => e.code === Code.NotFound);
  });

  test("Presence.Watch and Groups.Receive stream over gRPC-Web and end with their credential", async () => {
    const t = await tenant();
    const d = await device(t);
    const page = asDevice(d);
    const seen = [];
    const watch = watchPresence(page, { targets: [{ target: { case: "accountId", value: d.accountId } }] }, (u) =>
      seen.push(...u.states.map((s) => s.status)),
    );
    await waitUntil(() => seen.length > 0, "the first presence state");
    await page.presence.announce({ status: presence.Status.ONLINE, ttlSeconds: 60 });
    await waitUntil(() => seen.includes(presence.Status.ONLINE), "ONLINE");

    const mailbox = page.groups.receive({ fromSeq: 0n });
    const ended = (async () => {
      try {
        for await (const _ of mailbox);
        return null;
      } catch (e) {
        return e;
      }
    })();
    await new Promise((r) => setTimeout(r, 300));
    await t.server.identity.revokeDevice({ accountId: d.accountId, deviceId: d.deviceId });
    const e = await ended;
    assert.ok(e instanceof SpineError, String(e));
    assert.equal(e.code, Code.Unauthenticated);
    assert.equal(e.reason, "CREDENTIAL_REVOKED");
    // The kept watch stops for good: revocation is not worth retrying.
    const closedWith = await watch.closed;
    assert.equal(closedWith?.reason, "CREDENTIAL_REVOKED");
    assert.equal(watch.state, "closed");
  });
});

describe("the Events stream kept open (openCallEvents)", () => {
  test("synced first, calls and signals, a token that expires is refreshed and the stream resumes", async () => {
    const t = await tenant();
    const alice = await device(t);
    const bob = await device(t, undefined, 3); // a 3-second token
    await t.server.identity.updateSettings({
      accountId: bob.accountId,
      settings: { whoCanCall: identity.WhoCanCall.EVERYONE },
      updateMask: { paths: ["who_can_call"] },
    });
    let refreshes = 0;
    const bobPage = createSpine({
      baseUrl: spine.spineUrl,
      fetch: fromOrigin(PAGE),
      token: async ({ refresh }) => {
        if (!refresh) return bob.token;
        refreshes += 1;
        return bob.issue(600);
      },
    });
    const log = [];
    const states = [];
    const ev = openCallEvents(
      bobPage,
      {
        onSynced: (cs) => log.push(["synced", cs.map((c) => c.callId)]),
        onCall: (c) => log.push(["call", c.callId, c.ring]),
        onSignal: (s) => log.push(["signal", s.callId, Buffer.from(s.payload).toString()]),
      },
      { onState: (s, e) => states.push(e ? `${s}:${e.reason}` : s) },
    );
    await waitUntil(() => log.length > 0, "synced");
    assert.deepEqual(log[0], ["synced", []]);

    const alicePage = asDevice(alice);
    const call = await alicePage.calls.startCall({ requestId: "c1", callee: { peer: { case: "accountId", value: bob.accountId } } });
    await waitUntil(() => log.some((l) => l[0] === "call" && l[1] === call.callId && l[2] === calls.RingState.RINGING), "the ring");
    await alicePage.calls.signal({ callId: call.callId, payload: new TextEncoder().encode("offer") });
    await waitUntil(() => log.some((l) => l[0] === "signal" && l[2] === "offer"), "the offer");

    // The 3-second token expires: the stream ends TOKEN_EXPIRED, the hook
    // gives a fresh token, the stream reopens and `synced` brings the call.
    await waitUntil(() => states.includes("reconnecting:TOKEN_EXPIRED"), "the expiry", 10_000);
    await waitUntil(() => log.filter((l) => l[0] === "synced").length === 2, "the second synced");
    assert.deepEqual(log.filter((l) => l[0] === "synced")[1], ["synced", [call.callId]]);
    assert.ok(refreshes >= 1);
    // Still live after the reconnect: the hang-up arrives.
    await alicePage.calls.hangUp({ callId: call.callId });
    await waitUntil(() => log.some((l) => l[0] === "call" && l[1] === call.callId && l.length === 3 && l !== log[0]) , "events after resume");

    // Another stream of the same device replaces this one: it stops, for good.
    const other = openCallEvents(createSpine({ baseUrl: spine.spineUrl, fetch: fromOrigin(PAGE), token: async () => bob.issue(600) }), {});
    const closed = await ev.closed;
    assert.equal(closed?.reason, "SESSION_REPLACED");
    other.close();
    await other.closed;
  });

  test("messages are the generated ones: a request encodes as protobuf", () => {
    const bytes = toBinary(calls.SignalRequestSchema, create(calls.SignalRequestSchema, { callId: "cl_x", payload: new Uint8Array([1]) }));
    assert.deepEqual([...bytes], [0x0a, 4, ...Buffer.from("cl_x"), 0x1a, 1, 1]);
  });
});

async function waitUntil(f, what, ms = 15_000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await f()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}
