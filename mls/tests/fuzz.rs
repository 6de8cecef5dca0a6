//! Property-based fuzzing of every decoder that takes MLS or SFrame bytes
//! from outside: the delivery service's verifier (GroupInfo, Commit and
//! proposals, application framing, key packages, Welcome detection), the
//! credential parser, and SFrame decryption (header parsing first). Inputs
//! are random bytes and real messages with random damage (bit flips,
//! truncation, splices, length fields set huge). No input may panic, and
//! none may make one call hold more than 64 MiB more heap (a length prefix
//! trusted before the bytes behind it exist would): past that, allocation
//! fails and the test process aborts.
//!
//! CI runs a short pass (256 cases per property); the long run is
//! `PROPTEST_CASES=100000 cargo test -p spine-mls --test fuzz`
//! (docs/testing.md).

use proptest::prelude::*;
use sframe::frame::MonotonicCounter;
use spine_mls::DeviceName;
use spine_mls::client::{Client, Group, is_welcome};
use spine_mls::verifier::{DeliveryService, Verifier, validate_key_package};

/// Counts live heap bytes and enforces a limit (an allocation past it
/// aborts the test process with "memory allocation of N bytes failed").
#[global_allocator]
static ALLOC: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

/// Most one decoder call may add to the heap.
const MEMORY_BOUND: usize = 64 << 20;

/// Runs `f` with at most [`MEMORY_BOUND`] more bytes of heap than were live
/// when it started. One at a time: the limit is process-wide, and `cargo
/// test` runs the properties on parallel threads.
fn bounded<R>(_what: &str, f: impl FnOnce() -> R) -> R {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    ALLOC.set_limit(ALLOC.allocated().saturating_add(MEMORY_BOUND)).expect("limit above what is allocated");
    let r = f();
    ALLOC.set_limit(usize::MAX).expect("lift the limit");
    r
}

/// Cases per property: 256 in CI, `PROPTEST_CASES` for the long run.
fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

/// Real messages of a two-member group, as the service receives them.
struct Samples {
    group_info: Vec<u8>,
    verifier: Vec<u8>,
    key_package: Vec<u8>,
    commit: Vec<u8>,
    welcome: Vec<u8>,
    application: Vec<u8>,
    frame: Vec<u8>,
    credential: Vec<u8>,
}

fn samples() -> &'static (Samples, Client, Group) {
    static S: std::sync::OnceLock<(Samples, Client, Group)> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let ds = DeliveryService::generate().unwrap();
        let alice = Client::new(DeviceName::new("tn_a", "ac_alice", "dv_a")).unwrap();
        let bob = Client::new(DeviceName::new("tn_b", "ac_bob", "dv_b")).unwrap();
        let mut ga = alice.create_group(b"fuzz-group", &ds.public_key()).unwrap();
        let key_package = bob.key_packages(1, false).unwrap().remove(0);
        let add = alice.add(&mut ga, std::slice::from_ref(&key_package)).unwrap();
        alice.merge_pending(&mut ga).unwrap();
        let welcome = add.welcome.unwrap();
        let group_info = alice.group_info(&ga).unwrap();
        let verifier = Verifier::from_group_info(&group_info).unwrap();
        let commit = alice.self_update(&mut ga).unwrap().commit;
        alice.discard_pending(&mut ga).unwrap();
        let application = alice.send(&mut ga, b"hello").unwrap();
        let frame = alice.sframe(&ga).encrypt(&mut MonotonicCounter::default(), b"media frame").unwrap();
        let credential = DeviceName::new("tn_a", "ac_alice", "dv_a").to_identity();
        let s = Samples {
            group_info,
            verifier: verifier.to_bytes(),
            key_package,
            commit,
            welcome,
            application,
            frame,
            credential,
        };
        (s, alice, ga)
    })
}

/// Damage to a real message.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    Splice(usize, Vec<u8>),
    /// Four bytes set to 0xff at an offset: any length prefix there claims
    /// far more than follows.
    Huge(usize),
}

fn damage() -> impl Strategy<Value = Vec<Damage>> {
    let one = prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, b)| Damage::Flip(i, b)),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(i, v)| Damage::Splice(i, v)),
        any::<usize>().prop_map(Damage::Huge),
    ];
    proptest::collection::vec(one, 1..4)
}

fn apply(mut bytes: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    for d in damage {
        if bytes.is_empty() {
            break;
        }
        let at = |i: usize| i % bytes.len();
        match d {
            Damage::Flip(i, b) => {
                let i = at(*i);
                bytes[i] ^= b;
            }
            Damage::Truncate(i) => bytes.truncate(at(*i)),
            Damage::Splice(i, v) => {
                let i = at(*i);
                bytes.splice(i..i, v.iter().copied());
            }
            Damage::Huge(i) => {
                let i = at(*i);
                let end = (i + 4).min(bytes.len());
                bytes[i..end].fill(0xff);
            }
        }
    }
    bytes
}

/// Everything the delivery service does with bytes from a client.
fn every_decoder(bytes: &[u8]) {
    let (s, alice, group) = samples();
    bounded("validate_key_package", || validate_key_package(bytes).is_ok());
    bounded("Verifier::from_group_info", || Verifier::from_group_info(bytes).is_ok());
    bounded("Verifier::from_bytes", || Verifier::from_bytes(bytes).is_ok());
    let mut v = Verifier::from_bytes(&s.verifier).unwrap();
    bounded("verify", || v.verify(bytes).is_ok());
    bounded("check_application", || v.check_application(bytes).is_ok());
    bounded("check_group_info", || v.check_group_info(bytes, 0).is_ok());
    bounded("is_welcome", || is_welcome(bytes));
    bounded("DeviceName::from_identity", || DeviceName::from_identity(bytes).is_some());
    bounded("sframe decrypt", || alice.sframe(group).decrypt(bytes).is_ok());
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        every_decoder(&bytes);
    }

    #[test]
    fn damaged_key_packages(d in damage()) {
        let b = apply(samples().0.key_package.clone(), &d);
        every_decoder(&b);
    }

    #[test]
    fn damaged_group_infos(d in damage()) {
        let b = apply(samples().0.group_info.clone(), &d);
        every_decoder(&b);
    }

    #[test]
    fn damaged_commits_never_verify(d in damage()) {
        let (s, _, _) = samples();
        let b = apply(s.commit.clone(), &d);
        every_decoder(&b);
        // A commit changed anywhere but its two MACs is refused: the
        // content is signed. The confirmation tag and the membership tag
        // (the last 33 and 34 bytes of a PublicMessage commit with 32-byte
        // MACs) are keyed with epoch secrets only members hold, so the
        // delivery service cannot check them; members refuse such a commit
        // and report it (ReportDispute).
        if b != s.commit {
            let mut v = Verifier::from_bytes(&s.verifier).unwrap();
            let macs_from = s.commit.len() - 33 - 34;
            let first = s.commit.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(b.len().min(s.commit.len()));
            let only_macs = first >= macs_from;
            prop_assert!(
                only_macs || v.verify(&b).is_err(),
                "a damaged commit verified (first change at {first} of {})",
                s.commit.len()
            );
        }
    }

    #[test]
    fn damaged_welcomes(d in damage()) {
        let b = apply(samples().0.welcome.clone(), &d);
        every_decoder(&b);
    }

    #[test]
    fn damaged_application_messages(d in damage()) {
        let b = apply(samples().0.application.clone(), &d);
        every_decoder(&b);
    }

    #[test]
    fn damaged_sframe_frames_never_decrypt(d in damage()) {
        let (s, alice, group) = samples();
        let b = apply(s.frame.clone(), &d);
        every_decoder(&b);
        if b != s.frame {
            prop_assert!(alice.sframe(group).decrypt(&b).is_err(), "a damaged frame decrypted");
        }
    }

    #[test]
    fn damaged_credentials(d in damage()) {
        let b = apply(samples().0.credential.clone(), &d);
        every_decoder(&b);
    }
}

#[test]
fn the_samples_are_what_the_properties_damage() {
    // The undamaged messages pass, so damage is what the properties test.
    let (s, alice, group) = samples();
    assert!(validate_key_package(&s.key_package).is_ok());
    assert!(Verifier::from_group_info(&s.group_info).is_ok());
    assert!(Verifier::from_bytes(&s.verifier).unwrap().verify(&s.commit).is_ok());
    assert!(is_welcome(&s.welcome));
    assert!(Verifier::from_bytes(&s.verifier).unwrap().check_application(&s.application).is_ok());
    assert_eq!(alice.sframe(group).decrypt(&s.frame).unwrap(), b"media frame");
    assert!(DeviceName::from_identity(&s.credential).is_some());
}
