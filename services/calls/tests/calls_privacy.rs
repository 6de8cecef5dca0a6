//! Nothing that names a person, a device or a call, and no payload, address,
//! token or TURN secret, in anything logged while calls run on two nodes,
//! at debug level for every crate and trace level for Spine's own.

mod support;

use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::call_records_client::CallRecordsClient;
use spine_runtime::config::Backend;
use spine_testing::req;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_no_identifiers_payloads_or_secrets() {
    let capture = spine_testing::LogCapture::install(
        "debug,spine_runtime=trace,spine_calls=trace,spine_identity=trace,h2=info,hyper=info,tower=info",
    );
    const TURN_SECRET: &str = "turn-secret-never-logged";
    let n = nodes(Backend::Embedded, 2, |_, c| {
        c.edit_section(|s: &mut spine_calls::CallsConfig| s.turn.secrets = vec![TURN_SECRET.into()]);
        c.edit_section(|s: &mut spine_calls::CallsConfig| s.turn.uris = vec!["turn:turn.example:3478".into()]);
    })
    .await;
    let t = n[0].tenant("messenger").await;
    let (a, b) = (n[0].account(&t).await, n[0].account(&t).await);
    everyone_can_call(&n[0], &t, &b).await;
    CallRecordsClient::new(n[0].channel.clone())
        .set_record_policy(req(
            pb::SetRecordPolicyRequest {
                fields: vec![pb::RecordField::Participants as i32, pb::RecordField::StartTime as i32],
                retention_seconds: 3600,
            },
            &t.cred,
        ))
        .await
        .unwrap();
    let mut alice = Phone::connect(&n[0], n[0].device_of(&t, &a).await).await;
    let mut bob = Phone::connect(&n[1], n[0].device_of(&t, &b).await).await;
    let call = alice.start(account_ref(&b), true).await.unwrap();
    bob.call_where(&call.call_id, |c| ring(c) == pb::RingState::Ringing).await;
    let sdp = b"a=candidate:1 1 udp 2122260223 203.0.113.77 54321 typ host".to_vec();
    assert_eq!(alice.send_signal(&call.call_id, "", sdp).await.code, 0);
    let answered = bob.answer(&call.call_id).await.unwrap();
    let turn = bob
        .calls()
        .get_turn_credentials(bob.req(pb::GetTurnCredentialsRequest { call_id: call.call_id.clone() }))
        .await
        .unwrap()
        .into_inner();
    // Refused and failing requests log too.
    let _ = alice.answer(&call.call_id).await;
    let _ = bob.start(account_ref(&a), false).await;
    bob.hang_up(&call.call_id).await.unwrap();
    alice.call_where(&call.call_id, |c| state(c) == pb::CallState::Ended).await;

    let logs = capture.contents();
    assert!(logs.contains("call changed"), "the flow logged nothing: the test would prove nothing");
    for (what, needle) in [
        ("account id", a.clone()),
        ("callee account id", b.clone()),
        ("device id", alice.dev.device.clone()),
        ("callee device id", bob.dev.device.clone()),
        ("call id", call.call_id.clone()),
        ("leg id", answered.your_leg_id.clone()),
        ("device token", alice.dev.token.clone()),
        ("payload", "203.0.113.77".to_string()),
        ("payload text", "candidate".to_string()),
        ("TURN user", turn.username.clone()),
        ("TURN password", turn.password.clone()),
        ("TURN secret", TURN_SECRET.to_string()),
        ("loopback address", "127.0.0.1:".to_string()),
    ] {
        assert!(!logs.contains(&needle), "{what} appears in the logs");
    }
    // Hashed call ids are there, so operators can still correlate.
    assert!(logs.contains(&n[0].rt.redact(&call.call_id)));
}
