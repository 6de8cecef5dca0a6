//! SFrame (RFC 9605) per media frame as Spine's devices use it (keys from
//! the MLS exporter, AES-128-GCM-SHA256), beside ring's raw AES-128-GCM of
//! the same size: the floor any frame encryption pays.

use std::time::{Duration, Instant};

use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use sframe::frame::{EncryptedFrame, MediaFrame, MonotonicCounter};
use spine_mls::DeviceName;
use spine_mls::client::Client;
use spine_mls::verifier::DeliveryService;

use crate::{Latency, Options, Row, Section};

/// Per-operation times: `batches` timings of `per` runs each, divided.
fn batched(batches: usize, per: u32, mut f: impl FnMut()) -> Vec<Duration> {
    (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per {
                f();
            }
            t.elapsed() / per
        })
        .collect()
}

pub fn run(opts: &Options) -> anyhow::Result<Section> {
    let ds = DeliveryService::generate()?;
    let client = Client::new(DeviceName::new("tn_b", "ac_a", "dv_a"))?;
    let group = client.create_group(b"sframe-bench", &ds.public_key())?;
    let ctx = client.sframe(&group);
    let enc = ctx.encryption_key()?;
    let dec = ctx.decryption_key(group.own_index())?;
    let raw = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).map_err(|_| anyhow::anyhow!("aead key"))?);
    let batches = if opts.quick { 200 } else { 2000 };
    let mut s = Section::new(
        "sframe",
        "SFrame per media frame beside raw AES-128-GCM",
        format!("{batches} batches of 100 frames each; keys derived once per epoch, as devices cache them."),
    );
    for size in [160usize, 1200, 12_000] {
        let payload = vec![0x5au8; size];
        let mut n: u64 = 0;
        let mut seal = batched(batches, 100, || {
            n += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&n.to_be_bytes());
            let mut buf = payload.clone();
            raw.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf).unwrap();
            std::hint::black_box(buf);
        });
        let mut sealed = payload.clone();
        raw.seal_in_place_append_tag(Nonce::assume_unique_for_key([1u8; 12]), Aad::empty(), &mut sealed)
            .map_err(|_| anyhow::anyhow!("seal"))?;
        let mut open = batched(batches, 100, || {
            let mut buf = sealed.clone();
            std::hint::black_box(
                raw.open_in_place(Nonce::assume_unique_for_key([1u8; 12]), Aad::empty(), &mut buf).unwrap().len(),
            );
        });
        let mut counter = MonotonicCounter::default();
        let mut encrypt = batched(batches, 100, || {
            std::hint::black_box(MediaFrame::try_new(&mut counter, &payload).unwrap().encrypt(&enc).unwrap());
        });
        let frame = MediaFrame::try_new(&mut MonotonicCounter::default(), &payload)?.encrypt(&enc)?;
        let bytes = frame.as_ref().to_vec();
        let mut decrypt = batched(batches, 100, || {
            std::hint::black_box(
                EncryptedFrame::try_from(bytes.as_slice()).unwrap().decrypt(&dec).unwrap().payload().len(),
            );
        });
        let seal_row = Row::baseline(format!("{size} B: raw AEAD seal")).latency(Latency::of(&mut seal));
        let enc_row =
            Row::new(format!("{size} B: SFrame encrypt")).latency(Latency::of(&mut encrypt)).against(&seal_row, "p50");
        let open_row = Row::baseline(format!("{size} B: raw AEAD open")).latency(Latency::of(&mut open));
        let dec_row =
            Row::new(format!("{size} B: SFrame decrypt")).latency(Latency::of(&mut decrypt)).against(&open_row, "p50");
        if size == 160 {
            // What a 25-person call's audio costs one device per second:
            // 24 senders x 50 frames, opened, plus its own 50 sealed.
            let per_sec_us = dec_row.latency.map_or(0.0, |l| l.p50_us) * 24.0 * 50.0
                + enc_row.latency.map_or(0.0, |l| l.p50_us) * 50.0;
            s.notes.push(format!(
                "audio of a 25-person call costs a device about {:.2} ms of CPU per second in SFrame",
                per_sec_us / 1000.0
            ));
        }
        s.rows.extend([seal_row, enc_row, open_row, dec_row]);
    }
    Ok(s)
}
