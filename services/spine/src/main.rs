//! `spine`: serve, dev and admin. Flag parsing only; the work is in the
//! library (`spine::node`, `spine::dev`, `spine::admin`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;
use spine::{admin, dev, node};
use spine_runtime::Config;

#[derive(Parser)]
#[command(name = "spine", version, about = "Spine: the shared, private call backbone")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Flags that override config (file, then SPINE_* environment).
#[derive(clap::Args, Serialize, Default, Clone)]
struct NodeFlags {
    /// Config file (TOML).
    #[arg(long, short)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    /// Services to run, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    services: Option<Vec<String>>,
    #[command(flatten)]
    #[serde(skip_serializing_if = "StoreFlags::is_empty")]
    store: StoreFlags,
}

#[derive(clap::Args, Serialize, Default, Clone)]
struct StoreFlags {
    /// Store backend: etcd or embedded.
    #[arg(long = "store")]
    #[serde(rename = "backend", skip_serializing_if = "Option::is_none")]
    backend: Option<String>,
    /// etcd endpoints, comma-separated.
    #[arg(long = "etcd", value_delimiter = ',')]
    #[serde(rename = "etcd_endpoints", skip_serializing_if = "Option::is_none")]
    etcd_endpoints: Option<Vec<String>>,
    /// Directory of the embedded store.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
}

impl StoreFlags {
    fn is_empty(&self) -> bool {
        self.backend.is_none() && self.etcd_endpoints.is_none() && self.data_dir.is_none()
    }
}

impl NodeFlags {
    fn load(&self) -> anyhow::Result<Config> {
        Config::load(Config::default(), self.config.as_deref(), self.clone())
            .map_err(|e| anyhow::anyhow!("config: {e}"))
    }
}

/// No flags over a config file.
#[derive(Serialize)]
struct NoFlags {}

#[derive(Subcommand)]
enum Cmd {
    /// Every service in one process on the embedded store, for development.
    Dev {
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Keep the store here across restarts (default: in memory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where to write the demo operator credential.
        #[arg(long, default_value = ".spine-dev")]
        state_dir: PathBuf,
        /// A config file (TOML) over the development defaults, for example
        /// `[calls.turn]` for a local coturn (as `spine serve` reads).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Also start a media node: a Janus (Debian's `janus`) on a free
        /// port with its agent, so group calls get media (docs/api.md).
        #[arg(long)]
        media: bool,
        /// A web origin allowed to call over gRPC-Web (repeat for more).
        /// Default: the demo's pages (`scripts/demo`), and no other.
        #[arg(long = "allow-origin")]
        allow_origins: Vec<String>,
    },
    /// Run services on etcd (config: file, SPINE_* environment, flags).
    Serve(NodeFlags),
    /// The media-node agent: registers one Janus (the SFU) with Spine and
    /// keeps its VideoRoom rooms as Spine says (docs/operations.md).
    MediaAgent {
        /// A Spine node (any; a Service in Kubernetes).
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        spine: String,
        /// CA certificate (PEM) for an https Spine endpoint.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// This media node's id (the one its credential was issued for).
        #[arg(long)]
        node_id: String,
        /// File holding the media-node credential (`spine admin media issue`).
        #[arg(long)]
        credential_file: PathBuf,
        /// Janus's HTTP API, as this agent reaches it.
        #[arg(long, default_value = "http://127.0.0.1:8088/janus")]
        janus: String,
        /// Janus's HTTP API as devices reach it (default: --janus).
        #[arg(long)]
        public_address: Option<String>,
        #[arg(long, default_value = "default")]
        region: String,
        /// Most participants this Janus takes.
        #[arg(long, default_value_t = 100)]
        capacity: u32,
        /// File holding VideoRoom's `admin_key` (the same as Janus's config).
        #[arg(long)]
        room_admin_key_file: PathBuf,
        /// Registration TTL in seconds (5 to 60).
        #[arg(long, default_value_t = 15)]
        ttl: u32,
    },
    /// Every benchmark beside its raw baseline, in one run: a table, JSON
    /// and SVG plots (docs/performance.md). Starts its own etcd.
    Bench {
        /// About a minute in all (fewer samples, smaller sizes).
        #[arg(long)]
        quick: bool,
        /// Only these benchmarks, comma-separated (mls, sframe, commits,
        /// presence, calls, idle, etcd).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Print JSON on stdout instead of the table.
        #[arg(long)]
        json: bool,
        /// Folder for the SVG plots (and report.json).
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Idle devices to connect, in steps, comma-separated (default
        /// 10000,50000,100000; with --quick 1000,2000).
        #[arg(long, value_delimiter = ',')]
        idle_devices: Vec<usize>,
        /// Seconds each idle step is watched for CPU (default 30; with
        /// --quick 5).
        #[arg(long)]
        idle_window: Option<u64>,
    },
    /// The raw tonic baseline server of `spine bench idle`, in a process of
    /// its own (not for deployments).
    #[command(hide = true)]
    BenchRawServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        #[arg(long)]
        tls_key: Option<PathBuf>,
    },
    /// Operator commands.
    Admin {
        /// Node to talk to.
        #[arg(long, default_value = "http://127.0.0.1:50051", global = true)]
        endpoint: String,
        /// File holding the operator credential (SPINE_OPERATOR_TOKEN wins).
        #[arg(long, default_value = ".spine-dev/operator-token", global = true)]
        token_file: PathBuf,
        /// CA certificate (PEM) for an https endpoint.
        #[arg(long, global = true)]
        ca_cert: Option<PathBuf>,
        #[command(subcommand)]
        what: AdminCmd,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Tenants.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Tenant credentials.
    #[command(subcommand)]
    Credential(CredentialCmd),
    /// Device-token signing keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Media nodes (SFUs) and their credentials.
    #[command(subcommand)]
    Media(MediaCmd),
    /// Operator credentials (writes to the store directly: bootstrap).
    #[command(subcommand)]
    Operator(OperatorCmd),
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant and its first credential.
    Create {
        name: String,
        /// Idempotency key, to retry safely.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// List tenants.
    List,
    /// Show a tenant.
    Get { tenant_id: String },
}

/// Tenants issue their own further credentials (`Identity.IssueTenantCredential`
/// with a credential they hold); operators only list and, in an emergency,
/// revoke them. Every operator action is in the tenant's audit log.
#[derive(Subcommand)]
enum CredentialCmd {
    /// List a tenant's credentials (never their secrets).
    List { tenant_id: String },
    /// Revoke a credential (an emergency: a leak the tenant cannot act on).
    Revoke { tenant_id: String, credential_id: String },
    /// Write a new credential for a tenant that has none left, straight into
    /// the store (needs the store, like `operator create`; audited).
    Recover {
        tenant_id: String,
        #[arg(long, default_value = "recovery")]
        label: String,
        #[command(flatten)]
        node: NodeFlags,
    },
}

#[derive(Subcommand)]
enum MediaCmd {
    /// Issue a credential for one media node (it may only register that node).
    Issue {
        node_id: String,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List media-node credentials (never their secrets).
    Credentials,
    /// Revoke a media-node credential; its node is deregistered.
    Revoke { credential_id: String },
    /// List the live media nodes.
    List,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Start a signing key rotation.
    Rotate,
    /// List published keys.
    List,
    /// Withdraw a key at once (it leaked): its tokens stop working now.
    Revoke { key_id: String },
}

#[derive(Subcommand)]
enum OperatorCmd {
    /// Create an operator credential in the configured store.
    Create {
        #[arg(long)]
        label: String,
        #[command(flatten)]
        node: NodeFlags,
    },
    /// List operator credentials (ids and labels; secrets are never stored).
    List {
        #[command(flatten)]
        node: NodeFlags,
    },
    /// Revoke an operator credential by id (`op_...`).
    Revoke {
        operator_id: String,
        #[command(flatten)]
        node: NodeFlags,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Dev { listen, data_dir, state_dir, config, media, allow_origins } => {
            let _telemetry = spine_runtime::telemetry::init("spine-dev", false).map_err(anyhow::Error::msg)?;
            let mut defaults = dev::config(listen, data_dir);
            if !allow_origins.is_empty() {
                defaults.web.allowed_origins = allow_origins;
            }
            let config = match config {
                Some(file) => {
                    Config::load(defaults, Some(&file), NoFlags {}).map_err(|e| anyhow::anyhow!("config: {e}"))?
                }
                None => defaults,
            };
            node::run(config, node::shutdown_signal(), |rt, addr| async move {
                let token = spine_identity::bootstrap_operator(&rt, "spine dev").await?;
                let path = dev::write_token(&state_dir, &token)?;
                rt.auth.wait_synced().await;
                println!("{}", dev::banner(addr, &path, &rt.config.web.allowed_origins));
                if media {
                    // Once the node serves (the agent registers through it);
                    // Janus is killed when the process is told to stop.
                    tokio::spawn(async move {
                        match dev::start_media(addr, &token, &state_dir).await {
                            Ok(media) => {
                                println!("Media node (Janus) for group calls: {} (node id dev-media)\n", media.url());
                                node::shutdown_signal().await;
                                drop(media);
                            }
                            Err(e) => eprintln!("spine dev: no media node: {e:#}"),
                        }
                    });
                }
                Ok(())
            })
            .await
        }
        Cmd::Serve(flags) => {
            let config = flags.load()?;
            let _telemetry =
                spine_runtime::telemetry::init("spine", config.telemetry.json_logs).map_err(anyhow::Error::msg)?;
            node::run(config, node::shutdown_signal(), |_, addr| async move {
                tracing::info!(%addr, "serving");
                Ok(())
            })
            .await
        }
        Cmd::Bench { quick, only, json, out, idle_devices, idle_window } => {
            let opts = spine_bench::Options {
                quick,
                only,
                spine_exe: std::env::current_exe().ok(),
                idle_devices,
                idle_window: idle_window.map(std::time::Duration::from_secs),
            };
            let report = spine_bench::run(&opts).await?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let mut plots = vec![];
            for s in &report.sections {
                plots.extend(s.plots.iter().cloned());
            }
            let written = spine_bench::plot::write_all(&out, &plots)?;
            std::fs::write(out.join("report.json"), report.json())?;
            if json {
                println!("{}", report.json());
            } else {
                print!("{}", report.table());
                println!("\nPlots and report.json in {} ({} plots)", out.display(), written.len());
            }
            Ok(())
        }
        Cmd::BenchRawServer { listen, tls_cert, tls_key } => {
            spine_runtime::raise_open_files_limit();
            let tls = match (tls_cert, tls_key) {
                (Some(c), Some(k)) => Some((std::fs::read(c)?, std::fs::read(k)?)),
                _ => None,
            };
            let listener = tokio::net::TcpListener::bind(listen).await?;
            spine_bench::raw::serve(listener, 100, tls).await
        }
        Cmd::MediaAgent {
            spine,
            ca_cert,
            node_id,
            credential_file,
            janus,
            public_address,
            region,
            capacity,
            room_admin_key_file,
            ttl,
        } => {
            let _telemetry = spine_runtime::telemetry::init("spine-media-agent", false).map_err(anyhow::Error::msg)?;
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p)
                    .map(|s| s.trim().to_string())
                    .with_context(|| format!("reading {}", p.display()))
            };
            let credential = read(&credential_file)?;
            let target = admin::Target { endpoint: spine, token: credential.clone(), ca_cert };
            let channel = admin::client(&target).await?;
            let config = spine_janus::AgentConfig {
                node_id,
                credential,
                public_address: public_address.unwrap_or_else(|| janus.clone()),
                janus,
                region,
                capacity,
                room_admin_key: read(&room_admin_key_file)?,
                ttl_secs: ttl,
            };
            tracing::info!(?config, "media agent starting");
            spine_janus::run(config, channel, node::shutdown_signal()).await?;
            Ok(())
        }
        Cmd::Admin { endpoint, token_file, ca_cert, what } => {
            let cmd = match what {
                AdminCmd::Operator(cmd) => {
                    print!("{}", admin::operator(cmd.into()).await?);
                    return Ok(());
                }
                AdminCmd::Credential(CredentialCmd::Recover { tenant_id, label, node }) => {
                    let cmd = admin::OperatorCommand::RecoverCredential { tenant_id, label, config: node.load() };
                    print!("{}", admin::operator(cmd).await?);
                    return Ok(());
                }
                AdminCmd::Tenant(TenantCmd::Create { name, request_id }) => {
                    admin::Command::TenantCreate { name, request_id }
                }
                AdminCmd::Tenant(TenantCmd::List) => admin::Command::TenantList,
                AdminCmd::Tenant(TenantCmd::Get { tenant_id }) => admin::Command::TenantGet { tenant_id },
                AdminCmd::Credential(CredentialCmd::List { tenant_id }) => admin::Command::CredentialList { tenant_id },
                AdminCmd::Credential(CredentialCmd::Revoke { tenant_id, credential_id }) => {
                    admin::Command::CredentialRevoke { tenant_id, credential_id }
                }
                AdminCmd::Keys(KeysCmd::Rotate) => admin::Command::KeysRotate,
                AdminCmd::Keys(KeysCmd::List) => admin::Command::KeysList,
                AdminCmd::Keys(KeysCmd::Revoke { key_id }) => admin::Command::KeysRevoke { key_id },
                AdminCmd::Media(MediaCmd::Issue { node_id, label }) => {
                    admin::Command::MediaCredentialIssue { node_id, label }
                }
                AdminCmd::Media(MediaCmd::Credentials) => admin::Command::MediaCredentialList,
                AdminCmd::Media(MediaCmd::Revoke { credential_id }) => {
                    admin::Command::MediaCredentialRevoke { credential_id }
                }
                AdminCmd::Media(MediaCmd::List) => admin::Command::MediaNodeList,
            };
            let token = admin::read_token(std::env::var("SPINE_OPERATOR_TOKEN").ok(), &token_file)?;
            let target = admin::Target { endpoint, token, ca_cert };
            print!("{}", admin::run(&target, cmd).await.context("admin command failed")?);
            Ok(())
        }
    }
}

impl From<OperatorCmd> for admin::OperatorCommand {
    fn from(c: OperatorCmd) -> Self {
        match c {
            OperatorCmd::Create { label, node } => Self::Create { label, config: node.load() },
            OperatorCmd::List { node } => Self::List { config: node.load() },
            OperatorCmd::Revoke { operator_id, node } => Self::Revoke { operator_id, config: node.load() },
        }
    }
}
