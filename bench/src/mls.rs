//! The delivery service's verifier beside raw openmls `PublicGroup`
//! processing of the very same commit bytes from the same state:
//! - raw openmls: `PublicGroup::process_message` + `merge_commit`;
//! - verifier: `Verifier::verify` + `apply` (decoding, epoch and sender
//!   checks, roster diff, merge);
//! - service MLS work: the verifier plus the GroupInfo check, and the
//!   state read from its stored slot (unpacked) and written back (packed):
//!   all MLS work of one SendCommit on a node that does not hold the group;
//! - service MLS work, state kept: the same on a node that kept the group's
//!   verifier from its last commit (`groups.verifier_cache_mib`): nothing
//!   read, the new state still packed.

use std::time::{Duration, Instant};

use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_rust_crypto::{MemoryStorage, RustCrypto};
use spine_groups::model::Slot;
use spine_mls::DeviceName;
use spine_mls::client::{Client, CommitBundle};
use spine_mls::verifier::{DeliveryService, Verifier};

use crate::{Aim, Latency, Options, Plot, Row, Section};

struct Case {
    state: Vec<u8>,
    commit: CommitBundle,
    signer: u32,
}

fn clients(n: usize) -> Vec<Client> {
    (0..n).map(|i| Client::new(DeviceName::new("tn_b", format!("ac_{i}"), format!("dv_{i}"))).unwrap()).collect()
}

/// A group of `members` (creator included) and the creator's next commit:
/// adding `adds` members, or a self-update if `adds` is 0.
fn case(members: usize, adds: usize) -> anyhow::Result<Case> {
    let ds = DeliveryService::generate()?;
    let creator = Client::new(DeviceName::new("tn_b", "ac_creator", "dv_creator"))?;
    let mut g = creator.create_group(format!("bench-{members}-{adds}").as_bytes(), &ds.public_key())?;
    let mut v = Verifier::from_group_info(&creator.group_info(&g)?)?;
    if members > 1 {
        let kps: Vec<Vec<u8>> = clients(members - 1)
            .iter()
            .map(|c| c.key_packages(1, false).map(|mut k| k.remove(0)))
            .collect::<Result<_, _>>()?;
        let b = creator.add(&mut g, &kps)?;
        v.verify(&b.commit)?;
        v.apply()?;
        creator.merge_pending(&mut g)?;
    }
    let commit = if adds > 0 {
        let kps: Vec<Vec<u8>> = clients(adds)
            .iter()
            .map(|c| c.key_packages(1, false).map(|mut k| k.remove(0)))
            .collect::<Result<_, _>>()?;
        creator.add(&mut g, &kps)?
    } else {
        creator.self_update(&mut g)?
    };
    Ok(Case { state: v.to_bytes(), commit, signer: g.own_index() })
}

/// A PublicGroup restored from the verifier's serialized state (its
/// storage entries, after the group id), and the commit as openmls reads it.
fn raw_parts(c: &Case) -> (PublicGroup, MemoryStorage, ProtocolMessage) {
    let v = Verifier::from_bytes(&c.state).unwrap();
    let gid = GroupId::from_slice(&v.group_id());
    let storage = MemoryStorage::default();
    {
        let mut rest = &c.state[4 + gid.as_slice().len()..];
        let mut w = storage.values.write().unwrap();
        while !rest.is_empty() {
            let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let k = rest[4..4 + n].to_vec();
            rest = &rest[4 + n..];
            let m = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let val = rest[4..4 + m].to_vec();
            rest = &rest[4 + m..];
            w.insert(k, val);
        }
    }
    let group = PublicGroup::load(&storage, &gid).unwrap().unwrap();
    let msg =
        MlsMessageIn::tls_deserialize(&mut c.commit.commit.as_slice()).unwrap().try_into_protocol_message().unwrap();
    (group, storage, msg)
}

/// Times `run` on a fresh `setup()` each time (setup untimed), for up to
/// `samples` runs or `budget`, whichever ends first (at least 5 runs).
fn sample<S>(samples: usize, budget: Duration, mut setup: impl FnMut() -> S, mut run: impl FnMut(S)) -> Vec<Duration> {
    let mut out = Vec::with_capacity(samples);
    let start = Instant::now();
    while out.len() < samples && (out.len() < 5 || start.elapsed() < budget) {
        let s = setup();
        let t = Instant::now();
        run(s);
        out.push(t.elapsed());
    }
    out
}

pub async fn run(opts: &Options) -> anyhow::Result<Section> {
    tokio::task::spawn_blocking({
        let quick = opts.quick;
        move || measure(quick)
    })
    .await?
}

fn measure(quick: bool) -> anyhow::Result<Section> {
    let cases: Vec<(String, usize, usize)> = if quick {
        vec![("add 1 member".into(), 1, 1), ("add 10".into(), 1, 10), ("self-update, 10 members".into(), 10, 0)]
    } else {
        [1usize, 10, 100, 1000]
            .iter()
            .map(|&n| (if n == 1 { "add 1 member".to_string() } else { format!("add {n}") }, 1, n))
            .chain([10usize, 100, 1000].iter().map(|&n| (format!("self-update, {n} members"), n, 0)))
            .collect()
    };
    let (samples, budget) = if quick { (40, Duration::from_millis(600)) } else { (300, Duration::from_secs(3)) };
    let mut s = Section::new(
        "mls",
        "MLS verification: the delivery service's verifier beside raw openmls",
        "The same commit bytes from the same state, each run on a fresh copy of it; time per commit.",
    );
    let crypto = RustCrypto::default();
    let bar = crate::bar(cases.len() as u64, "mls: cases");
    let mut plot_series = vec![];
    for (name, members, adds) in cases {
        let c = case(members, adds)?;
        let mut raw = sample(
            samples,
            budget,
            || raw_parts(&c),
            |(mut group, storage, msg)| {
                let processed = group.process_message(&crypto, msg).unwrap();
                if let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() {
                    group.merge_commit(&storage, *staged).unwrap();
                }
            },
        );
        let mut verifier = sample(
            samples,
            budget,
            || Verifier::from_bytes(&c.state).unwrap(),
            |mut v| {
                v.verify(&c.commit.commit).unwrap();
                v.apply().unwrap();
            },
        );
        // The service's work also reads the state from its stored slot
        // (unpacking it) and packs the new one: timed here, unlike the
        // other rows, whose state is restored before the clock starts.
        // What SendCommit does with the verifier it has: verify, apply,
        // check the GroupInfo, pack the new state.
        let commit_work = |mut v: Verifier| {
            v.verify(&c.commit.commit).unwrap();
            v.apply().unwrap();
            v.check_group_info(&c.commit.group_info, c.signer).unwrap();
            std::hint::black_box(Slot { epoch: 1, committer_leaf: 0, state: v.to_bytes() }.to_bytes());
        };
        let stored = Slot { epoch: 0, committer_leaf: 0, state: c.state.clone() }.to_bytes();
        let mut service = sample(
            samples,
            budget,
            || stored.clone(),
            |stored| commit_work(Verifier::from_bytes(&Slot::from_bytes(&stored).unwrap().state).unwrap()),
        );
        // A node that kept the verifier: restored before the clock starts.
        let mut kept = sample(samples, budget, || Verifier::from_bytes(&c.state).unwrap(), commit_work);
        let base = Row::baseline(format!("{name}: raw openmls")).latency(Latency::of(&mut raw));
        let v = Row::new(format!("{name}: verifier")).latency(Latency::of(&mut verifier)).against(&base, "p50");
        let w = Row::new(format!("{name}: service MLS work")).latency(Latency::of(&mut service)).against(&base, "p50");
        let k = Row::new(format!("{name}: service MLS work, state kept"))
            .latency(Latency::of(&mut kept))
            .against(&base, "p50");
        s.aims.push(Aim::at_most(format!("verifier / raw openmls, {name}"), v.ratio.unwrap_or(f64::NAN), 1.2));
        if members == 10 && adds == 0 {
            let us = |d: &[Duration]| d.iter().map(|d| d.as_secs_f64() * 1e6).collect::<Vec<_>>();
            plot_series = vec![
                ("raw openmls".to_string(), us(&raw)),
                ("verifier".to_string(), us(&verifier)),
                ("service MLS work".to_string(), us(&service)),
                ("service MLS work, state kept".to_string(), us(&kept)),
            ];
        }
        s.rows.extend([base, v, w, k]);
        s.notes.push(format!(
            "{name}: state {} bytes ({} stored), commit {} bytes, GroupInfo {} bytes",
            c.state.len(),
            stored.len(),
            c.commit.commit.len(),
            c.commit.group_info.len()
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    s.plots.push(Plot::Latency {
        file: "mls-self-update-10.svg".into(),
        title: "Self-update commit in a 10-member group".into(),
        series: plot_series,
    });
    Ok(s)
}
