//! A client of Janus's HTTP API (the `janus.transport.http` plugin): sessions,
//! plugin handles, messages with their synchronous answers, and the
//! asynchronous events of a session, routed to the handle they are for.
//!
//! Janus answers a plugin message either at once (`success`, with the
//! plugin's data: VideoRoom `create`, `allowed`, `kick`, `listparticipants`)
//! or with an `ack`, the answer coming later as an `event` on the session's
//! long poll (`join`, `publish`, `start`). [`Handle::request`] returns the
//! former, [`Handle::send`] waits for the latter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// What went wrong talking to Janus.
#[derive(Debug, thiserror::Error)]
pub enum JanusError {
    #[error("janus unreachable: {0}")]
    Http(String),
    #[error("janus answered {0}")]
    Janus(String),
    /// A plugin's error (VideoRoom: `error_code` and `error`).
    #[error("plugin error {code}: {message}")]
    Plugin { code: i64, message: String },
    #[error("no answer from janus in time")]
    Timeout,
}

type Http = Client<HttpConnector, Full<Bytes>>;

/// A Janus HTTP API endpoint (`http://host:port/janus`).
#[derive(Clone)]
pub struct Janus {
    base: String,
    http: Http,
}

impl std::fmt::Debug for Janus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Janus").field("base", &self.base).finish()
    }
}

fn transaction() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Janus {
    pub fn new(base: impl Into<String>) -> Self {
        let http = Client::builder(TokioExecutor::new()).build_http();
        Self { base: base.into().trim_end_matches('/').to_string(), http }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(&self, method: http::Method, path: &str, body: Option<Value>) -> Result<Value, JanusError> {
        let uri = format!("{}{path}", self.base);
        let bytes = body.map(|b| serde_json::to_vec(&b).expect("json")).unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| JanusError::Http(e.to_string()))?;
        let res = self.http.request(req).await.map_err(|e| JanusError::Http(e.to_string()))?;
        let body = res.into_body().collect().await.map_err(|e| JanusError::Http(e.to_string()))?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| JanusError::Janus(format!("not JSON: {e}")))
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, JanusError> {
        let v = self.call(http::Method::POST, path, Some(body)).await?;
        match v["janus"].as_str() {
            Some("success" | "ack" | "event") => Ok(v),
            _ => Err(JanusError::Janus(v["error"].to_string())),
        }
    }

    /// Whether Janus answers at all (`GET /info`).
    pub async fn info(&self) -> Result<Value, JanusError> {
        self.call(http::Method::GET, "/info", None).await
    }

    /// A new session, with its event poller running until it is dropped.
    pub async fn session(&self) -> Result<Session, JanusError> {
        let v = self.post("", json!({"janus": "create", "transaction": transaction()})).await?;
        let id = v["data"]["id"].as_u64().ok_or_else(|| JanusError::Janus(v.to_string()))?;
        let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
        let poller = tokio::spawn(poll(self.clone(), id, routes.clone()));
        Ok(Session { janus: self.clone(), id, routes, poller: Arc::new(Poller(poller)) })
    }
}

type Routes = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Value>>>>;

struct Poller(tokio::task::JoinHandle<()>);

impl Drop for Poller {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Long-polls a session's events and hands each to its handle. The long
/// poll also keeps the session alive.
async fn poll(janus: Janus, session: u64, routes: Routes) {
    loop {
        let v = match janus.call(http::Method::GET, &format!("/{session}?maxev=10"), None).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "janus event poll failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let events = match v {
            Value::Array(a) => a,
            other => vec![other],
        };
        for e in events {
            if e["janus"] == "keepalive" {
                continue;
            }
            let Some(sender) = e["sender"].as_u64() else { continue };
            if let Some(tx) = routes.lock().expect("routes lock").get(&sender) {
                let _ = tx.send(e);
            }
        }
    }
}

/// A Janus session (`POST /janus`), with its handles.
#[derive(Clone)]
pub struct Session {
    janus: Janus,
    pub id: u64,
    routes: Routes,
    poller: Arc<Poller>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("id", &self.id).finish()
    }
}

impl Session {
    /// Attaches a plugin (`janus.plugin.videoroom`).
    pub async fn attach(&self, plugin: &str) -> Result<Handle, JanusError> {
        let v = self
            .janus
            .post(&format!("/{}", self.id), json!({"janus": "attach", "plugin": plugin, "transaction": transaction()}))
            .await?;
        let id = v["data"]["id"].as_u64().ok_or_else(|| JanusError::Janus(v.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().expect("routes lock").insert(id, tx);
        Ok(Handle { session: self.clone(), id, events: tokio::sync::Mutex::new(rx) })
    }

    /// Ends the session (and its handles: their peer connections close).
    pub async fn destroy(&self) -> Result<(), JanusError> {
        self.janus.post(&format!("/{}", self.id), json!({"janus": "destroy", "transaction": transaction()})).await?;
        self.poller.0.abort();
        Ok(())
    }
}

/// A plugin handle.
#[derive(Debug)]
pub struct Handle {
    session: Session,
    pub id: u64,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<Value>>,
}

/// A plugin's data, or its error.
fn plugin_data(v: &Value) -> Result<Value, JanusError> {
    let data = &v["plugindata"]["data"];
    if let Some(code) = data["error_code"].as_i64() {
        return Err(JanusError::Plugin { code, message: data["error"].as_str().unwrap_or_default().to_string() });
    }
    Ok(data.clone())
}

impl Handle {
    fn path(&self) -> String {
        format!("/{}/{}", self.session.id, self.id)
    }

    /// A plugin request answered at once: its data.
    pub async fn request(&self, body: Value) -> Result<Value, JanusError> {
        let v = self
            .session
            .janus
            .post(&self.path(), json!({"janus": "message", "body": body, "transaction": transaction()}))
            .await?;
        plugin_data(&v)
    }

    /// A plugin request answered by an event (with an optional JSEP offer
    /// or answer both ways): the event's data and JSEP.
    pub async fn send(&self, body: Value, jsep: Option<Value>) -> Result<(Value, Option<Value>), JanusError> {
        let tx = transaction();
        let mut msg = json!({"janus": "message", "body": body, "transaction": tx});
        if let Some(j) = jsep {
            msg["jsep"] = j;
        }
        let first = self.session.janus.post(&self.path(), msg).await?;
        if first["janus"] == "success" {
            return Ok((plugin_data(&first)?, None));
        }
        let mut events = self.events.lock().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let e = tokio::time::timeout_at(deadline, events.recv()).await.map_err(|_| JanusError::Timeout)?;
            let Some(e) = e else { return Err(JanusError::Janus("session gone".into())) };
            if e["transaction"].as_str() == Some(tx.as_str()) && e["janus"] == "event" {
                return Ok((plugin_data(&e)?, e.get("jsep").cloned()));
            }
        }
    }

    /// The next asynchronous event for this handle that `pick` takes.
    pub async fn next_event(&self, within: Duration, pick: impl Fn(&Value) -> bool) -> Option<Value> {
        let mut events = self.events.lock().await;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(e)) if pick(&e) => return Some(e),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Trickles an ICE candidate (or, with `None`, the end of them).
    pub async fn trickle(&self, candidate: Option<Value>) -> Result<(), JanusError> {
        let c = candidate.unwrap_or_else(|| json!({"completed": true}));
        self.session
            .janus
            .post(&self.path(), json!({"janus": "trickle", "candidate": c, "transaction": transaction()}))
            .await?;
        Ok(())
    }

    /// Detaches the plugin handle.
    pub async fn detach(&self) -> Result<(), JanusError> {
        self.session.janus.post(&self.path(), json!({"janus": "detach", "transaction": transaction()})).await?;
        Ok(())
    }
}
