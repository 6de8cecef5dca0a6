//! Property-based fuzzing of every public method through the real server
//! stack (transport, codec, auth, handler): each method of each service in
//! the descriptor set gets random request bytes and protobuf-shaped junk
//! (well-formed tags with random field numbers, wire types and values, ids
//! of the right shape, nested messages), sent with a credential of a role
//! allowed to call it. Nothing may answer INTERNAL or UNKNOWN (a decoder or
//! handler that trusted its input), and the node must keep serving.
//!
//! CI runs 24 cases per method; the long run is
//! `PROPTEST_CASES=2000 cargo test -p spine --test fuzz_requests`
//! (docs/testing.md).

mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;
use spine_proto::identity::v1::identity_client::IdentityClient;
use support::{Role, allowed, call_raw, req};
use tonic::Code;

/// One protobuf field of junk.
#[derive(Debug, Clone)]
enum Field {
    Varint(u32, u64),
    Fixed64(u32, u64),
    Fixed32(u32, u32),
    Bytes(u32, Vec<u8>),
    /// A group start or end tag, or a wire type that does not exist.
    Odd(u32, u8),
}

fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    let tag =
        |out: &mut Vec<u8>, n: u32, wt: u8| prost::encoding::encode_varint(u64::from(n << 3 | u32::from(wt)), out);
    for f in fields {
        match f {
            Field::Varint(n, v) => {
                tag(&mut out, *n, 0);
                prost::encoding::encode_varint(*v, &mut out);
            }
            Field::Fixed64(n, v) => {
                tag(&mut out, *n, 1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Field::Fixed32(n, v) => {
                tag(&mut out, *n, 5);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Field::Bytes(n, b) => {
                tag(&mut out, *n, 2);
                prost::encoding::encode_varint(b.len() as u64, &mut out);
                out.extend_from_slice(b);
            }
            Field::Odd(n, wt) => tag(&mut out, *n, *wt),
        }
    }
    out
}

/// Values a handler may parse further: ids of every kind, names, MLS-ish
/// and base64-ish bytes, huge lengths.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..48),
        "(tn|ac|dv|tc|ih|sk|op|cl|lg)_[a-z2-7]{26}".prop_map(String::into_bytes),
        "[ -~]{0,40}".prop_map(String::into_bytes),
        "\\PC{0,20}".prop_map(String::into_bytes),
        Just(b"\x00\x01\x00\x01".to_vec()),
        Just(vec![0xff; 9]),
    ]
}

fn field() -> impl Strategy<Value = Field> {
    let n = prop_oneof![1u32..=12, 13u32..=1000, Just(536_870_911u32)];
    prop_oneof![
        (n.clone(), any::<u64>()).prop_map(|(n, v)| Field::Varint(n, v)),
        (n.clone(), prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()])
            .prop_map(|(n, v)| Field::Varint(n, v)),
        (n.clone(), any::<u64>()).prop_map(|(n, v)| Field::Fixed64(n, v)),
        (n.clone(), any::<u32>()).prop_map(|(n, v)| Field::Fixed32(n, v)),
        (n.clone(), payload()).prop_map(|(n, b)| Field::Bytes(n, b)),
        (n.clone(), proptest::collection::vec((1u32..=8, payload()), 0..4)).prop_map(|(n, inner)| Field::Bytes(
            n,
            encode(&inner.into_iter().map(|(k, b)| Field::Bytes(k, b)).collect::<Vec<_>>())
        )),
        (n, prop_oneof![Just(3u8), Just(4), Just(6), Just(7)]).prop_map(|(n, wt)| Field::Odd(n, wt)),
    ]
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(field(), 0..8).prop_map(|f| encode(&f)),
        1 => proptest::collection::vec(any::<u8>(), 0..256),
        // A valid message cut short, or with a length running past the end.
        1 => (proptest::collection::vec(field(), 1..6), any::<usize>()).prop_map(|(f, cut)| {
            let b = encode(&f);
            b[..cut % b.len().max(1)].to_vec()
        }),
    ]
}

#[test]
fn random_requests_to_every_method_never_internal() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (server, ch, creds) = rt.block_on(async {
        let (server, ch, operator) = support::in_process_node().await;
        let (_, tenant) = support::tenant(&ch, &operator, "fuzz").await;
        let media = spine_proto::calls::v1::media_nodes_client::MediaNodesClient::new(ch.clone())
            .issue_media_node_credential(req(
                spine_proto::calls::v1::IssueMediaNodeCredentialRequest {
                    request_id: "m".into(),
                    node_id: "sfu-1".into(),
                    label: String::new(),
                },
                &operator,
            ))
            .await
            .unwrap()
            .into_inner()
            .secret;
        (server, ch, (operator, tenant, media))
    });
    let (operator, tenant, media) = creds;
    // A device token for each method: junk may decode into a request that
    // deletes or revokes the caller, which must not blind later methods.
    let device = |tenant: &str| {
        let (mut id, tenant) = (IdentityClient::new(ch.clone()), tenant.to_string());
        async move { support::device(&mut id, &tenant).await.2 }
    };

    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let fds = prost_types::FileDescriptorSet::decode(spine_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut methods = 0;
    let mut answers: std::collections::BTreeMap<String, usize> = Default::default();
    for file in fds.file.iter().filter(|f| f.package().starts_with("spine.")) {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            for m in &service.method {
                let path = format!("/{full}/{}", m.name());
                let streaming = (m.client_streaming(), m.server_streaming());
                let cred = match allowed(&full, m.name())[0] {
                    Role::Operator => operator.clone(),
                    Role::Tenant => tenant.clone(),
                    Role::Device => rt.block_on(device(&tenant)),
                    Role::MediaNode => media.clone(),
                };
                let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
                let seen = std::sync::Mutex::new(Vec::new());
                let result = runner.run(&request(), |body| {
                    let code = rt.block_on(async {
                        tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            call_raw(&ch, &path, streaming, &cred, Some(body.clone())),
                        )
                        .await
                        .unwrap_or(Code::DeadlineExceeded)
                    });
                    seen.lock().unwrap().push(code);
                    if matches!(code, Code::Internal | Code::Unknown | Code::DeadlineExceeded | Code::Unimplemented) {
                        return Err(TestCaseError::fail(format!("{path} answered {code:?} to {body:02x?}")));
                    }
                    Ok(())
                });
                if let Err(e) = result {
                    panic!("{e}");
                }
                for c in seen.into_inner().unwrap() {
                    *answers.entry(format!("{c:?}")).or_default() += 1;
                }
                methods += 1;
            }
        }
    }
    assert!(methods >= 60, "only {methods} methods fuzzed");
    println!("{methods} methods x {cases} requests: {answers:?}");
    // Still serving.
    rt.block_on(async {
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let r = h.check(tonic_health::pb::HealthCheckRequest { service: "readiness".into() }).await.unwrap();
        assert_eq!(r.into_inner().status, 1);
        server.stop().await.unwrap();
    });
}
