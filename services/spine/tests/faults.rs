//! The fault suite: what an operator will see, run for real. Three etcd
//! members and three `spine serve` processes (every service) on loopback,
//! under bounded load: identity writes, presence, one-to-one call flows with
//! devices holding signalling sessions, and MLS commits with application
//! messages. Then, in turn: SIGKILL of a Spine node (restarted after), SIGKILL
//! of the etcd leader (restarted after), SIGTERM drain of a node.
//!
//! Checked at the end: every acknowledged write is readable (accounts, and
//! every accepted commit and application message in the other member's
//! mailbox, with exactly one commit per epoch); no call is left once its
//! devices are gone; the only failures seen in any fault window are
//! UNAVAILABLE, never INTERNAL or anything else. The figures (each window's
//! error codes and length, latencies, how long streams took to move) are
//! printed.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost_types::FieldMask;
use spine_mls::DeviceName;
use spine_mls::client::{Client, DeviceKey, Group};
use spine_proto::calls::v1 as cpb;
use spine_proto::calls::v1::calls_client::CallsClient;
use spine_proto::common::v1::{PeerRef, peer_ref};
use spine_proto::groups::v1 as gpb;
use spine_proto::groups::v1::groups_client::GroupsClient;
use spine_proto::identity::v1 as ipb;
use spine_proto::identity::v1::identity_client::IdentityClient;
use spine_proto::presence::v1 as ppb;
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_testing::{EtcdCluster, eventually, free_port};
use support::{BIN, KEK, Proc, connect, req};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Node settings that make the scenario short: a dead node is noticed in
/// 2 s, a device without a session leaves its call after 5 s, a drain keeps
/// serving 1 s and waits at most 5 s.
const NODE_ENV: &[(&str, &str)] = &[
    ("SPINE_CALLS__NODE_TTL_SECS", "2"),
    ("SPINE_CALLS__UNATTENDED_SECS", "5"),
    ("SPINE_DRAIN__READY_DELAY_MS", "1000"),
    ("SPINE_DRAIN__GRACE_SECS", "5"),
    ("SPINE_AUTH__KEY_ACTIVATION_DELAY_SECS", "0"),
];

fn serve(endpoints: &str, addr: &str) -> Proc {
    Proc(
        std::process::Command::new(BIN)
            .args(["serve", "--store", "etcd", "--etcd", endpoints, "--listen", addr])
            .env("SPINE_AUTH__KEY_ENCRYPTION_KEY", KEK)
            .env("SPINE_PRESENCE__ADVERTISE", addr)
            .envs(NODE_ENV.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn spine serve"),
    )
}

/// How a request ended, as the suite judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Ok,
    /// A server's UNAVAILABLE: retry, on any node.
    Unavailable,
    /// The connection failed under the request (a node killed or closing
    /// its connections): no server answered. tonic reports this as UNKNOWN
    /// "transport error" or CANCELLED, with the transport error as source;
    /// clients treat it as UNAVAILABLE.
    ConnectionLost,
    /// A domain answer to the retry of a request whose first answer was lost
    /// (it had applied: hanging up an ended call, answering it twice).
    AfterLostAnswer(Code),
    /// Anything else: a failure the rule forbids.
    Other(Code),
}

impl Seen {
    fn of(s: &Status, after_lost: bool) -> Seen {
        match s.code() {
            _ if std::error::Error::source(s).is_some() => Seen::ConnectionLost,
            Code::Unavailable => Seen::Unavailable,
            c @ (Code::FailedPrecondition | Code::NotFound | Code::AlreadyExists) if after_lost => {
                Seen::AfterLostAnswer(c)
            }
            c => Seen::Other(c),
        }
    }
    fn retry(self) -> bool {
        matches!(self, Seen::Unavailable | Seen::ConnectionLost)
    }
}

/// Every request's outcome, by time.
#[derive(Default)]
struct Log {
    start: Mutex<Option<Instant>>,
    entries: Mutex<Vec<(Duration, &'static str, Seen, Duration)>>,
    /// What each forbidden answer said.
    odd: Mutex<Vec<String>>,
    moves: Mutex<Vec<Duration>>,
}

impl Log {
    fn t0(&self) -> Instant {
        *self.start.lock().unwrap().get_or_insert_with(Instant::now)
    }
    fn record(&self, op: &'static str, seen: Seen, started: Instant) {
        let at = started.duration_since(self.t0());
        self.entries.lock().unwrap().push((at, op, seen, started.elapsed()));
    }
    fn record_status(&self, op: &'static str, s: &Status, after_lost: bool, started: Instant) -> Seen {
        let seen = Seen::of(s, after_lost);
        if let Seen::Other(_) = seen {
            self.odd.lock().unwrap().push(format!("{op}: {s:?}"));
        }
        self.record(op, seen, started);
        seen
    }
}

/// The three nodes, as clients see them: a request goes to the actor's
/// current node and, on UNAVAILABLE, to the next.
#[derive(Clone)]
struct Nodes {
    chans: Arc<Vec<Channel>>,
    log: Arc<Log>,
}

impl Nodes {
    /// Runs `f` until it answers something other than UNAVAILABLE or a lost
    /// connection (at most 30 s), moving to the next node after each.
    async fn call<T, F, Fut>(&self, op: &'static str, home: &AtomicUsize, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut after_lost = false;
        loop {
            let i = home.load(Ordering::Relaxed) % self.chans.len();
            let started = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(15), f(self.chans[i].clone()))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in 15 s")));
            match r {
                Ok(v) => {
                    self.log.record(op, Seen::Ok, started);
                    return Ok(v);
                }
                Err(s) => {
                    let seen = self.log.record_status(op, &s, after_lost, started);
                    // The request may have applied: a later domain answer
                    // can be its consequence.
                    after_lost = true;
                    if !seen.retry() || Instant::now() > deadline {
                        return Err(s);
                    }
                    home.store(i + 1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

struct Dev {
    account: String,
    device: String,
    token: String,
}

/// A new account with one device holding `public_key`; calls and group adds
/// from anyone in the tenant allowed.
async fn device(ch: &Channel, cred: &str, public_key: Vec<u8>) -> Dev {
    let mut id = IdentityClient::new(ch.clone());
    let (account, device, token) = support::device_holding(&mut id, cred, public_key).await;
    id.update_settings(req(
        ipb::UpdateSettingsRequest {
            account_id: account.clone(),
            settings: Some(ipb::PrivacySettings {
                who_can_call: ipb::WhoCanCall::Everyone as i32,
                who_can_add_to_groups: ipb::WhoCanAddToGroups::Everyone as i32,
                ..Default::default()
            }),
            update_mask: Some(FieldMask { paths: vec!["who_can_call".into(), "who_can_add_to_groups".into()] }),
        },
        cred,
    ))
    .await
    .unwrap();
    Dev { account, device, token }
}

fn random_key() -> Vec<u8> {
    ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng).verifying_key().to_bytes().to_vec()
}

fn account_ref(a: &str) -> Option<PeerRef> {
    Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(a.to_string())) })
}

/// Keeps a device's signalling session open, on one node and then the
/// next when it ends, until `stop`; records how long each move took.
fn hold_session(nodes: Nodes, token: String, first: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let home = AtomicUsize::new(first);
        let mut lost_at: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let i = home.load(Ordering::Relaxed) % nodes.chans.len();
            let (tx, rx) = tokio::sync::mpsc::channel::<cpb::ClientMessage>(4);
            let opened = CallsClient::new(nodes.chans[i].clone())
                .session(req(tokio_stream::wrappers::ReceiverStream::new(rx), &token))
                .await;
            let mut events = match opened {
                Ok(r) => r.into_inner(),
                Err(_) => {
                    home.store(i + 1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Synced first: the session is held again.
            match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
                Ok(Some(Ok(_))) => {
                    if let Some(t) = lost_at.take() {
                        nodes.log.moves.lock().unwrap().push(t.elapsed());
                    }
                }
                _ => {
                    home.store(i + 1, Ordering::Relaxed);
                    continue;
                }
            }
            loop {
                tokio::select! {
                    ev = events.next() => match ev {
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        if stop.load(Ordering::Relaxed) {
                            drop(tx);
                            return;
                        }
                    }
                }
            }
            drop(tx);
            lost_at = Some(Instant::now());
            home.store(i + 1, Ordering::Relaxed);
        }
    })
}

/// What the MLS actor had accepted.
#[derive(Default)]
struct MlsOutcome {
    /// Epochs of commits the service acknowledged (the epoch each left).
    commits: Vec<u64>,
    /// Commits applied though their answer was lost (seen by the epoch).
    commits_unacked: Vec<u64>,
    /// Application messages acknowledged, and how often each was sent.
    messages: Vec<(Vec<u8>, usize)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_faults_lose_nothing_and_fail_only_with_unavailable() {
    let suite = Instant::now();
    let mut etcd = EtcdCluster::start(3).await;
    let endpoints = etcd.endpoints().join(",");
    let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut procs: Vec<Option<Proc>> = addrs.iter().map(|a| Some(serve(&endpoints, a))).collect();
    let mut chans = Vec::new();
    for a in &addrs {
        chans.push(connect(a).await);
    }
    let operator = {
        let out = std::process::Command::new(BIN)
            .args(["admin", "operator", "create", "--label", "faults", "--store", "etcd", "--etcd", &endpoints])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().rsplit(' ').next().unwrap().trim().to_string()
    };
    let (tenant_id, cred) = support::tenant(&chans[0], &operator, "faults").await;
    let log = Arc::new(Log::default());
    let nodes = Nodes { chans: Arc::new(chans.clone()), log: log.clone() };
    let stop = Arc::new(AtomicBool::new(false));

    // --- Actors.
    // Call pairs: each device holds a session (on different nodes).
    let mut pairs = Vec::new();
    for _ in 0..2 {
        let a = device(&chans[0], &cred, random_key()).await;
        let b = device(&chans[0], &cred, random_key()).await;
        pairs.push((a, b));
    }
    let mut sessions = Vec::new();
    for (i, (a, b)) in pairs.iter().enumerate() {
        sessions.push(hold_session(nodes.clone(), a.token.clone(), i, stop.clone()));
        sessions.push(hold_session(nodes.clone(), b.token.clone(), i + 1, stop.clone()));
    }
    // The MLS pair: Alice commits and sends, Bob's mailbox receives.
    let alice_key = DeviceKey::generate().unwrap();
    let bob_key = DeviceKey::generate().unwrap();
    let alice = device(&chans[0], &cred, alice_key.public_key()).await;
    let bob = device(&chans[0], &cred, bob_key.public_key()).await;
    let alice_mls = Client::from_key(alice_key, DeviceName::new(&tenant_id, &alice.account, &alice.device)).unwrap();
    let bob_mls = Client::from_key(bob_key, DeviceName::new(&tenant_id, &bob.account, &bob.device)).unwrap();
    let group = {
        let mut groups = GroupsClient::new(chans[0].clone());
        let kps = bob_mls.key_packages(4, true).unwrap();
        let (last, kps) = kps.split_last().unwrap();
        groups
            .upload_key_packages(req(
                gpb::UploadKeyPackagesRequest { key_packages: kps.to_vec(), last_resort: last.clone() },
                &bob.token,
            ))
            .await
            .unwrap();
        let ds = groups
            .get_service_info(req(gpb::GetServiceInfoRequest {}, &alice.token))
            .await
            .unwrap()
            .into_inner()
            .external_sender_signature_key;
        let mut g = alice_mls.create_group(b"faults-group", &ds).unwrap();
        groups
            .create_group(req(
                gpb::CreateGroupRequest {
                    group_info: alice_mls.group_info(&g).unwrap(),
                    allowed_tenant_ids: vec![tenant_id.clone()],
                },
                &alice.token,
            ))
            .await
            .unwrap();
        let claimed = groups
            .claim_key_packages(req(
                gpb::ClaimKeyPackagesRequest {
                    targets: vec![gpb::Target { target: Some(gpb::target::Target::AccountId(bob.account.clone())) }],
                },
                &alice.token,
            ))
            .await
            .unwrap()
            .into_inner();
        let b = alice_mls.add(&mut g, &[claimed.key_packages[0].key_package.clone()]).unwrap();
        groups
            .send_commit(req(
                gpb::SendCommitRequest {
                    group_id: g.group_id(),
                    commit: b.commit,
                    welcome: b.welcome.unwrap_or_default(),
                    group_info: b.group_info,
                },
                &alice.token,
            ))
            .await
            .unwrap();
        alice_mls.merge_pending(&mut g).unwrap();
        g
    };
    let presence_devs = [device(&chans[1], &cred, random_key()).await, device(&chans[2], &cred, random_key()).await];

    // Identity writes: accounts created, each acknowledged one remembered.
    let mut tasks = Vec::new();
    let acked_accounts = Arc::new(Mutex::new(Vec::<String>::new()));
    for w in 0..2 {
        let (nodes, stop, acked, cred) = (nodes.clone(), stop.clone(), acked_accounts.clone(), cred.clone());
        tasks.push(tokio::spawn(async move {
            let home = AtomicUsize::new(w);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let rid = format!("w{w}-{n}");
                let r = nodes
                    .call("identity.CreateAccount", &home, |ch| {
                        let (rid, cred) = (rid.clone(), cred.clone());
                        async move {
                            IdentityClient::new(ch)
                                .create_account(req(ipb::CreateAccountRequest { request_id: rid }, &cred))
                                .await
                                .map(|r| r.into_inner().account_id)
                        }
                    })
                    .await;
                if let Ok(id) = r {
                    acked.lock().unwrap().push(id);
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }));
    }
    // Presence: announce and query.
    for (i, d) in presence_devs.iter().enumerate() {
        let (nodes, stop, token) = (nodes.clone(), stop.clone(), d.token.clone());
        let other = presence_devs[1 - i].account.clone();
        tasks.push(tokio::spawn(async move {
            let home = AtomicUsize::new(i);
            while !stop.load(Ordering::Relaxed) {
                let _ = nodes
                    .call("presence.Announce", &home, |ch| {
                        let token = token.clone();
                        async move {
                            PresenceClient::new(ch)
                                .announce(req(
                                    ppb::AnnounceRequest { status: ppb::Status::Online as i32, ttl_seconds: 30 },
                                    &token,
                                ))
                                .await
                        }
                    })
                    .await;
                let _ = nodes
                    .call("presence.Query", &home, |ch| {
                        let (token, other) = (token.clone(), other.clone());
                        async move {
                            PresenceClient::new(ch)
                                .query(req(
                                    ppb::QueryRequest {
                                        targets: vec![ppb::Target {
                                            target: Some(ppb::target::Target::AccountId(other)),
                                        }],
                                    },
                                    &token,
                                ))
                                .await
                        }
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }));
    }
    // Call flows: start, answer, hang up, over and over.
    let stuck = Arc::new(AtomicUsize::new(0));
    let flows = Arc::new(AtomicUsize::new(0));
    for (i, (a, b)) in pairs.iter().enumerate() {
        let (nodes, stop, stuck, flows) = (nodes.clone(), stop.clone(), stuck.clone(), flows.clone());
        let (caller, callee, callee_acct) = (a.token.clone(), b.token.clone(), b.account.clone());
        tasks.push(tokio::spawn(async move {
            let home = AtomicUsize::new(i + 2);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let rid = format!("call-{i}-{n}");
                let call = nodes
                    .call("calls.StartCall", &home, |ch| {
                        let (rid, caller, callee_acct) = (rid.clone(), caller.clone(), callee_acct.clone());
                        async move {
                            CallsClient::new(ch)
                                .start_call(req(
                                    cpb::StartCallRequest {
                                        request_id: rid,
                                        callee: account_ref(&callee_acct),
                                        ..Default::default()
                                    },
                                    &caller,
                                ))
                                .await
                                .map(|r| r.into_inner().call_id)
                        }
                    })
                    .await;
                let id = match call {
                    Ok(id) => id,
                    Err(s) => {
                        if s.code() == Code::AlreadyExists {
                            stuck.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                let answered =
                    nodes
                        .call("calls.Answer", &home, |ch| {
                            let (id, callee) = (id.clone(), callee.clone());
                            async move {
                                CallsClient::new(ch).answer(req(cpb::AnswerRequest { call_id: id }, &callee)).await
                            }
                        })
                        .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let hung =
                    nodes
                        .call("calls.HangUp", &home, |ch| {
                            let (id, caller) = (id.clone(), caller.clone());
                            async move {
                                CallsClient::new(ch).hang_up(req(cpb::HangUpRequest { call_id: id }, &caller)).await
                            }
                        })
                        .await;
                if answered.is_ok() && hung.is_ok() {
                    flows.fetch_add(1, Ordering::Relaxed);
                }
                // Within the call_starts rate limit (1/s per account).
                tokio::time::sleep(Duration::from_millis(900)).await;
            }
        }));
    }
    // MLS: a self-update commit every 400 ms, application messages between.
    let mls_outcome = Arc::new(Mutex::new(MlsOutcome::default()));
    let mls_task = {
        let (nodes, stop, outcome) = (nodes.clone(), stop.clone(), mls_outcome.clone());
        let token = alice.token.clone();
        tokio::spawn(async move {
            let (client, mut g): (Client, Group) = (alice_mls, group);
            let home = AtomicUsize::new(1);
            let gid = g.group_id();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                // Three application messages.
                for k in 0..3 {
                    let m = client.send(&mut g, format!("m{round}-{k}").as_bytes()).unwrap();
                    let sends = AtomicUsize::new(0);
                    let r = nodes
                        .call("groups.SendApplication", &home, |ch| {
                            sends.fetch_add(1, Ordering::Relaxed);
                            let (m, token, gid) = (m.clone(), token.clone(), gid.clone());
                            async move {
                                GroupsClient::new(ch)
                                    .send_application(req(
                                        gpb::SendApplicationRequest { group_id: gid, message: m },
                                        &token,
                                    ))
                                    .await
                            }
                        })
                        .await;
                    if r.is_ok() {
                        outcome.lock().unwrap().messages.push((m, sends.load(Ordering::Relaxed)));
                    }
                }
                // One commit. Sent once per node; after an UNAVAILABLE the
                // epoch tells whether it applied (only Alice commits).
                let before = g.epoch();
                let b = client.self_update(&mut g).unwrap();
                loop {
                    let started = Instant::now();
                    let i = home.load(Ordering::Relaxed) % nodes.chans.len();
                    let r = tokio::time::timeout(
                        Duration::from_secs(15),
                        GroupsClient::new(nodes.chans[i].clone()).send_commit(req(
                            gpb::SendCommitRequest {
                                group_id: gid.clone(),
                                commit: b.commit.clone(),
                                welcome: vec![],
                                group_info: b.group_info.clone(),
                            },
                            &token,
                        )),
                    )
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in 15 s")));
                    let seen = match &r {
                        Ok(_) => {
                            nodes.log.record("groups.SendCommit", Seen::Ok, started);
                            Seen::Ok
                        }
                        Err(s) => nodes.log.record_status("groups.SendCommit", s, false, started),
                    };
                    match r {
                        Ok(_) => {
                            client.merge_pending(&mut g).unwrap();
                            outcome.lock().unwrap().commits.push(before);
                            break;
                        }
                        Err(_) if seen.retry() => {
                            home.store(i + 1, Ordering::Relaxed);
                            let now = nodes
                                .call("groups.GetGroup", &home, |ch| {
                                    let (gid, token) = (gid.clone(), token.clone());
                                    async move {
                                        GroupsClient::new(ch)
                                            .get_group(req(gpb::GetGroupRequest { group_id: gid }, &token))
                                            .await
                                            .map(|r| r.into_inner().epoch)
                                    }
                                })
                                .await
                                .expect("group readable");
                            if now > before {
                                client.merge_pending(&mut g).unwrap();
                                outcome.lock().unwrap().commits_unacked.push(before);
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(s) => panic!("SendCommit: {s:?}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        })
    };

    // --- Faults.
    let t0 = log.t0();
    let at = |secs: u64| t0 + Duration::from_secs(secs);
    let mut windows: Vec<(&str, Duration)> = vec![("baseline", Duration::ZERO)];
    tokio::time::sleep_until(at(5).into()).await;
    windows.push(("SIGKILL spine node", t0.elapsed()));
    procs[0] = None; // SIGKILL
    tokio::time::sleep_until(at(14).into()).await;
    procs[0] = Some(serve(&endpoints, &addrs[0]));
    tokio::time::sleep_until(at(20).into()).await;
    let leader = etcd.leader().await.expect("an etcd leader");
    windows.push(("SIGKILL etcd leader", t0.elapsed()));
    etcd.kill(leader);
    tokio::time::sleep_until(at(30).into()).await;
    etcd.restart(leader).await;
    tokio::time::sleep_until(at(35).into()).await;
    windows.push(("SIGTERM drain of a node", t0.elapsed()));
    let drained = procs[1].take().unwrap();
    let drain_started = Instant::now();
    let ok = std::process::Command::new("kill").arg("-TERM").arg(drained.0.id().to_string()).status().unwrap();
    assert!(ok.success());
    let drain_exit = tokio::task::spawn_blocking(move || {
        let mut p = drained;
        let status = p.0.wait().unwrap();
        (status, drain_started.elapsed())
    });
    tokio::time::sleep_until(at(47).into()).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    mls_task.await.unwrap();
    for s in sessions {
        s.await.unwrap();
    }
    let (status, drain_took) = drain_exit.await.unwrap();
    assert!(status.success(), "the drained node exits cleanly: {status:?}");

    // --- Checks, on the nodes still up (0, restarted, and 2).
    let live = [chans[0].clone(), chans[2].clone()];
    // Every acknowledged account is there.
    let accounts = acked_accounts.lock().unwrap().clone();
    assert!(accounts.len() > 100, "load ran ({} accounts)", accounts.len());
    let mut id = IdentityClient::new(live[1].clone());
    for a in &accounts {
        id.get_account(req(ipb::GetAccountRequest { account_id: a.clone() }, &cred))
            .await
            .unwrap_or_else(|s| panic!("acknowledged account {a} lost: {s:?}"));
    }
    // Every accepted commit and message is in Bob's mailbox; one commit per
    // epoch, in order.
    let outcome = std::mem::take(&mut *mls_outcome.lock().unwrap());
    let mut stream = GroupsClient::new(live[0].clone())
        .max_decoding_message_size(16 << 20)
        .receive(req(gpb::ReceiveRequest { from_seq: 1, ..Default::default() }, &bob.token))
        .await
        .unwrap()
        .into_inner();
    let mut accepted: Vec<u64> = outcome.commits.iter().chain(&outcome.commits_unacked).copied().collect();
    accepted.sort();
    let commits_in = |entries: &[gpb::MailboxEntry]| -> Vec<u64> {
        entries.iter().filter(|e| e.kind == gpb::EntryKind::Commit as i32 && e.epoch >= 1).map(|e| e.epoch).collect()
    };
    // A fan-out cut short by the drain is finished by another node's upkeep
    // (every 15 s): read until everything arrived, or 30 s.
    let mut entries = Vec::new();
    let read_until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < read_until {
        match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
            Ok(Some(Ok(e))) => entries.push(e),
            Ok(other) => panic!("Bob's mailbox stream ended: {other:?}"),
            Err(_) if commits_in(&entries) == accepted => break,
            Err(_) => {}
        }
    }
    let commit_epochs = commits_in(&entries);
    assert_eq!(commit_epochs, accepted, "one commit per epoch, every accepted one delivered");
    assert!(outcome.commits.len() > 20, "commits ran ({})", outcome.commits.len());
    let mut delivered: HashMap<&[u8], usize> = HashMap::new();
    for e in entries.iter().filter(|e| e.kind == gpb::EntryKind::Application as i32) {
        *delivered.entry(&e.message).or_default() += 1;
    }
    for (m, sends) in &outcome.messages {
        let n = delivered.get(m.as_slice()).copied().unwrap_or(0);
        assert!(n >= 1 && n <= *sends, "an acknowledged message delivered {n} times after {sends} sends");
    }
    // No call is left once every device has gone (sessions closed above):
    // within the unattended time (5 s) and a margin.
    let store = etcd.store().await;
    assert!(
        eventually(Duration::from_secs(12), || async {
            store.count("/spine/sys/calls/c/").await.unwrap() == 0
                && store.count("/spine/sys/calls/pair/").await.unwrap() == 0
        })
        .await,
        "calls outlived their devices"
    );
    assert_eq!(stuck.load(Ordering::Relaxed), 0, "a call flow found a stale call between its pair");

    // --- Figures and the error-code rule.
    let entries = log.entries.lock().unwrap().clone();
    let mut bad = Vec::new();
    println!("\nfault suite: {} requests in {:.1} s", entries.len(), entries.last().map_or(0.0, |e| e.0.as_secs_f64()));
    for (w, (name, from)) in windows.iter().enumerate() {
        let to = windows.get(w + 1).map_or(Duration::MAX, |x| x.1);
        let mine: Vec<_> = entries.iter().filter(|e| e.0 >= *from && e.0 < to).collect();
        let mut codes: BTreeMap<String, usize> = BTreeMap::new();
        let mut failing: BTreeMap<&str, usize> = BTreeMap::new();
        let mut last_error = None;
        let mut ok_lat: Vec<Duration> = Vec::new();
        for e in &mine {
            *codes.entry(format!("{:?}", e.2)).or_default() += 1;
            if e.2 == Seen::Ok {
                ok_lat.push(e.3);
            } else {
                *failing.entry(e.1).or_default() += 1;
                last_error = Some(e.0);
                if let Seen::Other(c) = e.2 {
                    bad.push(format!("{name}: {} answered {c:?}", e.1));
                }
            }
        }
        ok_lat.sort();
        let pct = |p: usize| ok_lat.get((ok_lat.len() * p / 100).min(ok_lat.len().saturating_sub(1))).copied();
        let span = (to.min(entries.last().map_or(Duration::ZERO, |e| e.0)) - *from).as_secs_f64().max(0.001);
        println!(
            "  {name:<24} {:>5} requests ({:>6.1}/s)  codes {codes:?}  errors for {:.2} s  ok p50 {:?} p99 {:?}",
            mine.len(),
            mine.len() as f64 / span,
            last_error.map_or(0.0, |t| (t - *from).as_secs_f64()),
            pct(50).unwrap_or_default(),
            pct(99).unwrap_or_default(),
        );
        if !failing.is_empty() {
            println!("  {:<24} failed: {failing:?}", "");
        }
    }
    let mut moves = log.moves.lock().unwrap().clone();
    moves.sort();
    println!(
        "  sessions moved {} times: median {:?}, slowest {:?}; drain took {:?}",
        moves.len(),
        moves.get(moves.len() / 2).copied().unwrap_or_default(),
        moves.last().copied().unwrap_or_default(),
        drain_took
    );
    println!(
        "  {} accounts, {} call flows, {} commits (+{} applied with the answer lost), {} group messages; all readable",
        accounts.len(),
        flows.load(Ordering::Relaxed),
        outcome.commits.len(),
        outcome.commits_unacked.len(),
        outcome.messages.len()
    );
    println!("  suite took {:.1} s", suite.elapsed().as_secs_f64());
    assert!(
        bad.is_empty(),
        "only UNAVAILABLE may fail a request during a fault: {bad:#?}\n{:#?}",
        log.odd.lock().unwrap()
    );
    drop(procs);
}
