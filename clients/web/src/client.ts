// One place a web app talks to Spine from: the four services' clients over
// gRPC-Web, every call carrying a device token from the app's own hook, and
// failures as SpineError.
import { ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { Identity, TenantAdmin } from "./gen/spine/identity/v1/identity_pb.js";
import { Presence } from "./gen/spine/presence/v1/presence_pb.js";
import { Calls } from "./gen/spine/calls/v1/calls_pb.js";
import { Groups } from "./gen/spine/groups/v1/groups_pb.js";
import { SpineError, Code } from "./errors.js";

/** Where a device token comes from: the app's own server, which issues
 *  them (`Identity.IssueDeviceToken` with its tenant credential). Called
 *  before the first call, and again with `refresh: true` when Spine says
 *  the token is no longer valid (expired): return a fresh one. */
export type TokenSource = (opts: { refresh: boolean }) => Promise<string>;

export interface SpineOptions {
  /** A Spine node's URL (`https://spine.example`), reachable from the page's
   *  origin (which must be in the node's `web.allowed_origins`). */
  baseUrl: string;
  token: TokenSource;
  /** Override fetch (tests, or `credentials` options). */
  fetch?: typeof globalThis.fetch;
}

export interface Spine {
  identity: Client<typeof Identity>;
  presence: Client<typeof Presence>;
  calls: Client<typeof Calls>;
  groups: Client<typeof Groups>;
  /** Operators only (an operator credential as the token): tenants and
   *  signing keys. Product frontends never need it. */
  tenantAdmin: Client<typeof TenantAdmin>;
  /** The current token (fetching one if there is none yet). */
  currentToken(): Promise<string>;
  /** Drops the current token: the next call asks the source for a fresh one. */
  refreshToken(): Promise<string>;
}

export function createSpine(opts: SpineOptions): Spine {
  let token: Promise<string> | undefined;
  const current = () => (token ??= opts.token({ refresh: false }));
  const refresh = () => {
    token = opts.token({ refresh: true });
    return token;
  };

  // Every call carries the token; a unary call refused with UNAUTHENTICATED
  // gets one fresh token and one retry (streams are reopened by their
  // owners, keepStreaming, which refresh the same way).
  const auth: Interceptor = (next) => async (req) => {
    req.header.set("authorization", `Bearer ${await current()}`);
    try {
      return await next(req);
    } catch (e) {
      const code = ConnectError.from(e).code;
      if (code !== Code.Unauthenticated || req.stream || req.method.methodKind !== "unary") throw e;
      req.header.set("authorization", `Bearer ${await refresh()}`);
      return await next(req);
    }
  };

  const transport = createGrpcWebTransport({
    baseUrl: opts.baseUrl,
    interceptors: [auth],
    ...(opts.fetch ? { fetch: opts.fetch } : {}),
  });
  return {
    identity: typed(createClient(Identity, transport)),
    presence: typed(createClient(Presence, transport)),
    calls: typed(createClient(Calls, transport)),
    groups: typed(createClient(Groups, transport)),
    tenantAdmin: typed(createClient(TenantAdmin, transport)),
    currentToken: current,
    refreshToken: refresh,
  };
}

/** A client whose calls fail with SpineError (connect's own errors,
 *  converted once, outside every interceptor). */
function typed<T extends object>(client: T): T {
  return new Proxy(client, {
    get(target, prop, receiver) {
      const f = Reflect.get(target, prop, receiver);
      if (typeof f !== "function") return f;
      return (...args: unknown[]) => {
        const r = f.apply(target, args);
        if (r instanceof Promise) return r.catch((e: unknown) => Promise.reject(SpineError.from(e)));
        if (r && typeof r[Symbol.asyncIterator] === "function") return typedIterable(r as AsyncIterable<unknown>);
        return r;
      };
    },
  });
}

async function* typedIterable<M>(inner: AsyncIterable<M>): AsyncIterable<M> {
  try {
    yield* inner;
  } catch (e) {
    throw SpineError.from(e);
  }
}
