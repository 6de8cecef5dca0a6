// The three-product demo: starts `spine dev` (every service, embedded
// store), a coturn on loopback that shares Spine's TURN secret, and one
// small web server per product, which serves the product's page and plays
// the part of that product's own servers: it holds the product's tenant
// credential, and only that one, registers its people's devices and issues
// their device tokens (real products do this in their own backends).
//
//   node demo/server.mjs [--spine path/to/spine] [--quiet]
//
// startDemo() is what the browser tests run, on free ports.
import { spawn } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createSpine, identity } from "../dist/index.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "../../..");

/** The products, their look, and their people. `contacts` name people of
 *  any product; other products' people are reached through the interop
 *  handles the demo has each person open to the other two products. */
export const PRODUCTS = [
  {
    key: "messenger",
    name: "Messenger-style",
    port: 7411,
    theme: { accent: "#0866ff", background: "#f0f2f5", font: "system-ui, sans-serif", radius: "18px" },
    people: { alice: { name: "Alice", contacts: ["bob", "dave", "carol"] }, bob: { name: "Bob", contacts: ["alice", "erin"] } },
  },
  {
    key: "instagram",
    name: "Instagram-style",
    port: 7412,
    theme: { accent: "#d62976", background: "#fafafa", font: "Georgia, serif", radius: "8px" },
    people: { carol: { name: "Carol", contacts: ["alice", "dave"] } },
  },
  {
    key: "whatsapp",
    name: "WhatsApp-style",
    port: 7413,
    theme: { accent: "#25d366", background: "#efeae2", font: "Helvetica, Arial, sans-serif", radius: "10px" },
    people: {
      dave: { name: "Dave", contacts: ["alice", "carol", "erin"] },
      erin: { name: "Erin", contacts: ["dave", "bob"] },
    },
  },
];

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function waitForLine(child, pattern, what, ms = 120_000) {
  return new Promise((resolve, reject) => {
    let seen = "";
    const timer = setTimeout(() => reject(new Error(`${what} did not start in ${ms} ms:\n${seen.slice(-4000)}`)), ms);
    const on = (d) => {
      seen += d;
      if (pattern.test(seen)) {
        clearTimeout(timer);
        resolve(seen);
      }
    };
    child.stdout?.on("data", on);
    child.stderr?.on("data", on);
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`${what} exited (${code}):\n${seen.slice(-4000)}`));
    });
  });
}

function waitForUdp(port, ms = 10_000) {
  // coturn is ready once it answers a STUN binding request.
  return new Promise(async (resolve, reject) => {
    const dgram = await import("node:dgram");
    const sock = dgram.createSocket("udp4");
    const deadline = Date.now() + ms;
    const req = Buffer.alloc(20);
    req.writeUInt16BE(0x0001, 0);
    req.writeUInt32BE(0x2112a442, 4);
    crypto.randomFillSync(req, 8, 12);
    const timer = setInterval(() => {
      if (Date.now() > deadline) {
        clearInterval(timer);
        sock.close();
        reject(new Error(`coturn did not answer on 127.0.0.1:${port}`));
      } else sock.send(req, port, "127.0.0.1");
    }, 100);
    sock.on("message", () => {
      clearInterval(timer);
      sock.close();
      resolve();
    });
  });
}

/** Starts `spine dev` on loopback with `config` (TOML) over its defaults
 *  and `origins` as its web origins; its process joins `children`. */
export async function startSpineDev({ spineBin, port, state, origins, config = "", children, quiet = true, dataDir, media = false }) {
  spineBin ??= process.env.SPINE_BIN ?? path.join(repo, "target/debug/spine");
  fs.writeFileSync(path.join(state, "spine.toml"), config, { mode: 0o600 });
  const spine = spawn(
    spineBin,
    [
      "dev",
      "--listen",
      `127.0.0.1:${port}`,
      "--state-dir",
      state,
      "--config",
      path.join(state, "spine.toml"),
      ...(dataDir ? ["--data-dir", dataDir] : []),
      // A media node (Janus) for group calls, when Janus is installed.
      ...(media && fs.existsSync("/usr/bin/janus") ? ["--media"] : []),
      ...origins.flatMap((o) => ["--allow-origin", o]),
    ],
    {
      stdio: ["ignore", "pipe", "pipe"],
      // SPINE_* variables are config to spine (SPINE_BIN, say, is not).
      env: {
        ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("SPINE_"))),
        RUST_LOG: process.env.RUST_LOG ?? "warn",
      },
    },
  );
  children.push(spine);
  await waitForLine(spine, /Spine dev is ready/, "spine dev");
  spine.stdout.resume();
  if (!quiet) spine.stderr.pipe(process.stderr);
  else spine.stderr.resume();
  const operator = fs.readFileSync(path.join(state, "operator-token"), "utf8").trim();
  return { spineUrl: `http://127.0.0.1:${port}`, operator, process: spine };
}

/** Starts everything; returns { urls, stop(), ... }. */
export async function startDemo(opts = {}) {
  const quiet = opts.quiet ?? false;
  const log = (...a) => quiet || console.log(...a);
  const spineBin = opts.spineBin;
  const fixedPorts = opts.fixedPorts ?? true;
  const grpcPort = fixedPorts ? 50051 : await freePort();
  const turnPort = fixedPorts ? 3478 : await freePort();
  const productPorts = fixedPorts ? PRODUCTS.map((p) => p.port) : await Promise.all(PRODUCTS.map(() => freePort()));
  const origins = productPorts.map((p) => `http://127.0.0.1:${p}`);
  const state = fs.mkdtempSync(path.join(os.tmpdir(), "spine-demo-"));
  const children = [];
  const servers = [];
  const stop = async () => {
    for (const s of servers) s.closeAllConnections?.(), s.close();
    for (const c of children) if (c.exitCode === null) c.kill("SIGTERM");
    await Promise.all(children.map((c) => (c.exitCode !== null ? null : new Promise((r) => c.once("exit", r)))));
    fs.rmSync(state, { recursive: true, force: true });
  };
  try {
    // coturn, with a secret made for this run (Spine gets the same one).
    const turnSecret = crypto.randomBytes(24).toString("hex");
    const relayMin = 40000 + Math.floor(Math.random() * 20000);
    const turn = spawn(
      "turnserver",
      [
        "-n",
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        `--listening-port=${turnPort}`,
        `--min-port=${relayMin}`,
        `--max-port=${relayMin + 400}`,
        "--use-auth-secret",
        `--static-auth-secret=${turnSecret}`,
        "--realm=spine.demo",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--no-tcp-relay",
        // Both browsers and the relay are on this machine's loopback.
        "--allow-loopback-peers",
        "--log-file=stdout",
        "--simple-log",
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    children.push(turn);
    turn.stdout.resume();
    turn.stderr.resume();
    await waitForUdp(turnPort);

    // spine dev, its TURN pointing at that coturn, its web origins the
    // three product pages.
    const { spineUrl, operator } = await startSpineDev({
      spineBin,
      port: grpcPort,
      state,
      origins,
      config: `[calls.turn]\nuris = ["turn:127.0.0.1:${turnPort}?transport=udp"]\nsecrets = ["${turnSecret}"]\n`,
      children,
      quiet,
      media: true,
    });

    const world = await populate(spineUrl, operator);
    for (const [i, p] of PRODUCTS.entries()) {
      servers.push(await serveProduct(p, world, productPorts[i], spineUrl));
    }
    const urls = Object.fromEntries(PRODUCTS.map((p, i) => [p.key, `http://127.0.0.1:${productPorts[i]}/`]));
    log("\nSpine demo is up: three products on one Spine, calling each other.\n");
    for (const p of PRODUCTS) {
      const who = Object.keys(p.people).join(", ");
      log(`  ${p.name.padEnd(16)} ${urls[p.key]}?as=<${who}>`);
    }
    log(
      `\nSpine (gRPC and gRPC-Web): ${spineUrl}; TURN (coturn): 127.0.0.1:${turnPort}.\n` +
        "Each product's page is served by a stand-in for that product's own servers: it holds\n" +
        "that product's tenant credential only, and issues device tokens for its own people.\n" +
        "Open two products side by side (say Alice in Messenger-style, Dave in WhatsApp-style)\n" +
        "and call. Ctrl-C stops everything.\n",
    );
    return { urls, spineUrl, turnPort, world, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}

/** Creates the three tenants, their people, handles and contacts. */
async function populate(spineUrl, operator) {
  const op = createSpine({ baseUrl: spineUrl, token: async () => operator });
  const tenants = {};
  for (const p of PRODUCTS) {
    // TenantAdmin is the operator's; the demo plays the operator once, here.
    const { tenant, credential } = await op.tenantAdmin.createTenant({ requestId: `demo-${p.key}`, displayName: p.name });
    tenants[p.key] = { tenantId: tenant.tenantId, secret: credential.secret };
  }
  // Each product's own server: its tenant credential only.
  const server = (key) => createSpine({ baseUrl: spineUrl, token: async () => tenants[key].secret });
  const people = {};
  for (const p of PRODUCTS) {
    const s = server(p.key);
    for (const [id, person] of Object.entries(p.people)) {
      const acc = await s.identity.createAccount({ requestId: `demo-${id}` });
      people[id] = { id, name: person.name, product: p.key, tenantId: tenants[p.key].tenantId, accountId: acc.accountId };
    }
  }
  // Every person opens an interop handle to the two other products.
  for (const p of PRODUCTS) {
    const s = server(p.key);
    const others = PRODUCTS.filter((q) => q !== p).map((q) => tenants[q.key].tenantId);
    for (const id of Object.keys(p.people)) {
      const h = await s.identity.createInteropHandle({
        requestId: `demo-handle-${id}`,
        accountId: people[id].accountId,
        allowedTenantIds: others,
      });
      people[id].handle = h.handle;
    }
  }
  for (const p of PRODUCTS) {
    const s = server(p.key);
    for (const [id, person] of Object.entries(p.people)) {
      for (const c of person.contacts) {
        await s.identity.addContact({ accountId: people[id].accountId, peer: peerFor(people, p.key, c) });
      }
    }
  }
  return { tenants, people };
}

/** How someone of product `from` names person `to`: by account id in the
 *  same product, by interop reference across products. */
function peerFor(people, from, to) {
  const t = people[to];
  if (t.product === from) return { peer: { case: "accountId", value: t.accountId } };
  return { peer: { case: "interop", value: { tenantId: t.tenantId, handle: t.handle } } };
}

/** One product's web server: its page, and its server-side API. */
async function serveProduct(product, world, port, spineUrl) {
  const { tenants, people } = world;
  const secret = tenants[product.key].secret;
  const s = createSpine({ baseUrl: spineUrl, token: async () => secret });
  const mine = (id) => (people[id]?.product === product.key ? people[id] : undefined);
  const devices = new Map(); // deviceId -> person id, devices this product registered
  const staticFiles = {
    "/": ["index.html", "text/html; charset=utf-8"],
    "/app.js": ["dist/app.js", "text/javascript; charset=utf-8"],
    "/style.css": ["style.css", "text/css; charset=utf-8"],
  };
  const json = (res, code, body) => {
    res.writeHead(code, { "content-type": "application/json", "cache-control": "no-store" });
    res.end(JSON.stringify(body));
  };
  const token = async (person, deviceId) => {
    const t = await s.identity.issueDeviceToken({ accountId: person.accountId, deviceId, ttlSeconds: 900 });
    return t.token;
  };
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, `http://127.0.0.1:${port}`);
    try {
      const file = staticFiles[url.pathname];
      if (req.method === "GET" && file) {
        res.writeHead(200, { "content-type": file[1], "cache-control": "no-store" });
        return res.end(fs.readFileSync(path.join(here, file[0])));
      }
      const who = mine(url.searchParams.get("as") ?? "");
      if (url.pathname === "/api/config" && req.method === "GET") {
        return json(res, 200, {
          product: { key: product.key, name: product.name, theme: product.theme },
          spineUrl,
          people: Object.keys(product.people).map((id) => ({ id, name: people[id].name })),
        });
      }
      if (!who) return json(res, 404, { error: "no such person in this product" });
      if (url.pathname === "/api/device" && req.method === "POST") {
        // A new device of this person (a browser tab). Its signature key
        // would be its MLS credential's; calls need none of MLS, so the
        // demo makes one and forgets the private half.
        const { publicKey } = crypto.generateKeyPairSync("ed25519");
        const raw = Buffer.from(publicKey.export({ format: "jwk" }).x, "base64url");
        const d = await s.identity.registerDevice({
          requestId: `demo-${crypto.randomUUID()}`,
          accountId: who.accountId,
          signatureScheme: identity.SignatureScheme.ED25519,
          signaturePublicKey: raw,
        });
        devices.set(d.deviceId, who.id);
        return json(res, 200, { deviceId: d.deviceId, token: await token(who, d.deviceId) });
      }
      if (url.pathname === "/api/token" && req.method === "POST") {
        const deviceId = url.searchParams.get("device") ?? "";
        if (devices.get(deviceId) !== who.id) return json(res, 404, { error: "no such device" });
        return json(res, 200, { token: await token(who, deviceId) });
      }
      if (url.pathname === "/api/directory" && req.method === "GET") {
        // Names for the people this person may know: the product's own
        // people by account id, others by the interop reference their
        // handle gives (real products learn names with the handle).
        const entries = Object.values(people)
          .filter((p) => p.id !== who.id)
          .map((p) => ({
            name: p.name,
            product: PRODUCTS.find((q) => q.key === p.product).name,
            peer: peerFor(people, product.key, p.id).peer,
            // The caller's own handle to show to this person's product.
            callerHandle: p.product === product.key ? "" : who.handle,
          }));
        return json(res, 200, { me: { name: who.name, accountId: who.accountId }, entries });
      }
      json(res, 404, { error: "not found" });
    } catch (e) {
      json(res, 500, { error: String(e?.message ?? e) });
    }
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", resolve);
  });
  return server;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const at = args.indexOf("--spine");
  const demo = await startDemo({ spineBin: at >= 0 ? args[at + 1] : undefined, quiet: args.includes("--quiet") });
  const bye = async () => {
    await demo.stop();
    process.exit(0);
  };
  process.on("SIGINT", bye);
  process.on("SIGTERM", bye);
}
