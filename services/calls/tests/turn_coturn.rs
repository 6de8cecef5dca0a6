//! TURN credentials against a real coturn (`use-auth-secret`), started on
//! loopback: an allocation with minted credentials succeeds, one with
//! expired, forged or unknown-secret credentials fails, and during a secret
//! rotation credentials of the old secret still work.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use spine_proto::calls::v1 as pb;
use spine_runtime::config::Backend;
use support::*;
use tokio::net::UdpSocket;

const REALM: &str = "spine.test";
const NEW: &str = "new-shared-secret-7f3a";
const OLD: &str = "old-shared-secret-91c2";

struct Coturn {
    child: Child,
    port: u16,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coturn() -> Coturn {
    let port = spine_testing::free_port();
    let child = Command::new("turnserver")
        .args([
            "-n",
            "--listening-ip=127.0.0.1",
            "--relay-ip=127.0.0.1",
            &format!("--listening-port={port}"),
            "--use-auth-secret",
            &format!("--static-auth-secret={NEW}"),
            &format!("--static-auth-secret={OLD}"),
            &format!("--realm={REALM}"),
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--no-tcp-relay",
            "--log-file=stdout",
            "--simple-log",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("coturn's turnserver is installed (scripts/setup installs it)");
    Coturn { child, port }
}

/// A STUN message: type, transaction id, attributes (with padding).
fn message(kind: u16, tid: &[u8; 12], attrs: &[(u16, Vec<u8>)], integrity_key: Option<&[u8]>) -> Vec<u8> {
    let mut body = Vec::new();
    for (t, v) in attrs {
        body.extend(t.to_be_bytes());
        body.extend((v.len() as u16).to_be_bytes());
        body.extend(v);
        body.resize(body.len().div_ceil(4) * 4, 0);
    }
    let header = |len: usize| {
        let mut h = Vec::new();
        h.extend(kind.to_be_bytes());
        h.extend((len as u16).to_be_bytes());
        h.extend(0x2112_A442u32.to_be_bytes());
        h.extend(tid);
        h
    };
    if let Some(key) = integrity_key {
        // MESSAGE-INTEGRITY covers the message with its length counting
        // the integrity attribute itself (RFC 5389, 15.4).
        let mut signed = header(body.len() + 24);
        signed.extend(&body);
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key).unwrap();
        mac.update(&signed);
        body.extend(0x0008u16.to_be_bytes());
        body.extend(20u16.to_be_bytes());
        body.extend(mac.finalize().into_bytes());
    }
    let mut m = header(body.len());
    m.extend(body);
    m
}

/// (message type, attributes)
fn parse(b: &[u8]) -> (u16, Vec<(u16, Vec<u8>)>) {
    let kind = u16::from_be_bytes([b[0], b[1]]);
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    let mut attrs = Vec::new();
    let mut i = 20;
    while i + 4 <= 20 + len {
        let t = u16::from_be_bytes([b[i], b[i + 1]]);
        let l = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        attrs.push((t, b[i + 4..i + 4 + l].to_vec()));
        i += 4 + l.div_ceil(4) * 4;
    }
    (kind, attrs)
}

fn attr(attrs: &[(u16, Vec<u8>)], t: u16) -> Option<Vec<u8>> {
    attrs.iter().find(|(k, _)| *k == t).map(|(_, v)| v.clone())
}

async fn exchange(sock: &UdpSocket, port: u16, msg: &[u8]) -> Option<Vec<u8>> {
    sock.send_to(msg, ("127.0.0.1", port)).await.unwrap();
    let mut buf = vec![0u8; 2048];
    match tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// A TURN Allocate with the long-term credential mechanism: the STUN
/// result code (0 for success, else the ERROR-CODE, e.g. 401).
async fn allocate(port: u16, username: &str, password: &str) -> u16 {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let transport = (0x0019u16, vec![17, 0, 0, 0]);
    let tid: [u8; 12] = rand::random();
    // The first, unauthenticated request learns the realm and a nonce.
    let mut first = None;
    for _ in 0..50 {
        if let Some(r) = exchange(&sock, port, &message(0x0003, &tid, std::slice::from_ref(&transport), None)).await {
            first = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (kind, attrs) = parse(&first.expect("coturn answers"));
    assert_eq!(kind, 0x0113, "an unauthenticated allocate is refused");
    let realm = attr(&attrs, 0x0014).unwrap();
    let nonce = attr(&attrs, 0x0015).unwrap();
    assert_eq!(realm, REALM.as_bytes());
    let key = Md5::digest(format!("{username}:{REALM}:{password}").as_bytes());
    let tid: [u8; 12] = rand::random();
    let msg = message(
        0x0003,
        &tid,
        &[transport, (0x0006, username.as_bytes().to_vec()), (0x0014, realm), (0x0015, nonce)],
        Some(&key),
    );
    let (kind, attrs) = parse(&exchange(&sock, port, &msg).await.expect("coturn answers"));
    match kind {
        0x0103 => 0,
        0x0113 => {
            let e = attr(&attrs, 0x0009).unwrap();
            u16::from(e[2] & 7) * 100 + u16::from(e[3])
        }
        other => panic!("unexpected STUN message type {other:#06x}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coturn_accepts_minted_credentials_only() {
    let turn = coturn();
    let uri = format!("turn:127.0.0.1:{}?transport=udp", turn.port);
    let n = nodes(Backend::Embedded, 1, |_, c| {
        c.edit_section(|s: &mut spine_calls::CallsConfig| s.turn.secrets = vec![NEW.into(), OLD.into()]);
        c.edit_section(|s: &mut spine_calls::CallsConfig| s.turn.uris = vec![uri.clone()]);
        c.edit_section(|s: &mut spine_calls::CallsConfig| s.turn.ttl_secs = 3600); // clamped to the 10-minute maximum
    })
    .await;
    let env = &n[0];
    let t = env.tenant("messenger").await;
    let (a, b) = (env.account(&t).await, env.account(&t).await);
    everyone_can_call(env, &t, &b).await;
    let alice = Phone::connect(env, env.device_of(&t, &a).await).await;
    let mut bob = Phone::connect(env, env.device_of(&t, &b).await).await;
    let call = alice.start(account_ref(&b), false).await.unwrap();
    bob.call_where(&call.call_id, |c| ring(c) == pb::RingState::Ringing).await;

    let creds = |p: &Phone| {
        let mut c = p.calls();
        let r = p.req(pb::GetTurnCredentialsRequest { call_id: call.call_id.clone() });
        async move { c.get_turn_credentials(r).await.unwrap().into_inner() }
    };
    let mine = creds(&alice).await;
    assert_eq!((mine.ttl_seconds, mine.uris.clone()), (600, vec![uri]));
    let (expiry, id) = mine.username.split_once(':').unwrap();
    assert!((expiry.parse::<i64>().unwrap() - spine_runtime::now_secs() - 600).abs() <= 2);
    for secret in [a.as_str(), b.as_str(), &alice.dev.device, &call.call_id] {
        assert!(!mine.username.contains(secret), "the TURN user names no account, device or call");
    }
    // Per call and device: Bob's ringing device gets its own id.
    let bobs = creds(&bob).await;
    assert_ne!(bobs.username.split_once(':').unwrap().1, id);

    assert_eq!(allocate(turn.port, &mine.username, &mine.password).await, 0, "minted credentials allocate");
    assert_eq!(allocate(turn.port, &bobs.username, &bobs.password).await, 0);
    // Forged: a password for another user name, or a tampered one.
    let (forged_user, _) = spine_calls::mint_turn_credentials(NEW, spine_runtime::now_secs() + 600, "someone-else");
    assert_eq!(allocate(turn.port, &forged_user, &mine.password).await, 401);
    let mut bad = mine.password.clone().into_bytes();
    bad[0] = if bad[0] == b'A' { b'B' } else { b'A' };
    assert_eq!(allocate(turn.port, &mine.username, std::str::from_utf8(&bad).unwrap()).await, 401);
    // Expired.
    let (u, p) = spine_calls::mint_turn_credentials(NEW, spine_runtime::now_secs() - 5, id);
    assert_eq!(allocate(turn.port, &u, &p).await, 401);
    // Minted under a secret coturn does not know.
    let (u, p) = spine_calls::mint_turn_credentials("not-the-secret", spine_runtime::now_secs() + 600, id);
    assert_eq!(allocate(turn.port, &u, &p).await, 401);
    // Rotation: credentials of the previous secret, still listed, work.
    let (u, p) = spine_calls::mint_turn_credentials(OLD, spine_runtime::now_secs() + 600, id);
    assert_eq!(allocate(turn.port, &u, &p).await, 0);

    // After the call, no more credentials for it.
    alice.hang_up(&call.call_id).await.unwrap();
    let s = alice
        .calls()
        .get_turn_credentials(alice.req(pb::GetTurnCredentialsRequest { call_id: call.call_id.clone() }))
        .await;
    assert_eq!(s.unwrap_err().code(), tonic::Code::NotFound);
}
