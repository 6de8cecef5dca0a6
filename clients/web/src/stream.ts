// Server streams that stay open: the calls signalling stream (Events) and
// presence watches end for ordinary reasons (a node drains, the token
// expires, the network drops); these reopen them with backoff, refreshing
// the token when it expired, and stop for good only when reconnecting
// cannot help (the stream was replaced, the credential was revoked, the
// request is wrong).
import type { Spine } from "./client.js";
import { Code, SpineError } from "./errors.js";
import type { Call, IncomingSignal, ServerEvent } from "./gen/spine/calls/v1/calls_pb.js";
import type { PresenceUpdate, WatchRequestSchema } from "./gen/spine/presence/v1/presence_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";

export type StreamState = "connecting" | "open" | "reconnecting" | "closed";

export interface Backoff {
  /** First delay after a failure (ms). */
  initialMs: number;
  /** Longest delay (ms). */
  maxMs: number;
  /** Each failure in a row multiplies the delay by this. */
  multiplier: number;
  /** Random spread, as a fraction of the delay (0.2: ±20%). */
  jitter: number;
}

export const DEFAULT_BACKOFF: Backoff = { initialMs: 250, maxMs: 15_000, multiplier: 2, jitter: 0.2 };

/** The delay before attempt `n` (0-based) after failures in a row. */
export function backoffDelay(b: Backoff, n: number, random: () => number = Math.random): number {
  const base = Math.min(b.maxMs, b.initialMs * b.multiplier ** n);
  return Math.max(0, Math.round(base * (1 + b.jitter * (2 * random() - 1))));
}

/** What to do after a stream ended with `err`: stop, or reconnect (after
 *  how long, with a fresh token or not). */
export function afterError(err: SpineError): { stop: boolean; refresh: boolean; immediate: boolean } {
  switch (err.code) {
    case Code.Aborted:
      // SESSION_REPLACED: this device opened a newer stream elsewhere.
      return { stop: err.reason === "SESSION_REPLACED", refresh: false, immediate: false };
    case Code.Unauthenticated:
      // Expired: a fresh token and straight back. Revoked: never.
      return { stop: err.reason === "CREDENTIAL_REVOKED", refresh: true, immediate: err.reason === "TOKEN_EXPIRED" };
    case Code.Unavailable:
      // A draining node: straight to another one (the server's RetryInfo
      // delay applies).
      return { stop: false, refresh: false, immediate: err.reason === "NODE_DRAINING" };
    case Code.ResourceExhausted:
    case Code.Unknown:
    case Code.Internal:
    case Code.DeadlineExceeded:
    case Code.Canceled:
      return { stop: false, refresh: false, immediate: false };
    default:
      // INVALID_ARGUMENT, PERMISSION_DENIED, NOT_FOUND...: the same request
      // would fail the same way.
      return { stop: true, refresh: false, immediate: false };
  }
}

export interface KeptStream {
  close(): void;
  readonly state: StreamState;
  /** Resolves when the stream is closed for good (by close() or an error
   *  reconnecting cannot fix, which it carries). */
  readonly closed: Promise<SpineError | undefined>;
}

export interface KeepOptions {
  backoff?: Partial<Backoff>;
  onState?: (state: StreamState, error?: SpineError) => void;
}

/** Keeps a server stream open: `open` starts it; each message goes to
 *  `onMessage`. */
export function keepStreaming<T>(
  spine: Spine,
  open: (signal: AbortSignal) => AsyncIterable<T>,
  onMessage: (m: T) => void,
  opts: KeepOptions = {},
): KeptStream {
  const backoff = { ...DEFAULT_BACKOFF, ...opts.backoff };
  const abort = new AbortController();
  let state: StreamState = "connecting";
  const set = (s: StreamState, e?: SpineError) => {
    state = s;
    opts.onState?.(s, e);
  };
  const closed = (async (): Promise<SpineError | undefined> => {
    let failures = 0;
    while (!abort.signal.aborted) {
      let err: SpineError | undefined;
      try {
        set(failures === 0 ? "connecting" : "reconnecting");
        let first = true;
        for await (const m of open(abort.signal)) {
          if (first) {
            first = false;
            failures = 0;
            set("open");
          }
          onMessage(m);
        }
      } catch (e) {
        if (abort.signal.aborted) break;
        err = SpineError.from(e);
      }
      if (abort.signal.aborted) break;
      let delay: number;
      if (err) {
        const next = afterError(err);
        if (next.stop) {
          set("closed", err);
          return err;
        }
        if (next.refresh) await spine.refreshToken().catch(() => undefined);
        delay = next.immediate ? (err.retryAfterMs ?? 0) : Math.max(err.retryAfterMs ?? 0, backoffDelay(backoff, failures));
      } else {
        // The server ended the stream without an error: reopen.
        delay = backoffDelay(backoff, failures);
      }
      failures += 1;
      set("reconnecting", err);
      await sleep(delay, abort.signal);
    }
    set("closed");
    return undefined;
  })();
  return {
    close: () => abort.abort(),
    get state() {
      return state;
    },
    closed,
  };
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => (clearTimeout(t), resolve()), { once: true });
  });
}

export interface CallEventHandlers {
  /** Every live call of the account, first on each (re)connection: replace
   *  what you show with it. */
  onSynced?: (calls: Call[]) => void;
  /** A call changed. */
  onCall?: (call: Call) => void;
  /** A signalling payload from another device of a call. */
  onSignal?: (signal: IncomingSignal) => void;
}

/** The device's calls signalling stream (Calls.Events), kept open. */
export function openCallEvents(spine: Spine, handlers: CallEventHandlers, opts: KeepOptions = {}): KeptStream {
  return keepStreaming<ServerEvent>(
    spine,
    (signal) => spine.calls.events({}, { signal }),
    (ev) => {
      switch (ev.event.case) {
        case "synced":
          handlers.onSynced?.(ev.event.value.calls);
          break;
        case "call":
          handlers.onCall?.(ev.event.value);
          break;
        case "signal":
          handlers.onSignal?.(ev.event.value);
          break;
        default:
          break;
      }
    },
    opts,
  );
}

/** A presence watch, kept open: `onUpdate` gets the current state of every
 *  target first (again after each reconnection), then changes. */
export function watchPresence(
  spine: Spine,
  request: MessageInitShape<typeof WatchRequestSchema>,
  onUpdate: (u: PresenceUpdate) => void,
  opts: KeepOptions = {},
): KeptStream {
  return keepStreaming(spine, (signal) => spine.presence.watch(request, { signal }), onUpdate, opts);
}

