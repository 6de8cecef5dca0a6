//! A reference media device for group calls: what a frontend's media code
//! does, in Rust, so the path is tested end to end with a real SFU.
//!
//! With its admission (`Calls.GetMediaAdmission`) it joins the call's room
//! on the media node (Janus VideoRoom, over Janus's HTTP API) as the
//! participant it was given, publishes one audio track over WebRTC (str0m,
//! one UDP socket per peer connection), and subscribes to every other
//! publisher of the room, each in a peer connection of its own. Every frame
//! it sends is sealed by its [`FrameCrypto`] (SFrame with the MLS group's
//! keys, in Spine's use) before it leaves, and every frame it receives is
//! opened by it: the SFU forwards ciphertext only. [`Stats`] counts what
//! was sent, opened and not opened, per publisher.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spine_janus::client::{Handle, Janus, JanusError, Session};
use spine_proto::calls::v1 as pb;
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// How a device seals the frames it sends and opens those it receives
/// (SFrame with the current MLS epoch's keys, for Spine's devices).
pub trait FrameCrypto: Send + Sync + 'static {
    /// The frame to send for `payload`, or None if it cannot be sealed now.
    fn seal(&self, payload: &[u8]) -> Option<Vec<u8>>;
    /// The payload of a received frame, or None if it does not open.
    fn open(&self, frame: &[u8]) -> Option<Vec<u8>>;
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("janus: {0}")]
    Janus(#[from] JanusError),
    /// The room refused the device (no token, a wrong or expired one, ...).
    #[error("refused by the room: {code} {message}")]
    Refused { code: i64, message: String },
    #[error("webrtc: {0}")]
    Rtc(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

fn rtc_err(e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Rtc(e.to_string())
}

fn refused(e: JanusError) -> DeviceError {
    match e {
        JanusError::Plugin { code, message } => DeviceError::Refused { code, message },
        e => DeviceError::Janus(e),
    }
}

/// What a device saw.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Frames sent (sealed).
    pub sent: u64,
    /// Payloads opened, per publisher (participant id), the last few kept.
    pub opened: BTreeMap<u64, Vec<Vec<u8>>>,
    /// How many frames opened, per publisher.
    pub opened_count: BTreeMap<u64, u64>,
    /// Frames received that did not open, per publisher.
    pub unopened: BTreeMap<u64, u64>,
    /// Bytes received from the SFU, per publisher (ciphertext).
    pub received_bytes: BTreeMap<u64, u64>,
    /// Janus kicked this device out of the room.
    pub kicked: bool,
}

/// A device in a call's room.
pub struct MediaDevice {
    session: Session,
    publisher: Option<Arc<Handle>>,
    stats: Arc<Mutex<Stats>>,
    stop: CancellationToken,
    participant_id: u64,
}

impl std::fmt::Debug for MediaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaDevice").field("participant_id", &self.participant_id).finish()
    }
}

impl Drop for MediaDevice {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How long a join refused as not (yet) admitted is retried.
pub const JOIN_PATIENCE: Duration = Duration::from_secs(3);
/// VideoRoom's "not in the allowed list" and "no such room".
const NOT_ALLOWED: i64 = 433;
const NO_SUCH_ROOM: i64 = 426;

/// How often a frame is sent (as an audio codec's 20 ms).
pub const FRAME_INTERVAL: Duration = Duration::from_millis(20);

impl MediaDevice {
    /// Joins the room of `admission` as its participant, publishes, and
    /// subscribes to everyone publishing there now and later. `name` goes
    /// into each frame's payload (`<name>|<sequence number>`) before it is
    /// sealed.
    pub async fn join(
        admission: &pb::MediaAdmission,
        name: &str,
        crypto: Arc<dyn FrameCrypto>,
    ) -> Result<Self, DeviceError> {
        Self::join_as(admission, admission.participant_id, name, crypto).await
    }

    /// As [`MediaDevice::join`], under another participant id than the one
    /// admitted (what a misbehaving client might try).
    pub async fn join_as(
        admission: &pb::MediaAdmission,
        participant_id: u64,
        name: &str,
        crypto: Arc<dyn FrameCrypto>,
    ) -> Result<Self, DeviceError> {
        let janus = Janus::new(&admission.address);
        let session = janus.session().await?;
        let publisher = Arc::new(session.attach(spine_janus::agent::VIDEOROOM).await?);
        // A fresh admission reaches the room within a second or so (the
        // media node's agent applies it): a refusal is retried for a while.
        let deadline = Instant::now() + JOIN_PATIENCE;
        let joined = loop {
            let r = publisher
                .send(
                    json!({"request": "join", "ptype": "publisher", "room": admission.room_id,
                           "id": participant_id, "token": admission.token, "display": name}),
                    None,
                )
                .await;
            match r {
                Ok((joined, _)) => break joined,
                Err(JanusError::Plugin { code: NOT_ALLOWED | NO_SUCH_ROOM, .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(refused(e)),
            }
        };
        let stats = Arc::new(Mutex::new(Stats::default()));
        let stop = CancellationToken::new();

        // Publish one send-only audio track.
        let (rtc, socket) = new_rtc().await?;
        let mut rtc = rtc;
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let (offer, pending) = api.apply().ok_or_else(|| rtc_err("no offer"))?;
        let (_, jsep) = publisher
            .send(
                json!({"request": "publish", "audio": true, "video": false}),
                Some(json!({"type": "offer", "sdp": offer.to_sdp_string()})),
            )
            .await
            .map_err(refused)?;
        let answer = jsep.and_then(|j| j["sdp"].as_str().map(str::to_string)).ok_or_else(|| rtc_err("no answer"))?;
        tracing::debug!(offer = %offer.to_sdp_string(), %answer, "published");
        rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer).map_err(rtc_err)?).map_err(rtc_err)?;
        publisher.trickle(None).await?;
        let sender = Sender { mid, crypto: crypto.clone(), name: name.to_string(), stats: stats.clone() };
        tokio::spawn(drive(rtc, socket, Some(sender), None, stop.clone()));

        let device = Self { session, publisher: Some(publisher.clone()), stats, stop, participant_id };
        // Everyone already publishing, then whoever comes.
        let mut subscribed = HashSet::new();
        device.subscribe_all(&joined, admission, crypto.clone(), &mut subscribed).await;
        tokio::spawn(watch_room(
            device.session.clone(),
            publisher,
            admission.clone(),
            crypto,
            device.stats.clone(),
            device.stop.clone(),
            subscribed,
            participant_id,
        ));
        Ok(device)
    }

    async fn subscribe_all(
        &self,
        data: &Value,
        admission: &pb::MediaAdmission,
        crypto: Arc<dyn FrameCrypto>,
        subscribed: &mut HashSet<u64>,
    ) {
        for feed in publishers(data) {
            if feed != self.participant_id && subscribed.insert(feed) {
                let r =
                    subscribe(&self.session, admission, feed, crypto.clone(), self.stats.clone(), self.stop.clone())
                        .await;
                if let Err(e) = r {
                    tracing::warn!(feed, error = %e, "subscription failed");
                    subscribed.remove(&feed);
                }
            }
        }
    }

    /// What this device has seen so far.
    pub fn stats(&self) -> Stats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// Subscribes to one publisher's feed (with this device's token), as
    /// a test would to check that a wrong token is refused.
    pub async fn subscribe_with(
        &self,
        admission: &pb::MediaAdmission,
        feed: u64,
        crypto: Arc<dyn FrameCrypto>,
    ) -> Result<(), DeviceError> {
        subscribe(&self.session, admission, feed, crypto, self.stats.clone(), self.stop.clone()).await
    }

    /// Subscribes to `feeds` of the room of `admission` without joining it
    /// as a publisher: a listener (a test's eavesdropper, with a token the
    /// test put on the room itself).
    pub async fn listen(
        admission: &pb::MediaAdmission,
        feeds: &[u64],
        crypto: Arc<dyn FrameCrypto>,
    ) -> Result<Self, DeviceError> {
        let session = Janus::new(&admission.address).session().await?;
        let device = Self {
            session,
            publisher: None,
            stats: Default::default(),
            stop: CancellationToken::new(),
            participant_id: 0,
        };
        for feed in feeds {
            device.subscribe_with(admission, *feed, crypto.clone()).await?;
        }
        Ok(device)
    }

    /// Leaves the room and ends the Janus session.
    pub async fn leave(self) {
        if let Some(p) = &self.publisher {
            let _ = p.send(json!({"request": "leave"}), None).await;
        }
        let _ = self.session.destroy().await;
        self.stop.cancel();
    }
}

/// The publisher ids in a VideoRoom `joined` or `event` message.
fn publishers(data: &Value) -> Vec<u64> {
    data["publishers"].as_array().into_iter().flatten().filter_map(|p| p["id"].as_u64()).collect()
}

/// Follows the room's events on the publisher handle: new publishers are
/// subscribed to; a kick is recorded.
#[allow(clippy::too_many_arguments)]
async fn watch_room(
    session: Session,
    publisher: Arc<Handle>,
    admission: pb::MediaAdmission,
    crypto: Arc<dyn FrameCrypto>,
    stats: Arc<Mutex<Stats>>,
    stop: CancellationToken,
    mut subscribed: HashSet<u64>,
    me: u64,
) {
    while !stop.is_cancelled() {
        let Some(e) = publisher.next_event(Duration::from_millis(500), |e| e["janus"] == "event").await else {
            continue;
        };
        let data = &e["plugindata"]["data"];
        if data["leaving"] == "ok" && data["reason"] == "kicked" {
            stats.lock().expect("stats lock").kicked = true;
        }
        for feed in publishers(data) {
            if feed != me
                && subscribed.insert(feed)
                && let Err(err) =
                    subscribe(&session, &admission, feed, crypto.clone(), stats.clone(), stop.clone()).await
            {
                tracing::warn!(feed, error = %err, "subscription failed");
                subscribed.remove(&feed);
            }
        }
    }
}

/// One subscription: Janus offers, we answer, frames are opened as they
/// come.
async fn subscribe(
    session: &Session,
    admission: &pb::MediaAdmission,
    feed: u64,
    crypto: Arc<dyn FrameCrypto>,
    stats: Arc<Mutex<Stats>>,
    stop: CancellationToken,
) -> Result<(), DeviceError> {
    let handle = session.attach(spine_janus::agent::VIDEOROOM).await?;
    let (_, jsep) = handle
        .send(
            json!({"request": "join", "ptype": "subscriber", "room": admission.room_id,
                   "streams": [{"feed": feed}], "token": admission.token}),
            None,
        )
        .await
        .map_err(refused)?;
    let offer = jsep.and_then(|j| j["sdp"].as_str().map(str::to_string)).ok_or_else(|| rtc_err("no offer"))?;
    let (mut rtc, socket) = new_rtc().await?;
    let answer = rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&offer).map_err(rtc_err)?).map_err(rtc_err)?;
    handle
        .send(json!({"request": "start"}), Some(json!({"type": "answer", "sdp": answer.to_sdp_string()})))
        .await
        .map_err(refused)?;
    handle.trickle(None).await?;
    let receiver = Receiver { feed, crypto, stats };
    tokio::spawn(async move {
        let _handle = handle; // the subscription lives as long as its loop
        drive(rtc, socket, None, Some(receiver), stop).await;
    });
    Ok(())
}

/// The address media goes from: this host's first IPv4 address that is
/// not loopback. Janus never gathers ICE candidates on loopback, so even
/// on one machine media flows over the host's own interface address (it
/// never leaves the host).
pub fn media_ip() -> Result<std::net::IpAddr, DeviceError> {
    if_addrs::get_if_addrs()?
        .into_iter()
        .filter(|i| !i.is_loopback())
        .map(|i| i.ip())
        .find(std::net::IpAddr::is_ipv4)
        .ok_or_else(|| rtc_err("no IPv4 address but loopback: Janus has no ICE candidate to offer"))
}

async fn new_rtc() -> Result<(Rtc, UdpSocket), DeviceError> {
    let socket = UdpSocket::bind((media_ip()?, 0)).await?;
    let mut rtc = Rtc::new(Instant::now());
    let local = socket.local_addr()?;
    rtc.add_local_candidate(Candidate::host(local, "udp").map_err(rtc_err)?);
    Ok((rtc, socket))
}

struct Sender {
    mid: Mid,
    crypto: Arc<dyn FrameCrypto>,
    name: String,
    stats: Arc<Mutex<Stats>>,
}

struct Receiver {
    feed: u64,
    crypto: Arc<dyn FrameCrypto>,
    stats: Arc<Mutex<Stats>>,
}

/// Drives one peer connection: its socket, its timers, and for a
/// publisher a sealed frame every [`FRAME_INTERVAL`] once connected.
async fn drive(
    mut rtc: Rtc,
    socket: UdpSocket,
    sender: Option<Sender>,
    receiver: Option<Receiver>,
    stop: CancellationToken,
) {
    let local: SocketAddr = match socket.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let mut buf = vec![0u8; 2000];
    let mut connected = false;
    let mut seq: u64 = 0;
    let mut next_frame = Instant::now();
    loop {
        // Drain the engine to its next timeout.
        let timeout = loop {
            match rtc.poll_output() {
                Ok(Output::Timeout(t)) => break t,
                Ok(Output::Transmit(t)) => {
                    let _ = socket.send_to(&t.contents, t.destination).await;
                }
                Ok(Output::Event(e)) => match e {
                    Event::Connected => connected = true,
                    Event::IceConnectionStateChange(IceConnectionState::Disconnected) => return,
                    Event::MediaData(d) => {
                        if let Some(r) = &receiver {
                            let opened = r.crypto.open(&d.data);
                            let mut s = r.stats.lock().expect("stats lock");
                            *s.received_bytes.entry(r.feed).or_default() += d.data.len() as u64;
                            match opened {
                                Some(p) => {
                                    *s.opened_count.entry(r.feed).or_default() += 1;
                                    let kept = s.opened.entry(r.feed).or_default();
                                    kept.push(p);
                                    if kept.len() > 50 {
                                        kept.remove(0);
                                    }
                                }
                                None => *s.unopened.entry(r.feed).or_default() += 1,
                            }
                        }
                    }
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!(error = %e, "peer connection failed");
                    return;
                }
            }
        };
        let sending = sender.is_some() && connected;
        let wake = if sending { timeout.min(next_frame) } else { timeout };
        let input = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, source)) => match Receive::new(Protocol::Udp, source, local, &buf[..n]) {
                    Ok(rx) => Some(Input::Receive(Instant::now(), rx)),
                    Err(_) => None,
                },
                Err(_) => None,
            },
            _ = tokio::time::sleep_until(wake.into()) => {
                let now = Instant::now();
                if sending && now >= next_frame {
                    if let Some(s) = &sender {
                        send_frame(&mut rtc, s, seq, now);
                        seq += 1;
                    }
                    next_frame += FRAME_INTERVAL;
                    if next_frame < now {
                        next_frame = now + FRAME_INTERVAL;
                    }
                    None
                } else {
                    Some(Input::Timeout(now))
                }
            }
        };
        if let Some(input) = input
            && rtc.handle_input(input).is_err()
        {
            return;
        }
    }
}

fn send_frame(rtc: &mut Rtc, s: &Sender, seq: u64, now: Instant) {
    let payload = format!("{}|{seq}", s.name);
    let Some(frame) = s.crypto.seal(payload.as_bytes()) else { return };
    let Some(writer) = rtc.writer(s.mid) else { return };
    let Some(pt) = writer.payload_params().next().map(|p| p.pt()) else { return };
    let time = MediaTime::new(seq * 960, Frequency::FORTY_EIGHT_KHZ);
    if writer.write(pt, now, time, frame).is_ok() {
        s.stats.lock().expect("stats lock").sent += 1;
    }
}
