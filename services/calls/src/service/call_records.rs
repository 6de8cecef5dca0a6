//! `CallRecords`: tenants' record policies and their call records.

use super::*;

fn policy_pb(tenant: &str, p: &records::Policy) -> pb::RecordPolicy {
    pb::RecordPolicy { tenant_id: tenant.to_string(), fields: p.fields.clone(), retention_seconds: p.retention_seconds }
}

#[tonic::async_trait]
impl CallRecords for CallRecordsApi {
    async fn set_record_policy(
        &self,
        req: Request<pb::SetRecordPolicyRequest>,
    ) -> Result<Response<pb::RecordPolicy>, Status> {
        let caller = Caller::of(&req)?;
        let tenant = caller.require_tenant_server()?.to_string();
        let t = caller.tenant_store()?;
        let r = req.get_ref();
        let mut fields = Vec::new();
        for f in &r.fields {
            match pb::RecordField::try_from(*f) {
                Ok(pb::RecordField::Unspecified) | Err(_) => {
                    return Err(invalid("fields", "unknown record field").into());
                }
                Ok(_) if fields.contains(f) => return Err(invalid("fields", "a field is named twice").into()),
                Ok(_) => fields.push(*f),
            }
        }
        let retention_seconds = if fields.is_empty() { 0 } else { r.retention_seconds };
        if !fields.is_empty() && !(records::MIN_RETENTION..=records::MAX_RETENTION).contains(&retention_seconds) {
            return Err(invalid("retention_seconds", "60 seconds to 400 days").into());
        }
        let p = records::Policy { fields, retention_seconds };
        records::set_policy(&t, &p).await?;
        tracing::info!(fields = p.fields.len(), retention_seconds, "call record policy set");
        Ok(Response::new(policy_pb(&tenant, &p)))
    }

    async fn get_record_policy(
        &self,
        req: Request<pb::GetRecordPolicyRequest>,
    ) -> Result<Response<pb::RecordPolicy>, Status> {
        let caller = Caller::of(&req)?;
        let tenant = caller.require_tenant_server()?.to_string();
        let p = records::policy(&caller.tenant_store()?).await?;
        Ok(Response::new(policy_pb(&tenant, &p)))
    }

    async fn list_call_records(
        &self,
        req: Request<pb::ListCallRecordsRequest>,
    ) -> Result<Response<pb::ListCallRecordsResponse>, Status> {
        let caller = Caller::of(&req)?;
        caller.require_tenant_server()?;
        let t = caller.tenant_store()?;
        let r = req.get_ref();
        let size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            _ => return Err(invalid("page_size", "at most 1000").into()),
        };
        let after = if r.page_token.is_empty() {
            None
        } else if r.page_token.starts_with(crate::model::RECORDS) && !r.page_token.contains("..") {
            Some(r.page_token.as_str())
        } else {
            return Err(invalid("page_token", "not a token from this method").into());
        };
        let page = t.range(crate::model::RECORDS, after, size).await?;
        let next = if page.more {
            page.kvs.last().map(|kv| t.relative(&kv.key).to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let records = page
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<records::Stored>(&kv.value).ok())
            .map(|s| records::to_pb(&s))
            .collect();
        Ok(Response::new(pb::ListCallRecordsResponse { records, next_page_token: next }))
    }
}
