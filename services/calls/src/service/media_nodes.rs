//! `MediaNodes`: media nodes registering themselves, and operators'
//! credentials for them.

use super::*;

#[tonic::async_trait]
impl MediaNodes for MediaNodesApi {
    type WatchRoomsStream = Pin<Box<dyn Stream<Item = Result<pb::MediaRooms, Status>> + Send>>;

    async fn watch_rooms(
        &self,
        req: Request<pb::WatchRoomsRequest>,
    ) -> Result<Response<Self::WatchRoomsStream>, Status> {
        let mine = Caller::of(&req)?.require_media_node()?.to_string();
        let id = media::node_id(&req.get_ref().node_id)?.to_string();
        if id != mine {
            return Err(CallError::Forbidden("this credential watches another media node's rooms").into());
        }
        let bearer = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_string();
        let node = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let length = Duration::from_secs(node.config.media_admission_secs.max(1));
            let mut last: Option<pb::MediaRooms> = None;
            // (calls revision, token period) of `last`: the rooms are only
            // worked out again when one of them moved.
            let mut last_mark = None;
            loop {
                // The stream ends with its node's drain and its credential.
                if node.rt.drain.is_cancelled() {
                    let _ = tx.send(Err(spine_runtime::error::draining("node draining: reconnect"))).await;
                    return;
                }
                if node.rt.auth.authenticate(&bearer, now_secs()).is_err() {
                    let _ = tx.send(Err(spine_runtime::auth::stream_ended(false))).await;
                    return;
                }
                let now = now_secs();
                let mark = Some((node.cluster.calls_revision(), crate::admission::period(now, length)));
                if mark != last_mark {
                    last_mark = mark;
                    let rooms = node.cluster.rooms_on(&id, now, length);
                    if last.as_ref() != Some(&rooms) {
                        if tx.send(Ok(rooms.clone())).await.is_err() {
                            return;
                        }
                        last = Some(rooms);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn register_media_node(
        &self,
        req: Request<pb::RegisterMediaNodeRequest>,
    ) -> Result<Response<pb::RegisterMediaNodeResponse>, Status> {
        let mine = Caller::of(&req)?.require_media_node()?.to_string();
        let r = req.get_ref();
        media::node_id(&r.node_id)?;
        if r.node_id != mine {
            return Err(CallError::Forbidden("this credential registers another media node").into());
        }
        if r.address.is_empty()
            || r.address.len() > 256
            || r.address.chars().any(|c| c.is_control() || c.is_whitespace() || ids::is_bidi_control(c))
        {
            return Err(invalid("address", "1 to 256 characters, no spaces or control characters").into());
        }
        if r.region.is_empty()
            || r.region.len() > 32
            || !r.region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid("region", "1 to 32 characters of a-z, 0-9 and '-'").into());
        }
        if r.capacity == 0 {
            return Err(invalid("capacity", "at least 1").into());
        }
        let ttl = match r.ttl_seconds {
            0 => 15,
            t @ 5..=60 => t,
            _ => return Err(invalid("ttl_seconds", "5 to 60").into()),
        };
        let rec = MediaRec {
            address: r.address.clone(),
            region: r.region.clone(),
            capacity: r.capacity,
            load: r.load,
            updated_at: now_secs(),
        };
        media::register(&self.0.rt.system_store(), &r.node_id, &rec, Duration::from_secs(u64::from(ttl))).await?;
        Ok(Response::new(pb::RegisterMediaNodeResponse { ttl_seconds: ttl }))
    }

    async fn deregister_media_node(
        &self,
        req: Request<pb::DeregisterMediaNodeRequest>,
    ) -> Result<Response<pb::DeregisterMediaNodeResponse>, Status> {
        let mine = Caller::of(&req)?.require_media_node()?.to_string();
        let id = media::node_id(&req.get_ref().node_id)?;
        if id != mine {
            return Err(CallError::Forbidden("this credential deregisters another media node").into());
        }
        media::deregister(&self.0.rt.system_store(), id).await?;
        Ok(Response::new(pb::DeregisterMediaNodeResponse {}))
    }

    async fn list_media_nodes(
        &self,
        req: Request<pb::ListMediaNodesRequest>,
    ) -> Result<Response<pb::ListMediaNodesResponse>, Status> {
        Caller::of(&req)?.require_operator()?;
        let nodes = media::list(&self.0.rt.system_store())
            .await?
            .into_iter()
            .map(|(id, r)| pb::RegisteredMediaNode {
                node_id: id,
                address: r.address,
                region: r.region,
                capacity: r.capacity,
                load: r.load,
                updated_at: Some(prost_types::Timestamp { seconds: r.updated_at, nanos: 0 }),
            })
            .collect();
        Ok(Response::new(pb::ListMediaNodesResponse { nodes }))
    }

    async fn issue_media_node_credential(
        &self,
        req: Request<pb::IssueMediaNodeCredentialRequest>,
    ) -> Result<Response<pb::MediaNodeCredential>, Status> {
        Caller::of(&req)?.require_operator()?;
        let rt = &self.0.rt;
        let cred = media::issue_credential(
            &rt.system_store(),
            &self.0.idem_lease,
            |k, v| rt.auth.observe(k, v),
            req.get_ref(),
        )
        .await?;
        Ok(Response::new(cred))
    }

    async fn list_media_node_credentials(
        &self,
        req: Request<pb::ListMediaNodeCredentialsRequest>,
    ) -> Result<Response<pb::ListMediaNodeCredentialsResponse>, Status> {
        Caller::of(&req)?.require_operator()?;
        let credentials = media::credentials(&self.0.rt.system_store()).await?;
        Ok(Response::new(pb::ListMediaNodeCredentialsResponse { credentials }))
    }

    async fn revoke_media_node_credential(
        &self,
        req: Request<pb::RevokeMediaNodeCredentialRequest>,
    ) -> Result<Response<pb::RevokeMediaNodeCredentialResponse>, Status> {
        Caller::of(&req)?.require_operator()?;
        let rt = &self.0.rt;
        media::revoke_credential(&rt.system_store(), |k, v| rt.auth.observe(k, v), &req.get_ref().credential_id)
            .await?;
        Ok(Response::new(pb::RevokeMediaNodeCredentialResponse {}))
    }
}
