//! The media-node agent (`spine media-agent`): runs beside one Janus, with
//! a media-node credential of its own, and
//! - registers the Janus with Spine (its public address, region, capacity)
//!   and refreshes the registration with its load (participants in its
//!   rooms) every third of the registration's TTL; deregisters on shutdown;
//! - follows `MediaNodes.WatchRooms` and makes Janus's VideoRoom rooms what
//!   Spine says: each call's room is created with a secret no device knows
//!   (derived from the room admin key, so a restarted agent can still manage
//!   its rooms), only the listed tokens may join it (VideoRoom's `allowed`
//!   list), participants not listed are kicked, and rooms no longer listed
//!   are destroyed. It reconciles again every two seconds, so a restarted
//!   Janus gets its rooms back and a participant that joined under an id it
//!   was not given is kicked.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::media_nodes_client::MediaNodesClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::client::{Handle, Janus, JanusError, Session};

pub const VIDEOROOM: &str = "janus.plugin.videoroom";
/// VideoRoom's "room already exists".
const ROOM_EXISTS: i64 = 427;
/// VideoRoom's "no such room".
const NO_SUCH_ROOM: i64 = 426;

/// What the agent needs.
#[derive(Clone)]
pub struct AgentConfig {
    /// This media node's id (the credential's).
    pub node_id: String,
    /// The media-node credential (`mc_...`).
    pub credential: String,
    /// Janus's HTTP API, as the agent reaches it (`http://127.0.0.1:8088/janus`).
    pub janus: String,
    /// Janus's HTTP API as devices reach it: registered with Spine as the
    /// node's address.
    pub public_address: String,
    pub region: String,
    /// Most participants this Janus takes.
    pub capacity: u32,
    /// VideoRoom's `admin_key` (rooms can be created only with it).
    pub room_admin_key: String,
    /// Registration TTL (seconds, 5 to 60).
    pub ttl_secs: u32,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("node_id", &self.node_id)
            .field("janus", &self.janus)
            .field("public_address", &self.public_address)
            .field("region", &self.region)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("janus: {0}")]
    Janus(#[from] JanusError),
    #[error("spine: {0}")]
    Spine(#[from] tonic::Status),
}

fn authed<T>(msg: T, credential: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {credential}").parse().expect("ascii credential"));
    r
}

/// A room's admin secret: derived from the room admin key, never sent to
/// Spine or to devices.
pub fn room_secret(admin_key: &str, room: u64) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(admin_key.as_bytes()).expect("any key length");
    m.update(b"spine room secret\0");
    m.update(&room.to_be_bytes());
    hex::encode(&m.finalize().into_bytes()[..16])
}

/// The rooms this agent keeps on its Janus.
struct Rooms {
    janus: Janus,
    admin_key: String,
    conn: Option<(Session, Handle)>,
    /// Rooms this agent made (or found and took over).
    managed: HashSet<u64>,
    /// The last desired state from Spine.
    desired: Option<pb::MediaRooms>,
    load: Arc<AtomicU32>,
}

impl Rooms {
    async fn handle(&mut self) -> Result<&Handle, JanusError> {
        if self.conn.is_none() {
            let s = self.janus.session().await?;
            let h = s.attach(VIDEOROOM).await?;
            self.conn = Some((s, h));
        }
        Ok(&self.conn.as_ref().expect("just set").1)
    }

    /// Makes Janus match the last desired state. On a Janus error the
    /// connection is dropped, to be made again at the next try.
    async fn reconcile(&mut self) {
        let Some(desired) = self.desired.clone() else { return };
        if let Err(e) = self.apply(&desired).await {
            tracing::warn!(error = %e, "media rooms not reconciled; trying again");
            self.conn = None;
        }
    }

    async fn apply(&mut self, desired: &pb::MediaRooms) -> Result<(), JanusError> {
        let key = self.admin_key.clone();
        let managed = self.managed.clone();
        let h = self.handle().await?;
        let mut load = 0u32;
        let mut present = HashSet::new();
        for room in &desired.rooms {
            let id = room.room_id;
            let secret = room_secret(&key, id);
            let tokens: BTreeSet<&str> =
                room.participants.iter().flat_map(|p| p.tokens.iter().map(String::as_str)).collect();
            let created = h
                .request(json!({
                    "request": "create", "room": id, "secret": secret, "admin_key": key,
                    "is_private": true, "permanent": false, "publishers": 64,
                    "allowed": tokens, "audiocodec": "opus", "videocodec": "vp8,vp9,h264",
                    "description": "spine call",
                }))
                .await;
            match created {
                Ok(_) => {}
                Err(JanusError::Plugin { code: ROOM_EXISTS, .. }) => {
                    // Make its allowed list exactly the tokens.
                    let now = h
                        .request(
                            json!({"request": "allowed", "room": id, "secret": secret, "action": "add", "allowed": []}),
                        )
                        .await?;
                    let have: BTreeSet<String> = now["allowed"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
                        .unwrap_or_default();
                    let stale: Vec<&String> = have.iter().filter(|t| !tokens.contains(t.as_str())).collect();
                    let missing: Vec<&&str> = tokens.iter().filter(|t| !have.contains(**t)).collect();
                    if !stale.is_empty() {
                        h.request(json!({"request": "allowed", "room": id, "secret": secret, "action": "remove", "allowed": stale}))
                            .await?;
                    }
                    if !missing.is_empty() {
                        h.request(json!({"request": "allowed", "room": id, "secret": secret, "action": "add", "allowed": missing}))
                            .await?;
                    }
                }
                Err(e) => return Err(e),
            }
            present.insert(id);
            // Kick whoever is in the room and not admitted.
            let admitted: HashSet<u64> = room.participants.iter().map(|p| p.participant_id).collect();
            let list = h.request(json!({"request": "listparticipants", "room": id})).await?;
            for p in list["participants"].as_array().into_iter().flatten() {
                let Some(pid) = p["id"].as_u64() else { continue };
                if admitted.contains(&pid) {
                    load += 1;
                } else {
                    tracing::info!(room = id, participant = pid, "kicking a participant not admitted");
                    match h.request(json!({"request": "kick", "room": id, "secret": secret, "id": pid})).await {
                        Ok(_) | Err(JanusError::Plugin { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        let gone: Vec<u64> = managed.difference(&present).copied().collect();
        for id in gone {
            match h.request(json!({"request": "destroy", "room": id, "secret": room_secret(&key, id)})).await {
                Ok(_) | Err(JanusError::Plugin { code: NO_SUCH_ROOM, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.managed = present;
        self.load.store(load, Ordering::Relaxed);
        Ok(())
    }
}

/// Runs the agent until `shutdown` resolves, then deregisters. Spine is
/// reached over `channel`.
pub async fn run(
    config: AgentConfig,
    channel: Channel,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let janus = Janus::new(&config.janus);
    let load = Arc::new(AtomicU32::new(0));
    let rooms = Arc::new(Mutex::new(Rooms {
        janus: janus.clone(),
        admin_key: config.room_admin_key.clone(),
        conn: None,
        managed: HashSet::new(),
        desired: None,
        load: load.clone(),
    }));
    let ttl = config.ttl_secs.clamp(5, 60);

    // Registration with the current load; refreshed well inside the TTL.
    let register = {
        let (config, channel, load, janus) = (config.clone(), channel.clone(), load.clone(), janus.clone());
        async move {
            let mut client = MediaNodesClient::new(channel);
            loop {
                // Only a Janus that answers is offered to calls.
                if janus.info().await.is_ok() {
                    let r = pb::RegisterMediaNodeRequest {
                        node_id: config.node_id.clone(),
                        address: config.public_address.clone(),
                        region: config.region.clone(),
                        capacity: config.capacity,
                        load: load.load(Ordering::Relaxed),
                        ttl_seconds: ttl,
                    };
                    if let Err(e) = client.register_media_node(authed(r, &config.credential)).await {
                        tracing::warn!(error = %e, "media node registration failed");
                    }
                } else {
                    tracing::warn!(janus = %config.janus, "janus does not answer; not registering");
                }
                tokio::time::sleep(Duration::from_secs(u64::from(ttl) / 3)).await;
            }
        }
    };

    // The desired rooms from Spine, applied as they come.
    let watch = {
        let (config, channel, rooms) = (config.clone(), channel.clone(), rooms.clone());
        async move {
            let mut client = MediaNodesClient::new(channel);
            loop {
                let req = authed(pb::WatchRoomsRequest { node_id: config.node_id.clone() }, &config.credential);
                match client.watch_rooms(req).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(desired)) => {
                                    let mut r = rooms.lock().await;
                                    r.desired = Some(desired);
                                    r.reconcile().await;
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::info!(error = %e, "room watch ended; reconnecting");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "room watch refused"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };

    // And again every two seconds: Janus restarted, a straggler joined.
    let resync = {
        let rooms = rooms.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                rooms.lock().await.reconcile().await;
            }
        }
    };

    tokio::select! {
        _ = register => {}
        _ = watch => {}
        _ = resync => {}
        _ = shutdown => {}
    }
    let mut client = MediaNodesClient::new(channel);
    client
        .deregister_media_node(authed(
            pb::DeregisterMediaNodeRequest { node_id: config.node_id.clone() },
            &config.credential,
        ))
        .await?;
    Ok(())
}
