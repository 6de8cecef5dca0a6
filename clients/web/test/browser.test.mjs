// The demo in a real browser (Debian's chromium, headless, fake camera and
// microphone), driven by playwright-core: people in different products call
// each other through Spine over gRPC-Web, with media relayed by the
// project's coturn. Screenshots of each product's page in a call go to
// test-results/ (not committed).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startDemo } from "../demo/server.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const shots = path.join(here, "../test-results");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

let demo;
let browser;

before(async () => {
  fs.mkdirSync(shots, { recursive: true });
  demo = await startDemo({ fixedPorts: false, quiet: true });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--use-fake-device-for-media-stream",
      "--use-fake-ui-for-media-stream",
    ],
  });
});

after(async () => {
  await browser?.close();
  await demo?.stop();
});

/** A person's page in a browser context of its own (one device). */
async function open(product, who, context) {
  const ctx = context ?? (await browser.newContext({ permissions: ["camera", "microphone"] }));
  const page = await ctx.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  await page.goto(`${demo.urls[product]}?as=${who}`);
  await page.waitForFunction(() => window.demo?.ready === true, null, { timeout: 20_000 });
  // A test that fails midway must not leave its call live on the server:
  // the next test's call between the same two people would meet it.
  const close = async () => {
    if (await page.locator("#hangup").isVisible().catch(() => false)) {
      await page.locator("#hangup").click().catch(() => undefined);
      await page.evaluate(() => window.demo.hangingUp).catch(() => undefined);
    }
    await ctx.close();
  };
  return { page, ctx, errors, close };
}

const contact = (page, name) => page.locator(`#contacts li[data-name="${name}"]`);

async function call(from, name) {
  await contact(from.page, name).locator("button.call").click();
}

/** Inbound RTP bytes and the selected candidate pair's local type. */
async function media(page) {
  return page.evaluate(async () => {
    const pc = window.demo.pc;
    if (!pc) return { state: "none", bytes: 0, local: null };
    const stats = await pc.getStats();
    let bytes = 0;
    let local = null;
    stats.forEach((r) => {
      if (r.type === "inbound-rtp") bytes += r.bytesReceived ?? 0;
      // The pair the transport selected. (A pair's own state is no guide:
      // chromium shows the selected pair "in-progress" while a consent
      // check on it is in flight.)
      if (r.type === "transport" && r.selectedCandidatePairId) {
        const pair = stats.get(r.selectedCandidatePairId);
        local = stats.get(pair?.localCandidateId)?.candidateType ?? null;
      }
    });
    return { state: pc.connectionState, bytes, local, policy: pc.getConfiguration().iceTransportPolicy };
  });
}

async function until(what, f, ms = 20_000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    last = await f();
    if (last) return last;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

describe("the three-product demo in chromium", () => {
  test("Messenger-style Alice calls WhatsApp-style Dave by interop handle: media crosses coturn both ways", async () => {
    const alice = await open("messenger", "alice");
    const dave = await open("whatsapp", "dave");
    try {
      await call(alice, "Dave");
      await dave.page.locator("#incoming").waitFor({ state: "visible" });
      assert.match(await dave.page.locator("#caller").textContent(), /Alice is calling/);
      await dave.page.locator("#answer").click();

      for (const side of [alice, dave]) {
        const first = await until("a connected relay pair", async () => {
          const m = await media(side.page);
          return m.state === "connected" && m.bytes > 0 ? m : null;
        });
        assert.equal(first.policy, "relay");
        assert.equal(first.local, "relay", "the selected pair goes through TURN");
        await until("inbound RTP bytes to grow", async () => (await media(side.page)).bytes > first.bytes + 1000);
      }
      await until("both pages to show the call", async () =>
        (await alice.page.locator("#call-state").textContent()).includes("In a call with Dave") &&
        (await dave.page.locator("#call-state").textContent()).includes("In a call with Alice"),
      );
      // Presence shows the call to Alice's contacts who may see it.
      await until("Dave in a call on Alice's page", async () =>
        (await contact(alice.page, "Dave").getAttribute("data-presence")) === "in a call",
      );
      await alice.page.screenshot({ path: path.join(shots, "messenger-in-call.png"), fullPage: true });
      await dave.page.screenshot({ path: path.join(shots, "whatsapp-in-call.png"), fullPage: true });

      await dave.page.locator("#hangup").click();
      await alice.page.locator("#call").waitFor({ state: "hidden" });
      assert.equal(await alice.page.locator("#notice").textContent(), "Call ended");
      assert.equal(await alice.page.evaluate(() => window.demo.pc ?? null), null);
      assert.deepEqual([...alice.errors, ...dave.errors], []);
    } finally {
      await alice.close();
      await dave.close();
    }
  });

  test("Instagram-style Carol calls Alice; Alice declines, Carol's page says so; the next call she answers", async () => {
    const carol = await open("instagram", "carol");
    const alice = await open("messenger", "alice");
    try {
      await call(carol, "Alice");
      await alice.page.locator("#incoming").waitFor({ state: "visible" });
      await carol.page.screenshot({ path: path.join(shots, "instagram-calling.png"), fullPage: true });
      await alice.page.locator("#decline").click();
      await until("Carol to see the decline", async () =>
        (await carol.page.locator("#notice").textContent()) === "Call declined",
      );
      assert.equal(await alice.page.locator("#incoming").isVisible(), false);
      // She calls again, and this time Alice answers.
      await call(carol, "Alice");
      await alice.page.locator("#incoming").waitFor({ state: "visible" });
      await alice.page.locator("#answer").click();
      await until("Carol connected with media", async () => {
        const m = await media(carol.page);
        return m.state === "connected" && m.bytes > 0;
      });
      await carol.page.screenshot({ path: path.join(shots, "instagram-in-call.png"), fullPage: true });
      await carol.page.locator("#hangup").click();
      await alice.page.locator("#call").waitFor({ state: "hidden" });
    } finally {
      await carol.close();
      await alice.close();
    }
  });

  test("a callee whose settings refuse the call looks the same as a blocked caller: unavailable", async () => {
    // Erin (WhatsApp-style) lets nobody call her, from her own page.
    const erin = await open("whatsapp", "erin");
    const bob = await open("messenger", "bob");
    try {
      await erin.page.locator("#who-can-call").selectOption("3");
      await erin.page.locator("#save-settings").click();
      await until("settings saved", async () => (await erin.page.locator("#settings-saved").textContent()) === "Saved");
      await call(bob, "Erin");
      await until("Bob's notice", async () => { const t = await bob.page.locator("#notice").textContent(); return t === "Erin is unavailable" ? t : (console.log("notice:", t), false); });
      assert.equal(await erin.page.locator("#incoming").isVisible(), false, "nothing rang");
      // Erin allows calls again, but blocks Bob: Bob sees exactly the same.
      await erin.page.locator("#who-can-call").selectOption("1");
      await erin.page.locator("#save-settings").click();
      await until("settings saved", async () => (await erin.page.locator("#settings-saved").textContent()) === "Saved");
      await contact(erin.page, "Bob").locator("button.block").click();
      await until("blocked", async () => (await contact(erin.page, "Bob").locator("button.block").textContent()) === "Unblock");
      await bob.page.evaluate(() => (document.getElementById("notice").textContent = ""));
      await call(bob, "Erin");
      await until("Bob's notice", async () => { const t = await bob.page.locator("#notice").textContent(); return t === "Erin is unavailable" ? t : (console.log("notice:", t), false); });
      assert.equal(await erin.page.locator("#incoming").isVisible(), false, "nothing rang");
      // The data report shows Erin what Spine keeps: her block is in it,
      // and nothing of Bob's call attempt.
      await erin.page.locator("#show-report").click();
      const report = await until("the report", async () => (await erin.page.locator("#report-json").textContent()) || null);
      const parsed = JSON.parse(report);
      assert.ok(parsed.sections.length > 0);
      assert.ok(!report.includes("call_not_placed") && !report.toLowerCase().includes("callattempt"));
      // Unblocked, the call rings again.
      await contact(erin.page, "Bob").locator("button.block").click();
      await until("unblocked", async () => (await contact(erin.page, "Bob").locator("button.block").textContent()) === "Block");
      await call(bob, "Erin");
      await erin.page.locator("#incoming").waitFor({ state: "visible" });
      await erin.page.locator("#decline").click();
    } finally {
      await erin.close();
      await bob.close();
    }
  });

  test("Dave on two devices: both ring, answering on one stops the other", async () => {
    const alice = await open("messenger", "alice");
    const phone = await open("whatsapp", "dave");
    const laptop = await open("whatsapp", "dave");
    try {
      const ids = await Promise.all(
        [phone, laptop].map((d) => d.page.evaluate(() => Object.keys(localStorage).map((k) => localStorage.getItem(k)))),
      );
      assert.notDeepEqual(ids[0], ids[1], "two devices");
      await call(alice, "Dave");
      await phone.page.locator("#incoming").waitFor({ state: "visible" });
      await laptop.page.locator("#incoming").waitFor({ state: "visible" });
      await phone.page.locator("#answer").click();
      await laptop.page.locator("#incoming").waitFor({ state: "hidden" });
      assert.equal(await laptop.page.locator("#notice").textContent(), "Answered on another device");
      await until("phone connected", async () => (await media(phone.page)).state === "connected");
      assert.equal((await media(laptop.page)).state, "none", "the other device holds no media");
      await alice.page.locator("#hangup").click();
      await phone.page.locator("#call").waitFor({ state: "hidden" });
    } finally {
      await alice.close();
      await phone.close();
      await laptop.close();
    }
  });
});
