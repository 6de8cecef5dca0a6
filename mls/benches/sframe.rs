//! SFrame (RFC 9605) per media frame, as Spine's devices use it (keys from
//! the MLS group's exporter, cipher suite AES-128-GCM-SHA256 with Spine's
//! key-id layout), beside the raw AEAD of the same size in the same run:
//! - `raw_aead_seal` / `raw_aead_open`: ring's AES-128-GCM with a fresh
//!   nonce, the floor any frame encryption pays;
//! - `sframe_encrypt` / `sframe_decrypt`: a frame with its SFrame header,
//!   keys derived once per epoch (what a device caches);
//! - `sframe_encrypt_derive`: `SframeContext::encrypt`, which derives the
//!   key from the exporter for each frame (what not to do per frame).
//!
//! Frame sizes: 160 bytes (an Opus frame), 1,200 (a video packet's worth),
//! 12,000 (a video frame). Run: `cargo bench -p spine-mls --bench sframe`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use sframe::frame::{EncryptedFrame, MediaFrame, MonotonicCounter};
use spine_mls::DeviceName;
use spine_mls::client::Client;
use spine_mls::verifier::DeliveryService;

fn bench(c: &mut Criterion) {
    let ds = DeliveryService::generate().unwrap();
    let client = Client::new(DeviceName::new("tn_b", "ac_a", "dv_a")).unwrap();
    let group = client.create_group(b"sframe-bench", &ds.public_key()).unwrap();
    let ctx = client.sframe(&group);
    let enc = ctx.encryption_key().unwrap();
    let dec = ctx.decryption_key(group.own_index()).unwrap();
    let raw = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());

    let mut g = c.benchmark_group("sframe");
    for size in [160usize, 1200, 12_000] {
        let payload = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        let mut n: u64 = 0;
        g.bench_with_input(BenchmarkId::new("raw_aead_seal", size), &payload, |b, p| {
            b.iter(|| {
                n += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&n.to_be_bytes());
                let mut buf = p.clone();
                raw.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf).unwrap();
                buf
            });
        });
        let mut sealed = payload.clone();
        raw.seal_in_place_append_tag(Nonce::assume_unique_for_key([1u8; 12]), Aad::empty(), &mut sealed).unwrap();
        g.bench_with_input(BenchmarkId::new("raw_aead_open", size), &sealed, |b, s| {
            b.iter(|| {
                let mut buf = s.clone();
                raw.open_in_place(Nonce::assume_unique_for_key([1u8; 12]), Aad::empty(), &mut buf).unwrap().len()
            });
        });
        let mut counter = MonotonicCounter::default();
        g.bench_with_input(BenchmarkId::new("sframe_encrypt", size), &payload, |b, p| {
            b.iter(|| MediaFrame::try_new(&mut counter, p).unwrap().encrypt(&enc).unwrap());
        });
        let frame = MediaFrame::try_new(&mut MonotonicCounter::default(), &payload).unwrap().encrypt(&enc).unwrap();
        let bytes = frame.as_ref().to_vec();
        g.bench_with_input(BenchmarkId::new("sframe_decrypt", size), &bytes, |b, f| {
            b.iter(|| EncryptedFrame::try_from(f.as_slice()).unwrap().decrypt(&dec).unwrap().payload().len());
        });
        let mut counter = MonotonicCounter::default();
        g.bench_with_input(BenchmarkId::new("sframe_encrypt_derive", size), &payload, |b, p| {
            b.iter(|| ctx.encrypt(&mut counter, p).unwrap());
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
