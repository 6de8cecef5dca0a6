// @spine/web: Spine for browsers. Generated messages and services from
// proto/ (protobuf-es), called over gRPC-Web (connect-web), with a token
// hook, kept-open streams and typed errors. See clients/web/README.md.
export { createSpine, type Spine, type SpineOptions, type TokenSource } from "./client.js";
export { SpineError, Code } from "./errors.js";
export {
  keepStreaming,
  openCallEvents,
  watchPresence,
  backoffDelay,
  afterError,
  DEFAULT_BACKOFF,
  type Backoff,
  type CallEventHandlers,
  type KeptStream,
  type KeepOptions,
  type StreamState,
} from "./stream.js";
export * as identity from "./gen/spine/identity/v1/identity_pb.js";
export * as presence from "./gen/spine/presence/v1/presence_pb.js";
export * as calls from "./gen/spine/calls/v1/calls_pb.js";
export * as groups from "./gen/spine/groups/v1/groups_pb.js";
export * as common from "./gen/spine/common/v1/common_pb.js";
export { create, toBinary, fromBinary, toJson } from "@bufbuild/protobuf";
