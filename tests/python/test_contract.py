"""The public contract, from Python: grpcio with stubs generated from proto/
talks to a running `spine dev`. Frontends are not all Rust."""

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status


def auth(cred):
    return (("authorization", f"Bearer {cred}"),)


def test_health_reports_liveness_and_readiness(spine):
    addr, _ = spine
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(addr))
    for service in ("liveness", "readiness", "", "spine.identity.v1.Identity", "spine.identity.v1.TenantAdmin", "spine.groups.v1.Groups", "spine.presence.v1.Presence", "spine.calls.v1.Calls", "spine.calls.v1.CallRecords", "spine.calls.v1.MediaNodes"):
        r = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert r.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_spine_services(spine):
    addr, _ = spine
    db = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(addr))
    services = set(db.get_services())
    assert {"spine.identity.v1.Identity", "spine.identity.v1.TenantAdmin", "spine.groups.v1.Groups", "spine.calls.v1.Calls", "grpc.health.v1.Health"} <= services
    # Full descriptors come back too, so dynamic clients can call methods.
    fd = db.FindFileContainingSymbol("spine.identity.v1.Identity")
    assert fd.package == "spine.identity.v1"


def test_tenant_account_device_and_token(spine, pb):
    addr, operator = spine
    channel = grpc.insecure_channel(addr)
    admin = pb.identity_grpc.TenantAdminStub(channel)
    identity = pb.identity_grpc.IdentityStub(channel)
    I = pb.identity

    created = admin.CreateTenant(I.CreateTenantRequest(request_id="py-tenant", display_name="python app"), metadata=auth(operator))
    tenant_cred = created.credential.secret
    assert created.tenant.tenant_id.startswith("tn_") and tenant_cred.startswith("tc_")
    # A retry with the same idempotency key gets the same tenant and
    # credential id, but never the secret again (it is not stored).
    again = admin.CreateTenant(I.CreateTenantRequest(request_id="py-tenant", display_name="python app"), metadata=auth(operator))
    assert again.tenant.tenant_id == created.tenant.tenant_id
    assert again.credential.credential_id == created.credential.credential_id and again.credential.secret == ""
    # The tenant issues its next credential itself; operators cannot.
    issued = identity.IssueTenantCredential(I.IssueTenantCredentialRequest(request_id="py-cred", label="rotation"), metadata=auth(tenant_cred))
    assert issued.secret.startswith(issued.credential_id + ".")
    with pytest.raises(grpc.RpcError) as e:
        identity.IssueTenantCredential(I.IssueTenantCredentialRequest(request_id="py-cred-op"), metadata=auth(operator))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    events = identity.ListAuditEvents(I.ListAuditEventsRequest(), metadata=auth(tenant_cred)).events
    assert [ev.action for ev in events] == [I.AUDIT_ACTION_TENANT_CREATED, I.AUDIT_ACTION_CREDENTIAL_ISSUED]

    account = identity.CreateAccount(I.CreateAccountRequest(request_id="py-acct"), metadata=auth(tenant_cred))
    key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    device = identity.RegisterDevice(
        I.RegisterDeviceRequest(
            request_id="py-dev",
            account_id=account.account_id,
            signature_scheme=I.SIGNATURE_SCHEME_ED25519,
            signature_public_key=key,
        ),
        metadata=auth(tenant_cred),
    )
    assert device.signature_public_key == key
    token = identity.IssueDeviceToken(
        I.IssueDeviceTokenRequest(account_id=account.account_id, device_id=device.device_id), metadata=auth(tenant_cred)
    ).token

    # The device acts on its own account with its token.
    me = identity.GetAccount(I.GetAccountRequest(), metadata=auth(token))
    assert me.account_id == account.account_id
    settings = identity.UpdateSettings(
        I.UpdateSettingsRequest(
            settings=I.PrivacySettings(who_can_call=I.WHO_CAN_CALL_NOBODY),
            update_mask=field_mask_pb2.FieldMask(paths=["who_can_call"]),
        ),
        metadata=auth(token),
    )
    assert settings.who_can_call == I.WHO_CAN_CALL_NOBODY
    report = identity.GetDataReport(I.GetDataReportRequest(), metadata=auth(token))
    kinds = {i.kind for s in report.sections for i in s.items}
    assert {"account", "device", "settings", "key_package", "mailbox_entry", "group_membership"} <= kinds

    # The device reaches the MLS delivery service with the same token.
    groups = pb.groups_grpc.GroupsStub(channel)
    info = groups.GetServiceInfo(pb.groups.GetServiceInfoRequest(), metadata=auth(token))
    assert info.ciphersuite == 1 and len(info.external_sender_signature_key) == 32
    count = groups.CountKeyPackages(pb.groups.CountKeyPackagesRequest(), metadata=auth(token))
    assert count.remaining == 0 and not count.has_last_resort
    try:
        groups.UploadKeyPackages(pb.groups.UploadKeyPackagesRequest(key_packages=[b"not mls"]), metadata=auth(token))
        raise AssertionError("garbage key package accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_errors_have_precise_codes_and_details(spine, pb):
    addr, operator = spine
    channel = grpc.insecure_channel(addr)
    admin = pb.identity_grpc.TenantAdminStub(channel)
    identity = pb.identity_grpc.IdentityStub(channel)
    I = pb.identity
    a = admin.CreateTenant(I.CreateTenantRequest(request_id="py-a", display_name="a"), metadata=auth(operator)).credential.secret
    b = admin.CreateTenant(I.CreateTenantRequest(request_id="py-b", display_name="b"), metadata=auth(operator)).credential.secret
    acct = identity.CreateAccount(I.CreateAccountRequest(request_id="x"), metadata=auth(a)).account_id

    def code_of(call):
        try:
            call()
        except grpc.RpcError as e:
            return e
        raise AssertionError("call succeeded")

    # No or bad credentials.
    assert code_of(lambda: identity.GetAccount(I.GetAccountRequest(account_id=acct))).code() == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: identity.GetAccount(I.GetAccountRequest(account_id=acct), metadata=auth("sdt1.x.y.z"))).code() == grpc.StatusCode.UNAUTHENTICATED
    # Another tenant's account does not exist for you.
    assert code_of(lambda: identity.GetAccount(I.GetAccountRequest(account_id=acct), metadata=auth(b))).code() == grpc.StatusCode.NOT_FOUND
    # Bad input names the field, as a google.rpc.BadRequest detail.
    err = code_of(lambda: identity.CreateAccount(I.CreateAccountRequest(request_id="no/slashes"), metadata=auth(a)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err)
    assert status is not None and any(d.type_url.endswith("google.rpc.BadRequest") for d in status.details)
