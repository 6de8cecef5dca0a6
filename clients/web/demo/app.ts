// One product's page of the demo (the same code for all three; the product
// server says which product it is and how it looks). Everything a frontend
// team would build on @spine/web: contacts with presence, calls with
// WebRTC relayed through Spine's TURN, ringing on every device, privacy
// settings and the account's data report.
import {
  Code,
  SpineError,
  calls,
  common,
  createSpine,
  identity,
  openCallEvents,
  presence,
  toJson,
  watchPresence,
  type Spine,
} from "../src/index.js";

type Peer = common.PeerRef["peer"];
interface Entry {
  name: string;
  product: string;
  peer: Peer;
  callerHandle: string;
}
interface Current {
  callId: string;
  role: "caller" | "callee";
  peerName: string;
  video: boolean;
  pc?: RTCPeerConnection;
  local?: MediaStream;
  remoteLeg: string;
  /** Signals that came before this device's media was set up. */
  queued: calls.IncomingSignal[];
  /** Media set up (tracks added, the caller's offer sent): signals are handled. */
  ready: boolean;
  /** Signals are handled one at a time, in the order they came. */
  work: Promise<void>;
  remoteSet: boolean;
  pendingIce: RTCIceCandidateInit[];
  started: boolean;
}

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const params = new URLSearchParams(location.search);
const enc = new TextEncoder();
const dec = new TextDecoder();

// What tests (and curious people) can look at.
const demo: {
  pc?: RTCPeerConnection;
  events?: string;
  current?: Current | undefined;
  ready: boolean;
  /** The last HangUp in flight (tests wait for it before closing a page). */
  hangingUp?: Promise<unknown>;
} = {
  ready: false,
};
(window as unknown as { demo: typeof demo }).demo = demo;

function notice(text: string) {
  const n = $("notice");
  n.textContent = text;
  n.hidden = !text;
}

function peerKey(p: Peer): string {
  if (p.case === "accountId") return `a:${p.value}`;
  if (p.case === "interop") return `i:${p.value.tenantId}:${p.value.handle}`;
  return "";
}

async function main() {
  const cfg = await (await fetch("/api/config")).json();
  const theme = cfg.product.theme;
  const root = document.documentElement.style;
  root.setProperty("--accent", theme.accent);
  root.setProperty("--background", theme.background);
  root.setProperty("--font", theme.font);
  root.setProperty("--radius", theme.radius);
  document.title = cfg.product.name;
  $("product").textContent = cfg.product.name;

  const as = params.get("as");
  if (!as) {
    // Who are you? One link per person of this product.
    $("chooser").hidden = false;
    for (const p of cfg.people) {
      const a = document.createElement("a");
      a.href = `?as=${p.id}`;
      a.textContent = p.name;
      $("people").append(a);
    }
    return;
  }
  $("app").hidden = false;

  // This browser profile is one device of the person: registered once by
  // the product's server, its id kept here; tokens come from that server.
  const deviceKey = `spine-demo-device-${cfg.product.key}-${as}`;
  let deviceId = localStorage.getItem(deviceKey);
  let firstToken: string | undefined;
  if (!deviceId) {
    const d = await (await fetch(`/api/device?as=${as}`, { method: "POST" })).json();
    deviceId = d.deviceId as string;
    firstToken = d.token;
    localStorage.setItem(deviceKey, deviceId);
  }
  const spine = createSpine({
    baseUrl: cfg.spineUrl,
    token: async () => {
      if (firstToken) {
        const t = firstToken;
        firstToken = undefined;
        return t;
      }
      const r = await fetch(`/api/token?as=${as}&device=${deviceId}`, { method: "POST" });
      if (!r.ok) throw new Error("the product server issued no token");
      return (await r.json()).token;
    },
  });

  const dir = await (await fetch(`/api/directory?as=${as}`)).json();
  $("me").textContent = dir.me.name;
  const entries: Entry[] = dir.entries;
  const byKey = new Map(entries.map((e) => [peerKey(e.peer), e]));
  const nameOf = (p: common.PeerRef | undefined) => (p ? (byKey.get(peerKey(p.peer))?.name ?? "Someone") : "Someone");

  await renderContacts(spine, byKey);
  startPresence(spine);
  const ui = callUi(spine, nameOf);
  await settingsPanel(spine);
  reportPanel(spine);

  openCallEvents(
    spine,
    {
      onSynced: (live) => ui.synced(live),
      onCall: (c) => ui.changed(c),
      onSignal: (s) => ui.signal(s),
    },
    {
      onState: (s, e) => {
        demo.events = s;
        $("link").textContent = s === "open" ? "connected" : e ? `${s} (${e.codeName})` : s;
        if (s === "open") demo.ready = true;
      },
    },
  );
}

let contacts: { entry: Entry; li: HTMLElement }[] = [];

async function renderContacts(spine: Spine, byKey: Map<string, Entry>) {
  const list = $("contacts");
  list.replaceChildren();
  const [{ contacts: peers }, { blocked: blocks }] = await Promise.all([
    spine.identity.listContacts({}),
    spine.identity.listBlocks({}),
  ]);
  const blocked = new Set(blocks.map((b) => peerKey(b.peer)));
  contacts = [];
  for (const p of peers) {
    const entry = byKey.get(peerKey(p.peer));
    if (!entry) continue;
    const li = document.createElement("li");
    li.dataset.name = entry.name;
    const isBlocked = blocked.has(peerKey(p.peer));
    li.innerHTML = `<span class="dot"></span><span class="who"></span><span class="product"></span>
      <span class="presence">…</span><button class="call">Call</button><button class="block"></button>`;
    li.querySelector(".who")!.textContent = entry.name;
    li.querySelector(".product")!.textContent = entry.product;
    const block = li.querySelector<HTMLButtonElement>(".block")!;
    block.textContent = isBlocked ? "Unblock" : "Block";
    block.onclick = async () => {
      const req = { peer: { peer: entry.peer } };
      await (block.textContent === "Block" ? spine.identity.block(req) : spine.identity.unblock(req));
      block.textContent = block.textContent === "Block" ? "Unblock" : "Block";
    };
    list.append(li);
    contacts.push({ entry, li });
  }
}

function startPresence(spine: Spine) {
  const announce = () =>
    spine.presence.announce({ status: presence.Status.ONLINE, ttlSeconds: 60 }).catch(() => undefined);
  void announce();
  setInterval(announce, 30_000);
  if (contacts.length === 0) return;
  const targets = contacts.map(({ entry }) => ({
    target:
      entry.peer.case === "accountId"
        ? { case: "accountId" as const, value: entry.peer.value }
        : { case: "interop" as const, value: (entry.peer as { value: common.InteropRef }).value },
  }));
  const label: Record<number, string> = {
    [presence.Status.ONLINE]: "online",
    [presence.Status.AWAY]: "away",
    [presence.Status.IN_CALL]: "in a call",
    [presence.Status.OFFLINE]: "offline",
    [presence.Status.UNAVAILABLE]: "—",
  };
  watchPresence(spine, { targets }, (u) => {
    for (const s of u.states) {
      const c = contacts[s.target];
      if (!c) continue;
      const text = label[s.status] ?? "—";
      c.li.querySelector(".presence")!.textContent = text;
      c.li.dataset.presence = text;
    }
  });
}

function callUi(spine: Spine, nameOf: (p: common.PeerRef | undefined) => string) {
  let current: Current | undefined;
  let ringing: calls.Call | undefined;

  const showIncoming = (c: calls.Call | undefined) => {
    ringing = c;
    $("incoming").hidden = !c;
    if (c) $("caller").textContent = `${nameOf(c.peer)} is calling${c.video ? " (video)" : ""}`;
  };
  const showCall = (text: string) => {
    $("call").hidden = !current;
    $("call-state").textContent = text;
  };
  const send = async (obj: unknown) => {
    if (!current) return;
    await spine.calls.signal({ callId: current.callId, toLegId: current.remoteLeg, payload: enc.encode(JSON.stringify(obj)) });
  };
  const teardown = (why: string) => {
    if (current) {
      current.pc?.close();
      current.local?.getTracks().forEach((t) => t.stop());
    }
    current = undefined;
    demo.current = undefined;
    demo.pc = undefined;
    ($("local") as HTMLVideoElement).srcObject = null;
    ($("remote") as HTMLVideoElement).srcObject = null;
    showCall("");
    notice(why);
  };

  const startMedia = async (c: Current) => {
    if (c.started) return;
    c.started = true;
    const creds = await spine.calls.getTurnCredentials({ callId: c.callId });
    const pc = new RTCPeerConnection({
      iceServers: [{ urls: creds.uris, username: creds.username, credential: creds.password }],
      // Media only through the TURN relay: the peers never learn each
      // other's addresses.
      iceTransportPolicy: "relay",
    });
    c.pc = pc;
    demo.pc = pc;
    c.local = await navigator.mediaDevices.getUserMedia({ audio: true, video: c.video });
    for (const t of c.local.getTracks()) pc.addTrack(t, c.local);
    ($("local") as HTMLVideoElement).srcObject = c.local;
    pc.ontrack = (ev) => {
      ($("remote") as HTMLVideoElement).srcObject = ev.streams[0] ?? new MediaStream([ev.track]);
    };
    pc.onicecandidate = (ev) => {
      if (ev.candidate) void send({ t: "ice", c: ev.candidate.toJSON() });
    };
    pc.onconnectionstatechange = () => {
      if (current === c) showCall(pc.connectionState === "connected" ? `In a call with ${c.peerName}` : `Connecting to ${c.peerName}…`);
    };
    if (c.role === "caller") {
      await pc.setLocalDescription(await pc.createOffer());
      await send({ t: "offer", sdp: pc.localDescription!.sdp });
    }
    // Only now: an offer answered before the tracks were added would get
    // an answer that sends nothing.
    c.ready = true;
    for (const s of c.queued.splice(0)) handleInOrder(c, s);
  };

  const onSignal = (s: calls.IncomingSignal) => {
    const c = current;
    if (!c || s.callId !== c.callId) return;
    if (!c.ready) c.queued.push(s);
    else handleInOrder(c, s);
  };
  const handleInOrder = (c: Current, s: calls.IncomingSignal) => {
    c.work = c.work.then(() => (current === c ? handle(c, s) : undefined)).catch((e) => notice(`Signalling failed: ${e}`));
  };

  const handle = async (c: Current, s: calls.IncomingSignal) => {
    if (!c.pc) return;
    const m = JSON.parse(dec.decode(s.payload));
    if (!c.remoteLeg) c.remoteLeg = s.fromLegId;
    if (m.t === "offer") {
      await c.pc.setRemoteDescription({ type: "offer", sdp: m.sdp });
      c.remoteSet = true;
      await c.pc.setLocalDescription(await c.pc.createAnswer());
      await send({ t: "answer", sdp: c.pc.localDescription!.sdp });
    } else if (m.t === "answer") {
      await c.pc.setRemoteDescription({ type: "answer", sdp: m.sdp });
      c.remoteSet = true;
    } else if (m.t === "ice") {
      if (!c.remoteSet) {
        c.pendingIce.push(m.c);
        return;
      }
    }
    if (c.remoteSet) for (const ice of c.pendingIce.splice(0).concat(m.t === "ice" ? [m.c] : [])) await c.pc.addIceCandidate(ice);
  };

  const begin = (callId: string, role: Current["role"], peerName: string, video: boolean, remoteLeg: string) => {
    const c: Current = {
      callId,
      role,
      peerName,
      video,
      remoteLeg,
      queued: [],
      ready: false,
      work: Promise.resolve(),
      remoteSet: false,
      pendingIce: [],
      started: false,
    };
    demo.current = c;
    return c;
  };
  const otherLeg = (c: calls.Call) => c.participants.find((p) => !p.you)?.legId ?? "";
  const endText: Record<number, string> = {
    [calls.EndReason.HUNG_UP]: "Call ended",
    [calls.EndReason.CANCELLED]: "Call cancelled",
    [calls.EndReason.DECLINED]: "Call declined",
    [calls.EndReason.NO_ANSWER]: "No answer",
    [calls.EndReason.BUSY]: "Busy",
  };

  const changed = (c: calls.Call) => {
    if (c.state === calls.CallState.ENDED) {
      if (ringing?.callId === c.callId) showIncoming(undefined);
      if (current?.callId === c.callId) teardown(endText[c.endReason] ?? "Call ended");
      else if (c.role === calls.Role.CALLEE && c.ring === calls.RingState.CANCELLED) notice("Missed call");
      return;
    }
    if (c.role === calls.Role.CALLEE) {
      if (c.ring === calls.RingState.RINGING && !current) showIncoming(c);
      else if (ringing?.callId === c.callId && c.ring !== calls.RingState.RINGING) {
        showIncoming(undefined);
        if (c.ring === calls.RingState.ANSWERED_ELSEWHERE) notice("Answered on another device");
        if (c.ring === calls.RingState.DECLINED_ELSEWHERE) notice("Declined on another device");
      }
    }
    if (current?.callId === c.callId && c.state === calls.CallState.ACTIVE) {
      current.remoteLeg ||= otherLeg(c);
      if (current.role === "caller" && !current.started) {
        showCall(`Connecting to ${current.peerName}…`);
        void startMedia(current).catch((e) => notice(`Media failed: ${e}`));
      }
    }
  };

  $("answer").onclick = async () => {
    const r = ringing;
    if (!r) return;
    showIncoming(undefined);
    // Ready for the caller's offer before Answer returns: the answer
    // reaches the caller's stream as soon as it is stored, and its offer
    // can come back before this call's own response (signals for a call
    // that is not current are dropped; for the current one, queued).
    const c = begin(r.callId, "callee", nameOf(r.peer), r.video, otherLeg(r));
    current = c;
    try {
      const answered = await spine.calls.answer({ callId: r.callId });
      if (current !== c) return; // ended meanwhile
      if (!c.remoteLeg) c.remoteLeg = otherLeg(answered);
      showCall(`Connecting to ${c.peerName}…`);
      await startMedia(c);
    } catch (e) {
      if (current === c) {
        current = undefined;
        demo.current = undefined;
      }
      notice(`Could not answer: ${SpineError.from(e).message}`);
    }
  };
  $("decline").onclick = async () => {
    const r = ringing;
    if (!r) return;
    showIncoming(undefined);
    await spine.calls.decline({ callId: r.callId }).catch(() => undefined);
  };
  $("hangup").onclick = async () => {
    const c = current;
    if (!c) return;
    teardown("Call ended");
    demo.hangingUp = spine.calls.hangUp({ callId: c.callId }).catch(() => undefined);
    await demo.hangingUp;
  };

  for (const { entry, li } of contacts) {
    li.querySelector<HTMLButtonElement>(".call")!.onclick = async () => {
      if (current) return;
      notice("");
      try {
        const c = await spine.calls.startCall({
          requestId: crypto.randomUUID(),
          callee: { peer: entry.peer },
          video: true,
          callerHandle: entry.callerHandle,
        });
        if (c.state === calls.CallState.ENDED) {
          notice(endText[c.endReason] ?? "Call ended");
          return;
        }
        current = begin(c.callId, "caller", entry.name, true, "");
        showCall(`Calling ${entry.name}…`);
        changed(c);
      } catch (e) {
        const err = SpineError.from(e);
        // The same words whatever rule refused: nothing about the callee
        // leaks, not even whether they exist.
        if (err.code === Code.FailedPrecondition && err.reason === "CALL_NOT_PLACED") {
          notice(`${entry.name} is unavailable`);
        } else notice(`Call failed: ${err.codeName}`);
      }
    };
  }

  return {
    synced(live: calls.Call[]) {
      const ring = live.find((c) => c.role === calls.Role.CALLEE && c.ring === calls.RingState.RINGING);
      if (ringing && !live.some((c) => c.callId === ringing!.callId && c.ring === calls.RingState.RINGING)) showIncoming(undefined);
      if (ring && !current) showIncoming(ring);
      if (current && !live.some((c) => c.callId === current!.callId)) teardown("Call ended");
      for (const c of live) if (current?.callId === c.callId) changed(c);
    },
    changed,
    signal: onSignal,
  };
}

async function settingsPanel(spine: Spine) {
  const s = await spine.identity.getSettings({});
  const who = $<HTMLSelectElement>("who-can-call");
  const video = $<HTMLInputElement>("video-enabled");
  const dnd = $<HTMLInputElement>("dnd");
  who.value = String(s.whoCanCall);
  video.checked = s.videoCallingEnabled;
  dnd.checked = s.doNotDisturb?.enabled ?? false;
  $("save-settings").onclick = async () => {
    $("settings-saved").textContent = "";
    try {
      await spine.identity.updateSettings({
        settings: {
          whoCanCall: Number(who.value) as identity.WhoCanCall,
          videoCallingEnabled: video.checked,
          doNotDisturb: { enabled: dnd.checked },
        },
        updateMask: { paths: ["who_can_call", "video_calling_enabled", "do_not_disturb"] },
      });
      $("settings-saved").textContent = "Saved";
    } catch (e) {
      $("settings-saved").textContent = `Not saved: ${SpineError.from(e).message}`;
    }
  };
}

function reportPanel(spine: Spine) {
  $("show-report").onclick = async () => {
    const r = await spine.identity.getDataReport({});
    $("report-json").textContent = JSON.stringify(toJson(common.DataReportSchema, r), null, 2);
  };
}

main().catch((e) => {
  notice(`The demo could not start: ${e}`);
  console.error(e);
});
