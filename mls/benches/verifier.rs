//! The delivery service's verifier beside raw openmls `PublicGroup`
//! processing of the very same commits, in the same run:
//! - `raw`: `PublicGroup::process_message` + `merge_commit`;
//! - `verifier`: `Verifier::verify` + `apply` (what SendCommit runs per
//!   commit: decoding, epoch and sender checks, roster diff, merge);
//! - `service`: `verifier` plus the GroupInfo check and serializing the
//!   state for the store, i.e. all MLS work SendCommit does.
//!
//! Commits adding 1, 10, 100 and 1000 members to a one-member group, and
//! self-updates in groups of 10, 100 and 1000. Run:
//! `cargo bench -p spine-mls --bench verifier`.

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::*;
use openmls_rust_crypto::{MemoryStorage, RustCrypto};
use spine_mls::DeviceName;
use spine_mls::client::{Client, CommitBundle};
use spine_mls::verifier::{DeliveryService, Verifier};

struct Case {
    /// Verifier state before the commit.
    state: Vec<u8>,
    commit: CommitBundle,
    signer: u32,
}

fn clients(n: usize) -> Vec<Client> {
    (0..n).map(|i| Client::new(DeviceName::new("tn_b", format!("ac_{i}"), format!("dv_{i}"))).unwrap()).collect()
}

/// A group of `members` (creator included), and the creator's next commit:
/// adding `adds` new members, or a self-update if `adds` is 0.
fn case(members: usize, adds: usize) -> Case {
    let ds = DeliveryService::generate().unwrap();
    let creator = Client::new(DeviceName::new("tn_b", "ac_creator", "dv_creator")).unwrap();
    let mut g = creator.create_group(format!("bench-{members}-{adds}").as_bytes(), &ds.public_key()).unwrap();
    let mut v = Verifier::from_group_info(&creator.group_info(&g).unwrap()).unwrap();
    if members > 1 {
        let kps: Vec<Vec<u8>> =
            clients(members - 1).iter().map(|c| c.key_packages(1, false).unwrap().remove(0)).collect();
        let b = creator.add(&mut g, &kps).unwrap();
        v.verify(&b.commit).unwrap();
        v.apply().unwrap();
        creator.merge_pending(&mut g).unwrap();
    }
    let commit = if adds > 0 {
        let kps: Vec<Vec<u8>> = clients(adds).iter().map(|c| c.key_packages(1, false).unwrap().remove(0)).collect();
        creator.add(&mut g, &kps).unwrap()
    } else {
        creator.self_update(&mut g).unwrap()
    };
    Case { state: v.to_bytes(), commit, signer: g.own_index() }
}

/// The raw openmls objects for the same state and commit.
fn raw_parts(c: &Case) -> (PublicGroup, MemoryStorage, ProtocolMessage) {
    // Restore a PublicGroup from the same serialized state the verifier uses.
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

fn bench(cr: &mut Criterion) {
    let crypto = RustCrypto::default();
    let cases: Vec<(String, usize, usize)> = [1, 10, 100, 1000]
        .iter()
        .map(|&n| (format!("add_{n}"), 1, n))
        .chain([10, 100, 1000].iter().map(|&n| (format!("self_update_in_{n}"), n, 0)))
        .collect();
    for (name, members, adds) in cases {
        let c = case(members, adds);
        let mut g = cr.benchmark_group(name.clone());
        if members >= 1000 || adds >= 1000 {
            g.sample_size(20);
        }
        g.bench_function(BenchmarkId::new("raw_openmls", &name), |b| {
            b.iter_batched(
                || raw_parts(&c),
                |(mut group, storage, msg)| {
                    let processed = group.process_message(&crypto, msg).unwrap();
                    if let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() {
                        group.merge_commit(&storage, *staged).unwrap();
                    }
                },
                BatchSize::LargeInput,
            );
        });
        g.bench_function(BenchmarkId::new("verifier", &name), |b| {
            b.iter_batched(
                || Verifier::from_bytes(&c.state).unwrap(),
                |mut v| {
                    v.verify(&c.commit.commit).unwrap();
                    v.apply().unwrap();
                },
                BatchSize::LargeInput,
            );
        });
        g.bench_function(BenchmarkId::new("service_mls_work", &name), |b| {
            b.iter_batched(
                || Verifier::from_bytes(&c.state).unwrap(),
                |mut v| {
                    v.verify(&c.commit.commit).unwrap();
                    v.apply().unwrap();
                    v.check_group_info(&c.commit.group_info, c.signer).unwrap();
                    v.to_bytes()
                },
                BatchSize::LargeInput,
            );
        });
        g.finish();
        eprintln!("{name}: state {} bytes, commit {} bytes", c.state.len(), c.commit.commit.len());
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
