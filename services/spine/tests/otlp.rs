//! Telemetry export: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a node sends a
//! span per RPC and its metrics to a real OTLP/gRPC receiver, and nothing it
//! exports carries an account or device id, a token, a secret, a public key
//! or an IP address.

mod support;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use spine_proto::calls::v1 as cpb;
use spine_proto::calls::v1::calls_client::CallsClient;
use spine_proto::common::v1::{PeerRef, peer_ref};
use spine_proto::identity::v1 as pb;
use spine_proto::identity::v1::identity_client::IdentityClient;
use spine_proto::identity::v1::tenant_admin_client::TenantAdminClient;
use spine_testing::free_port;
use support::Proc;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        r: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.spans.lock().unwrap().push(r.into_inner());
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        r: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.metrics.lock().unwrap().push(r.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

/// What an attacker writes into its own trace state, to see it exported.
const TRACESTATE: &str = "spine=needle-tracestate-555,other=198.51.100.9";

fn req<T>(m: T, cred: &str) -> Request<T> {
    let mut r = support::req(m, cred);
    // A caller's trace context, which the server span must continue; its
    // trace state must not be exported.
    r.metadata_mut().insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
    r.metadata_mut().insert("tracestate", TRACESTATE.parse().unwrap());
    r
}

/// Requests to paths no service serves, made up to carry personal data into
/// labels (what a client chooses as the path must never be exported).
async fn made_up_paths(channel: &tonic::transport::Channel) {
    for path in ["/needle@example.test/+15550001111", "/203.0.113.77/x", "/spine.identity.v1.Identity/needle-method"] {
        let mut g = tonic::client::Grpc::new(channel.clone());
        g.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<pb::GetAccountRequest, pb::Account>::default();
        let r = g
            .unary(
                req(pb::GetAccountRequest::default(), "sdt1.x.y.z"),
                path.parse::<http::uri::PathAndQuery>().unwrap(),
                codec,
            )
            .await;
        assert!(r.is_err());
    }
}

#[tokio::test]
async fn spans_and_metrics_reach_an_otlp_receiver_without_identifiers() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let c = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(c.clone()))
            .add_service(MetricsServiceServer::new(c))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let _node = Proc(
        Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(["dev", "--listen", &format!("127.0.0.1:{port}"), "--state-dir"])
            .arg(dir.path())
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
            .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let token_file = dir.path().join("operator-token");
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel = loop {
        if token_file.exists()
            && let Ok(ch) = tonic::transport::Endpoint::from_shared(endpoint.clone()).unwrap().connect().await
        {
            break ch;
        }
        assert!(Instant::now() < deadline, "spine dev did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let operator = std::fs::read_to_string(&token_file).unwrap().trim().to_string();

    let created = TenantAdminClient::new(channel.clone())
        .create_tenant(req(
            pb::CreateTenantRequest { request_id: "otel".into(), display_name: "otel".into() },
            &operator,
        ))
        .await
        .unwrap()
        .into_inner();
    let cred = created.credential.unwrap().secret;
    let channel_for_groups = channel.clone();
    let mut id = IdentityClient::new(channel);
    let (account, device, token, key) = support::device_with_key(&mut id, &cred).await;
    id.get_account(req(pb::GetAccountRequest::default(), &token)).await.unwrap();
    let _ = id.get_account(req(pb::GetAccountRequest { account_id: account.clone() }, "sdt1.bad.token.x")).await;
    // A groups call: a key package that is not MLS is rejected and counted.
    let rejected = spine_proto::groups::v1::groups_client::GroupsClient::new(channel_for_groups.clone())
        .upload_key_packages(req(
            spine_proto::groups::v1::UploadKeyPackagesRequest {
                key_packages: vec![b"not mls".to_vec()],
                last_resort: vec![],
            },
            &token,
        ))
        .await;
    assert_eq!(rejected.unwrap_err().code(), tonic::Code::InvalidArgument);
    // A call: started, answered, hung up (metrics by kind, outcome, setup time).
    let (callee, _, callee_token) = support::device(&mut id, &cred).await;
    id.update_settings(req(
        pb::UpdateSettingsRequest {
            account_id: callee.clone(),
            settings: Some(pb::PrivacySettings { who_can_call: pb::WhoCanCall::Everyone as i32, ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["who_can_call".into()] }),
        },
        &cred,
    ))
    .await
    .unwrap();
    made_up_paths(&channel_for_groups).await;
    let mut calls = CallsClient::new(channel_for_groups.clone());
    let call = calls
        .start_call(req(
            cpb::StartCallRequest {
                request_id: "c".into(),
                callee: Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(callee.clone())) }),
                video: false,
                caller_handle: String::new(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    calls.answer(req(cpb::AnswerRequest { call_id: call.call_id.clone() }, &callee_token)).await.unwrap();
    calls.hang_up(req(cpb::HangUpRequest { call_id: call.call_id.clone() }, &callee_token)).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = format!("{:?}", collector.spans.lock().unwrap());
        let metrics = format!("{:?}", collector.metrics.lock().unwrap());
        if spans.contains("/spine.identity.v1.Identity/GetAccount")
            && spans.contains("\"unknown\"")
            && metrics.contains("spine.rpc.duration")
            && metrics.contains("spine.auth.failures")
            && metrics.contains("spine.calls.setup")
            && metrics.contains("spine.calls.ring_outcomes")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "telemetry did not arrive: {} span batches, {} metric batches",
            collector.spans.lock().unwrap().len(),
            collector.metrics.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = collector.spans.lock().unwrap().clone();
    // The server span continues the caller's trace.
    let trace_id = hex::decode("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    assert!(
        spans
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .any(|s| s.trace_id == trace_id)
    );
    let exported = format!("{spans:?} {:?}", collector.metrics.lock().unwrap());
    let b64_key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &key);
    for (what, needle) in [
        ("account id", account.as_str()),
        ("device id", device.as_str()),
        ("device token", token.as_str()),
        ("tenant secret", cred.split('.').nth(1).unwrap()),
        ("operator secret", operator.split('.').nth(1).unwrap()),
        ("public key", b64_key.as_str()),
        ("loopback IP", "127.0.0.1"),
        ("callee account id", callee.as_str()),
        ("call id", call.call_id.as_str()),
        ("a made-up path's e-mail address", "needle@example.test"),
        ("a made-up path's phone number", "+15550001111"),
        ("a made-up path's IP address", "203.0.113.77"),
        ("a made-up method name", "needle-method"),
        ("the caller's trace state", "needle-tracestate"),
        ("the caller's trace state", "198.51.100.9"),
    ] {
        assert!(!exported.contains(needle), "{what} exported in telemetry");
    }
    assert!(exported.contains("\"unknown\""), "made-up paths are labelled `unknown`");
}
