//! Groups leaks nothing into logs (no account, device or group id, token or
//! MLS bytes), and a draining node tells mailbox streams to reconnect.

mod support;

use std::time::Duration;

use futures::StreamExt;
use spine_proto::groups::v1 as pb;
use spine_runtime::config::Backend;
use spine_testing::req;
use support::*;

#[tokio::test]
async fn logs_carry_no_identifiers_and_streams_end_on_drain() {
    let capture = spine_testing::LogCapture::install(
        "debug,spine_runtime=trace,spine_groups=trace,spine_identity=trace,h2=info,hyper=info,tower=info",
    );

    let env = start(Backend::Embedded).await;
    let t = env.tenant("t").await;
    let a = env.account(&t).await;
    let b = env.account(&t).await;
    let mut alice = member(&env, &t, &a).await;
    let mut bob = member(&env, &t, &b).await;
    let_anyone_add(&env, &t, &b).await;
    bob.upload(&env, 2).await;
    let gid = b"private-group-id".to_vec();
    create_group(&env, &mut alice, &gid, vec![t.id.clone()]).await;
    let kps = claim(&env, &alice.token, vec![by_account(&bob.account)]).await;
    let add = alice.act(|c, g| c.add(g, &kps)).unwrap();
    alice.send_commit(&env, &add).await.unwrap();
    alice.act(|c, g| c.merge_pending(g)).unwrap();
    let welcome = bob.receive(&env, 1).await.remove(0);
    bob.group = Some(bob.client.join(&welcome.message).unwrap());
    let msg = alice.act(|c, g| c.send(g, b"secret words")).unwrap();
    alice
        .groups(&env)
        .send_application(req(pb::SendApplicationRequest { group_id: gid.clone(), message: msg.clone() }, &alice.token))
        .await
        .unwrap();
    bob.receive(&env, 1).await;
    let _ = bob.groups(&env).get_group(req(pb::GetGroupRequest { group_id: gid.clone() }, "sdt1.forged.x.y")).await;

    // Drain: an open mailbox stream ends with UNAVAILABLE, so the device
    // reconnects to another node and resumes from its next sequence number.
    let mut stream = bob
        .groups(&env)
        .receive(req(pb::ReceiveRequest { from_seq: bob.next_seq, ..Default::default() }, &bob.token))
        .await
        .unwrap()
        .into_inner();
    let server = env.server;
    let stopping = tokio::spawn(server.stop());
    let end =
        tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("stream ended").expect("an item");
    let status = end.expect_err("a status, not an entry");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("reconnect"));
    stopping.await.unwrap().unwrap();

    let logs = capture.contents();
    assert!(logs.contains("commit accepted"), "nothing logged: the check would prove nothing");
    let b64 = |v: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, v);
    for (what, needle) in [
        ("account id", alice.account.clone()),
        ("device id", bob.device.clone()),
        ("alice token", alice.token.clone()),
        ("group id (hex)", hex::encode(&gid)),
        ("group id (text)", "private-group-id".to_string()),
        ("application message", b64(&msg)),
        ("plaintext", "secret words".to_string()),
    ] {
        assert!(!logs.contains(&needle), "{what} appears in the logs");
    }
}
