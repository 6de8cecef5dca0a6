//! Frames forwarded per second through one Janus (VideoRoom) on this
//! machine, with 3, 10 and 25 participants, each publishing one
//! SFrame-encrypted audio-sized frame every 20 ms and subscribing to every
//! other: offered load N x (N - 1) x 50 frames/s. Reports what the
//! subscribers received and opened per second over a 5-second window, as a
//! share of the offered load (the rest was dropped on the way: Janus, or
//! this machine's two cores, saturated). Everything runs on this machine:
//! Janus, and every device's peer connections in this process.
//! Run: `cargo bench -p spine-media-device --bench forwarding`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sframe::CipherSuite;
use sframe::frame::{EncryptedFrame, MediaFrame, MonotonicCounter};
use sframe::key::{DecryptionKey, EncryptionKey};
use spine_media_device::{FrameCrypto, MediaDevice};
use spine_proto::calls::v1 as pb;

const SECRET: &[u8] = b"forwarding bench base key";

/// SFrame with a fixed base key, one key id per sender.
struct Keys {
    enc: EncryptionKey,
    counter: Mutex<MonotonicCounter>,
    dec: Mutex<HashMap<u64, DecryptionKey>>,
}

impl FrameCrypto for Keys {
    fn seal(&self, payload: &[u8]) -> Option<Vec<u8>> {
        let mut c = self.counter.lock().unwrap();
        Some(MediaFrame::try_new(&mut *c, payload).ok()?.encrypt(&self.enc).ok()?.as_ref().to_vec())
    }
    fn open(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let f = EncryptedFrame::try_from(frame).ok()?;
        let kid = f.header().key_id();
        let mut dec = self.dec.lock().unwrap();
        let key = dec
            .entry(kid)
            .or_insert_with(|| DecryptionKey::derive_from(CipherSuite::AesGcm128Sha256, kid, SECRET).unwrap());
        Some(f.decrypt(&*key).ok()?.payload().to_vec())
    }
}

fn keys(id: u64) -> Arc<Keys> {
    Arc::new(Keys {
        enc: EncryptionKey::derive_from(CipherSuite::AesGcm128Sha256, id, SECRET).unwrap(),
        counter: Mutex::new(MonotonicCounter::default()),
        dec: Mutex::new(HashMap::new()),
    })
}

fn total(devices: &[MediaDevice]) -> (u64, u64) {
    devices.iter().fold((0, 0), |(o, u), d| {
        let s = d.stats();
        (o + s.opened_count.values().sum::<u64>(), u + s.unopened.values().sum::<u64>())
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let janus = spine_testing::JanusServer::start_with(2000).await;
    println!("participants  subscriptions  offered/s  delivered/s  opened/s  share");
    for (round, n) in [3u64, 10, 25].into_iter().enumerate() {
        let room = 1000 + round as u64;
        let session = spine_janus::Janus::new(&janus.url).session().await.unwrap();
        let admin = session.attach(spine_janus::agent::VIDEOROOM).await.unwrap();
        admin
            .request(json!({"request": "create", "room": room, "secret": "bench", "admin_key": janus.admin_key,
                            "publishers": 64, "allowed": ["bench"], "audiocodec": "opus"}))
            .await
            .unwrap();
        let mut devices = Vec::new();
        for i in 1..=n {
            let a = pb::MediaAdmission {
                address: janus.url.clone(),
                room_id: room,
                participant_id: i,
                token: "bench".into(),
                expires_at: None,
            };
            devices.push(MediaDevice::join(&a, &format!("p{i}"), keys(i)).await.unwrap());
        }
        // Every subscription flowing before measuring.
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            let ready = devices.iter().all(|d| d.stats().opened_count.len() as u64 == n - 1);
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let subscriptions: u64 = devices.iter().map(|d| d.stats().opened_count.len() as u64).sum();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (o0, u0) = total(&devices);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (o1, u1) = total(&devices);
        let secs = start.elapsed().as_secs_f64();
        let offered = (n * (n - 1) * 50) as f64;
        let delivered = ((o1 - o0) + (u1 - u0)) as f64 / secs;
        let opened = (o1 - o0) as f64 / secs;
        println!(
            "{n:>12}  {subscriptions:>13}  {offered:>9.0}  {delivered:>11.0}  {opened:>8.0}  {:>5.2}",
            delivered / offered
        );
        for d in devices {
            d.leave().await;
        }
        let _ = admin.request(json!({"request": "destroy", "room": room, "secret": "bench"})).await;
        let _ = session.destroy().await;
    }
}
