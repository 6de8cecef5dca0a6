"""A one-to-one call from Python: two devices hold bidirectional signalling
streams (grpcio), one calls, the other rings, an opaque offer is relayed,
the callee answers and hangs up; a refused call says only that it could not
be placed."""

import queue
import threading

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf import field_mask_pb2
from grpc_status import rpc_status


def auth(cred):
    return (("authorization", f"Bearer {cred}"),)


def device(identity, I, tenant_cred, name):
    account = identity.CreateAccount(I.CreateAccountRequest(request_id=f"acct-{name}"), metadata=auth(tenant_cred))
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    dev = identity.RegisterDevice(
        I.RegisterDeviceRequest(
            request_id=f"dev-{name}",
            account_id=account.account_id,
            signature_scheme=I.SIGNATURE_SCHEME_ED25519,
            signature_public_key=key,
        ),
        metadata=auth(tenant_cred),
    )
    token = identity.IssueDeviceToken(
        I.IssueDeviceTokenRequest(account_id=account.account_id, device_id=dev.device_id), metadata=auth(tenant_cred)
    ).token
    return account.account_id, token


class Session:
    """A signalling stream: messages to send go in `out`; events arrive in `events`."""

    def __init__(self, stub, token):
        self.out = queue.Queue()
        self.events = queue.Queue()

        def requests():
            while True:
                m = self.out.get()
                if m is None:
                    return
                yield m

        self.call = stub.Session(requests(), metadata=auth(token))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for e in self.call:
                self.events.put(e)
        except grpc.RpcError as e:
            self.events.put(e)

    def next(self, kind, pred=lambda _: True):
        while True:
            e = self.events.get(timeout=15)
            assert not isinstance(e, grpc.RpcError), e
            if e.WhichOneof("event") == kind and pred(getattr(e, kind)):
                return getattr(e, kind)

    def close(self):
        self.out.put(None)
        self.call.cancel()


def test_one_to_one_call_over_streams(spine, pb):
    addr, operator = spine
    channel = grpc.insecure_channel(addr)
    I, C, common = pb.identity, pb.calls, pb.common
    admin = pb.identity_grpc.TenantAdminStub(channel)
    identity = pb.identity_grpc.IdentityStub(channel)
    calls = pb.calls_grpc.CallsStub(channel)
    tenant = admin.CreateTenant(I.CreateTenantRequest(request_id="py-calls", display_name="calls app"), metadata=auth(operator))
    cred = tenant.credential.secret
    alice_acct, alice = device(identity, I, cred, "alice")
    bob_acct, bob = device(identity, I, cred, "bob")

    a = Session(calls, alice)
    b = Session(calls, bob)
    assert len(a.next("synced").calls) == 0 and len(b.next("synced").calls) == 0

    start = lambda: calls.StartCall(
        C.StartCallRequest(request_id="py-call", callee=common.PeerRef(account_id=bob_acct), video=True),
        metadata=auth(alice),
    )
    # Bob takes calls from contacts only (the default): refused, and the
    # refusal does not say why.
    try:
        start()
        raise AssertionError("the call must not be placed")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        status = rpc_status.from_call(e)
        assert status.message == "the call could not be placed"
        assert "CALL_NOT_PLACED" in str(status.details)

    identity.UpdateSettings(
        I.UpdateSettingsRequest(
            account_id=bob_acct,
            settings=I.PrivacySettings(who_can_call=I.WHO_CAN_CALL_EVERYONE),
            update_mask=field_mask_pb2.FieldMask(paths=["who_can_call"]),
        ),
        metadata=auth(cred),
    )
    call = start()
    assert call.state == C.CALL_STATE_RINGING and call.role == C.ROLE_CALLER
    ringing = b.next("call", lambda c: c.call_id == call.call_id)
    assert ringing.ring == C.RING_STATE_RINGING and ringing.video and ringing.peer.account_id == alice_acct

    # An opaque offer on the stream reaches the ringing device (ringing
    # devices are not counted in `delivered`: a caller cannot count them).
    a.out.put(C.ClientMessage(ref=7, signal=C.SignalRequest(call_id=call.call_id, payload=b"\x00opaque sdp")))
    result = a.next("signal_result", lambda r: r.ref == 7)
    assert (result.code, result.delivered) == (0, 0)
    assert b.next("signal").payload == b"\x00opaque sdp"

    answered = calls.Answer(C.AnswerRequest(call_id=call.call_id), metadata=auth(bob))
    assert answered.state == C.CALL_STATE_ACTIVE and answered.ring == C.RING_STATE_ANSWERED_HERE
    assert a.next("call", lambda c: c.state == C.CALL_STATE_ACTIVE).call_id == call.call_id

    calls.HangUp(C.HangUpRequest(call_id=call.call_id), metadata=auth(bob))
    ended = a.next("call", lambda c: c.state == C.CALL_STATE_ENDED)
    assert ended.end_reason == C.END_REASON_HUNG_UP

    # Bad input: an unknown call, an oversized payload.
    try:
        calls.GetCall(C.GetCallRequest(call_id=call.call_id), metadata=auth(alice))
        raise AssertionError("ended calls are not kept")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    a.out.put(C.ClientMessage(ref=8, signal=C.SignalRequest(call_id=call.call_id, payload=b"x" * (64 * 1024 + 1))))
    assert a.next("signal_result", lambda r: r.ref == 8).code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    a.close()
    b.close()
