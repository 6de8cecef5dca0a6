// Typed errors: every failed call becomes a SpineError carrying the gRPC
// code and, when Spine sent one, the ErrorInfo reason (docs/api.md lists
// them), its metadata, and the RetryInfo delay.
import { Code, ConnectError } from "@connectrpc/connect";
import { BinaryReader } from "@bufbuild/protobuf/wire";

export { Code };

/** A failed Spine call: every call of a client made by createSpine fails
 *  with one (it is a ConnectError too). `reason` is Spine's
 *  machine-readable reason (for example `CALL_NOT_PLACED`, `RATE_LIMITED`,
 *  `TOKEN_EXPIRED`), or "" when the error has none. Branch on `code` and
 *  `reason`, never on `message`. */
export class SpineError extends ConnectError {
  override readonly name = "SpineError";
  constructor(
    code: Code,
    message: string,
    readonly reason: string,
    /** The ErrorInfo's metadata (for RATE_LIMITED: `limit`, `retry_after_ms`). */
    readonly info: Readonly<Record<string, string>>,
    /** How long to wait before retrying, when the server said. */
    readonly retryAfterMs: number | undefined,
    cause?: ConnectError,
  ) {
    super(message, code, cause?.metadata, undefined, cause);
    this.details = cause?.details ?? [];
  }

  /** The code's name, as in the gRPC spec (`NOT_FOUND`). */
  get codeName(): string {
    return Code[this.code]
      .replace(/([a-z])([A-Z])/g, "$1_$2")
      .toUpperCase();
  }

  /** Whether retrying (after `retryAfterMs`, with backoff) can help. */
  get retryable(): boolean {
    return this.code === Code.Unavailable || (this.code === Code.ResourceExhausted && this.reason === "RATE_LIMITED");
  }

  // ConnectError's instanceof accepts any ConnectError; this one only
  // SpineErrors.
  static override [Symbol.hasInstance](v: unknown): boolean {
    return typeof v === "object" && v !== null && SpineError.prototype.isPrototypeOf(v);
  }

  /** Any thrown value as a SpineError. */
  static override from(e: unknown): SpineError {
    if (e instanceof SpineError) return e;
    const ce = ConnectError.from(e);
    let reason = "";
    let info: Record<string, string> = {};
    let retryAfterMs: number | undefined;
    for (const d of ce.details) {
      if (!("type" in d) || !(d.value instanceof Uint8Array)) continue;
      if (d.type === "google.rpc.ErrorInfo") {
        const decoded = decodeErrorInfo(d.value);
        if (decoded.domain === "spine") {
          reason = decoded.reason;
          info = decoded.metadata;
        }
      } else if (d.type === "google.rpc.RetryInfo") {
        retryAfterMs = decodeRetryInfo(d.value);
      }
    }
    return new SpineError(ce.code, ce.rawMessage, reason, info, retryAfterMs, ce);
  }
}

// google.rpc.ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
function decodeErrorInfo(bytes: Uint8Array): { reason: string; domain: string; metadata: Record<string, string> } {
  const r = new BinaryReader(bytes);
  const out = { reason: "", domain: "", metadata: {} as Record<string, string> };
  while (r.pos < r.len) {
    const [field, wire] = r.tag();
    if (field === 1) out.reason = r.string();
    else if (field === 2) out.domain = r.string();
    else if (field === 3) {
      const entry = new BinaryReader(r.bytes());
      let k = "";
      let v = "";
      while (entry.pos < entry.len) {
        const [f, w] = entry.tag();
        if (f === 1) k = entry.string();
        else if (f === 2) v = entry.string();
        else entry.skip(w);
      }
      out.metadata[k] = v;
    } else r.skip(wire);
  }
  return out;
}

// google.rpc.RetryInfo { google.protobuf.Duration retry_delay = 1; }
function decodeRetryInfo(bytes: Uint8Array): number | undefined {
  const r = new BinaryReader(bytes);
  while (r.pos < r.len) {
    const [field, wire] = r.tag();
    if (field !== 1) {
      r.skip(wire);
      continue;
    }
    const d = new BinaryReader(r.bytes());
    let seconds = 0;
    let nanos = 0;
    while (d.pos < d.len) {
      const [f, w] = d.tag();
      if (f === 1) seconds = Number(d.int64());
      else if (f === 2) nanos = d.int32();
      else d.skip(w);
    }
    return seconds * 1000 + Math.round(nanos / 1e6);
  }
  return undefined;
}
