//! `spine admin`: what an operator needs now. Tenant, key and media-node
//! commands go through the API with an operator credential; `operator ...`
//! and `credential recover` work on the store directly (bootstrap, and a
//! tenant locked out of every credential).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use spine_proto::calls::v1 as cpb;
use spine_proto::calls::v1::media_nodes_client::MediaNodesClient;
use spine_proto::identity::v1 as pb;
use spine_proto::identity::v1::tenant_admin_client::TenantAdminClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How to reach and authenticate to a node.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: String,
    pub token: String,
    pub ca_cert: Option<PathBuf>,
}

/// The operator credential: `SPINE_OPERATOR_TOKEN`, else the token file.
pub fn read_token(env: Option<String>, file: &Path) -> anyhow::Result<String> {
    if let Some(t) = env.filter(|t| !t.trim().is_empty()) {
        return Ok(t.trim().to_string());
    }
    let t = std::fs::read_to_string(file).with_context(|| {
        format!("no operator credential: set SPINE_OPERATOR_TOKEN or pass --token-file (tried {})", file.display())
    })?;
    Ok(t.trim().to_string())
}

/// A channel to the node of `t` (TLS with its CA when given).
pub async fn client(t: &Target) -> anyhow::Result<Channel> {
    let mut ep = Endpoint::from_shared(t.endpoint.clone()).context("endpoint")?;
    if let Some(ca) = &t.ca_cert {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        ep = ep.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
    }
    ep.connect().await.with_context(|| format!("connecting to {}", t.endpoint))
}

fn authed<T>(t: &Target, msg: T) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {}", t.token).parse().context("credential is not valid ASCII")?);
    Ok(r)
}

/// A fresh idempotency key for a one-shot CLI write.
fn cli_request_id() -> String {
    let id = spine_runtime::ids::new(spine_runtime::ids::Kind::Tenant);
    format!("cli-{}", &id[3..])
}

fn when(ts: Option<prost_types::Timestamp>) -> String {
    ts.map_or_else(|| "-".into(), |t| t.seconds.to_string())
}

/// Admin commands over the API.
#[derive(Debug, Clone)]
pub enum Command {
    TenantCreate { name: String, request_id: Option<String> },
    TenantList,
    TenantGet { tenant_id: String },
    CredentialList { tenant_id: String },
    CredentialRevoke { tenant_id: String, credential_id: String },
    KeysRotate,
    KeysList,
    KeysRevoke { key_id: String },
    MediaCredentialIssue { node_id: String, label: String },
    MediaCredentialList,
    MediaCredentialRevoke { credential_id: String },
    MediaNodeList,
}

/// Runs one command and returns what to print.
pub async fn run(t: &Target, cmd: Command) -> anyhow::Result<String> {
    let ch = client(t).await?;
    let mut c = TenantAdminClient::new(ch.clone());
    let mut m = MediaNodesClient::new(ch);
    let status = |e: tonic::Status| anyhow::anyhow!("{:?}: {}", e.code(), e.message());
    let out = match cmd {
        Command::TenantCreate { name, request_id } => {
            let request_id = request_id.unwrap_or_else(cli_request_id);
            let r = c
                .create_tenant(authed(t, pb::CreateTenantRequest { request_id, display_name: name })?)
                .await
                .map_err(status)?
                .into_inner();
            let (tenant, cred) =
                (r.tenant.context("no tenant in answer")?, r.credential.context("no credential in answer")?);
            format!(
                "tenant_id: {}\nname: {}\ncredential_id: {}\ncredential: {}\n(the credential is shown once; give it to the tenant's servers)\n",
                tenant.tenant_id, tenant.display_name, cred.credential_id, cred.secret
            )
        }
        Command::TenantList => {
            let mut out = String::new();
            let mut page_token = String::new();
            loop {
                let r = c
                    .list_tenants(authed(t, pb::ListTenantsRequest { page_size: 1000, page_token })?)
                    .await
                    .map_err(status)?
                    .into_inner();
                for tn in r.tenants {
                    out.push_str(&format!("{}\t{}\t{}\n", tn.tenant_id, when(tn.created_at), tn.display_name));
                }
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            if out.is_empty() { "no tenants\n".into() } else { format!("tenant_id\tcreated_at\tname\n{out}") }
        }
        Command::TenantGet { tenant_id } => {
            let tn = c.get_tenant(authed(t, pb::GetTenantRequest { tenant_id })?).await.map_err(status)?.into_inner();
            format!("tenant_id: {}\nname: {}\ncreated_at: {}\n", tn.tenant_id, tn.display_name, when(tn.created_at))
        }
        Command::CredentialList { tenant_id } => {
            let r = c
                .list_tenant_credentials(authed(t, pb::ListTenantCredentialsRequest { tenant_id })?)
                .await
                .map_err(status)?
                .into_inner();
            let mut out = String::from("credential_id\tcreated_at\tlabel\n");
            for cr in r.credentials {
                out.push_str(&format!("{}\t{}\t{}\n", cr.credential_id, when(cr.created_at), cr.label));
            }
            out
        }
        Command::CredentialRevoke { tenant_id, credential_id } => {
            c.revoke_tenant_credential(authed(
                t,
                pb::RevokeTenantCredentialRequest { tenant_id, credential_id: credential_id.clone() },
            )?)
            .await
            .map_err(status)?;
            format!("revoked {credential_id}\n")
        }
        Command::KeysRotate => {
            let k =
                c.rotate_signing_key(authed(t, pb::RotateSigningKeyRequest {})?).await.map_err(status)?.into_inner();
            format!("new signing key {} signs from {}\n", k.key_id, when(k.activates_at))
        }
        Command::KeysList => {
            let r = c.list_signing_keys(authed(t, pb::ListSigningKeysRequest {})?).await.map_err(status)?.into_inner();
            let mut out = String::from("key_id\tactivates_at\tretires_at\n");
            for k in r.keys {
                out.push_str(&format!("{}\t{}\t{}\n", k.key_id, when(k.activates_at), when(k.retires_at)));
            }
            out
        }
        Command::KeysRevoke { key_id } => {
            c.revoke_signing_key(authed(t, pb::RevokeSigningKeyRequest { key_id: key_id.clone() })?)
                .await
                .map_err(status)?;
            format!("revoked signing key {key_id}: its tokens stop working now\n")
        }
        Command::MediaCredentialIssue { node_id, label } => {
            let request_id = cli_request_id();
            let cr = m
                .issue_media_node_credential(authed(
                    t,
                    cpb::IssueMediaNodeCredentialRequest { request_id, node_id, label },
                )?)
                .await
                .map_err(status)?
                .into_inner();
            format!(
                "credential_id: {}\nnode_id: {}\ncredential: {}\n(shown once; it may only register that node)\n",
                cr.credential_id, cr.node_id, cr.secret
            )
        }
        Command::MediaCredentialList => {
            let r = m
                .list_media_node_credentials(authed(t, cpb::ListMediaNodeCredentialsRequest {})?)
                .await
                .map_err(status)?
                .into_inner();
            let mut out = String::from("credential_id\tnode_id\tcreated_at\tlabel\n");
            for cr in r.credentials {
                out.push_str(&format!("{}\t{}\t{}\t{}\n", cr.credential_id, cr.node_id, when(cr.created_at), cr.label));
            }
            out
        }
        Command::MediaCredentialRevoke { credential_id } => {
            m.revoke_media_node_credential(authed(
                t,
                cpb::RevokeMediaNodeCredentialRequest { credential_id: credential_id.clone() },
            )?)
            .await
            .map_err(status)?;
            format!("revoked {credential_id}\n")
        }
        Command::MediaNodeList => {
            let r = m.list_media_nodes(authed(t, cpb::ListMediaNodesRequest {})?).await.map_err(status)?.into_inner();
            let mut out = String::from("node_id\tregion\tload/capacity\taddress\n");
            for n in r.nodes {
                out.push_str(&format!("{}\t{}\t{}/{}\t{}\n", n.node_id, n.region, n.load, n.capacity, n.address));
            }
            out
        }
    };
    Ok(out)
}

/// Operator-credential commands, run against the store directly (the first
/// operator cannot call the API yet).
#[derive(Debug)]
pub enum OperatorCommand {
    Create {
        label: String,
        config: anyhow::Result<spine_runtime::Config>,
    },
    List {
        config: anyhow::Result<spine_runtime::Config>,
    },
    Revoke {
        operator_id: String,
        config: anyhow::Result<spine_runtime::Config>,
    },
    /// A new credential for a tenant locked out of all of them (audited).
    RecoverCredential {
        tenant_id: String,
        label: String,
        config: anyhow::Result<spine_runtime::Config>,
    },
}

/// Runs an operator-credential command and returns what to print.
pub async fn operator(cmd: OperatorCommand) -> anyhow::Result<String> {
    // These never touch sealed keys: the store alone, no node runtime.
    let start = |config: anyhow::Result<spine_runtime::Config>| async move {
        let store = spine_runtime::Runtime::open_store(&config?).await.context("opening the store")?;
        Ok::<_, anyhow::Error>(spine_runtime::store::SystemStore::new(store))
    };
    match cmd {
        OperatorCommand::Create { label, config } => {
            if label.is_empty() || label.len() > 64 {
                bail!("--label must be 1 to 64 characters");
            }
            let sys = start(config).await?;
            let token = spine_identity::bootstrap_operator_in(&sys, &label).await?;
            Ok(format!("operator credential (shown once): {token}\n"))
        }
        OperatorCommand::List { config } => {
            let sys = start(config).await?;
            let mut out = String::from("operator_id\tcreated_at\tlabel\n");
            for (id, label, created) in spine_identity::list_operators(&sys).await? {
                out.push_str(&format!("{id}\t{created}\t{label}\n"));
            }
            Ok(out)
        }
        OperatorCommand::Revoke { operator_id, config } => {
            let sys = start(config).await?;
            if !spine_identity::revoke_operator(&sys, &operator_id).await? {
                bail!("no operator credential {operator_id}");
            }
            Ok(format!("revoked {operator_id}\n"))
        }
        OperatorCommand::RecoverCredential { tenant_id, label, config } => {
            let sys = start(config).await?;
            let cred = spine_identity::recover_tenant_credential(&sys, &tenant_id, &label)
                .await
                .map_err(anyhow::Error::msg)?;
            Ok(format!(
                "credential: {cred}\n(shown once; recorded in the tenant's audit log; give it to the tenant's servers)\n"
            ))
        }
    }
}
