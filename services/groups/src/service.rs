//! The gRPC face of the groups service: every method is for devices.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use spine_proto::groups::v1 as pb;
use spine_proto::groups::v1::groups_server::Groups;
use spine_runtime::store::TenantStore;
use spine_runtime::{Caller, Principal};
use tonic::{Request, Response, Status};

use crate::error::GroupsError;
use crate::model::Device;
use crate::{
    APPLICATION_EPOCH_WINDOW, MAILBOX_RETENTION_SECS, MAX_KEY_PACKAGE_LIFETIME_SECS, MAX_KEY_PACKAGES, Node, delivery,
    keypackages, mailbox,
};

pub struct GroupsApi(pub(crate) Arc<Node>);

/// The calling device and its tenant's store.
fn device<T>(req: &Request<T>) -> Result<(TenantStore, Device), Status> {
    let caller = Caller::of(req)?;
    match caller.principal() {
        Principal::Device { tenant, account_id, device_id, .. } => Ok((
            caller.tenant_store().map_err(GroupsError::from)?,
            Device { tenant: tenant.to_string(), account: account_id.clone(), device: device_id.clone() },
        )),
        _ => Err(Status::permission_denied("groups methods are for devices (device tokens)")),
    }
}

fn ok<T>(r: crate::error::Result<T>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl Groups for GroupsApi {
    async fn get_service_info(
        &self,
        req: Request<pb::GetServiceInfoRequest>,
    ) -> Result<Response<pb::ServiceInfo>, Status> {
        device(&req)?;
        Ok(Response::new(pb::ServiceInfo {
            external_sender_signature_key: self.0.ds.public_key(),
            ciphersuite: 1,
            max_key_package_lifetime_seconds: MAX_KEY_PACKAGE_LIFETIME_SECS,
            max_key_packages: MAX_KEY_PACKAGES,
            mailbox_retention_seconds: MAILBOX_RETENTION_SECS,
            application_epoch_window: APPLICATION_EPOCH_WINDOW as u32,
        }))
    }

    async fn upload_key_packages(
        &self,
        req: Request<pb::UploadKeyPackagesRequest>,
    ) -> Result<Response<pb::KeyPackageCount>, Status> {
        let (t, me) = device(&req)?;
        let result = keypackages::upload(&self.0, &t, &me, req.into_inner()).await;
        crate::metrics::key_package("upload", if result.is_ok() { "accepted" } else { "rejected" });
        ok(result)
    }

    async fn count_key_packages(
        &self,
        req: Request<pb::CountKeyPackagesRequest>,
    ) -> Result<Response<pb::KeyPackageCount>, Status> {
        let (t, me) = device(&req)?;
        ok(keypackages::count(&t, &me).await)
    }

    async fn claim_key_packages(
        &self,
        req: Request<pb::ClaimKeyPackagesRequest>,
    ) -> Result<Response<pb::ClaimKeyPackagesResponse>, Status> {
        let (t, me) = device(&req)?;
        ok(keypackages::claim(&self.0, &t, &me, req.into_inner()).await)
    }

    async fn create_group(&self, req: Request<pb::CreateGroupRequest>) -> Result<Response<pb::Group>, Status> {
        let (t, me) = device(&req)?;
        ok(delivery::create(&self.0, &t, &me, req.into_inner()).await)
    }

    async fn get_group(&self, req: Request<pb::GetGroupRequest>) -> Result<Response<pb::Group>, Status> {
        let (_, me) = device(&req)?;
        ok(delivery::get(&self.0, &me, &req.get_ref().group_id).await)
    }

    async fn get_group_info(
        &self,
        req: Request<pb::GetGroupInfoRequest>,
    ) -> Result<Response<pb::GroupInfoResponse>, Status> {
        let (_, me) = device(&req)?;
        ok(delivery::group_info(&self.0, &me, &req.get_ref().group_id).await)
    }

    async fn send_commit(
        &self,
        req: Request<pb::SendCommitRequest>,
    ) -> Result<Response<pb::SendCommitResponse>, Status> {
        let (t, me) = device(&req)?;
        let result = delivery::commit(&self.0, &t, &me, req.into_inner()).await;
        match &result {
            Ok(_) => crate::metrics::commit("accepted"),
            Err(e) => crate::metrics::commit(crate::metrics::commit_failure(e)),
        }
        ok(result.map(|epoch| pb::SendCommitResponse { epoch }))
    }

    async fn send_application(
        &self,
        req: Request<pb::SendApplicationRequest>,
    ) -> Result<Response<pb::SendApplicationResponse>, Status> {
        let (_, me) = device(&req)?;
        ok(delivery::application(&self.0, &me, req.into_inner()).await.map(|()| pb::SendApplicationResponse {}))
    }

    async fn report_dispute(
        &self,
        req: Request<pb::ReportDisputeRequest>,
    ) -> Result<Response<pb::ReportDisputeResponse>, Status> {
        let (_, me) = device(&req)?;
        ok(delivery::dispute(&self.0, &me, req.into_inner()).await.map(|()| pb::ReportDisputeResponse {}))
    }

    type ReceiveStream = Pin<Box<dyn Stream<Item = Result<pb::MailboxEntry, Status>> + Send>>;

    async fn receive(&self, req: Request<pb::ReceiveRequest>) -> Result<Response<Self::ReceiveStream>, Status> {
        let (t, me) = device(&req)?;
        let principal = Caller::of(&req)?.principal().clone();
        Ok(Response::new(Box::pin(mailbox::receive(self.0.rt.clone(), t, me, principal, *req.get_ref()))))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let (t, me) = device(&req)?;
        ok(mailbox::ack(&t, &me, req.get_ref().up_to_seq).await.map(|()| pb::AckResponse {}))
    }
}
