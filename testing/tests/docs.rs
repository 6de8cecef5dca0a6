//! Keeps the documents true: every RPC has its error table in docs/api.md,
//! and every kind of item in the data report is listed in docs/privacy.md.

use prost::Message;
use spine_proto::identity::v1 as pb;
use spine_runtime::config::Backend;
use spine_testing::{req, start};

fn doc(name: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/");
    std::fs::read_to_string(format!("{path}{name}")).unwrap()
}

#[test]
fn every_method_has_its_codes_in_the_api_guide() {
    let api = doc("api.md");
    let fds = prost_types::FileDescriptorSet::decode(spine_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut n = 0;
    for file in fds.file.iter().filter(|f| f.package().starts_with("spine.")) {
        for service in &file.service {
            for method in &service.method {
                let heading = format!("#### {}.{}\n", service.name(), method.name());
                assert!(api.contains(&heading), "docs/api.md lacks a section `{}`", heading.trim());
                n += 1;
            }
        }
    }
    assert!(n >= 27, "only {n} methods found");
}

#[tokio::test]
async fn every_reported_kind_is_in_the_data_inventory() {
    let privacy = doc("privacy.md");
    let env = start(Backend::Embedded).await;
    let t = env.tenant("a").await;
    let d = env.device(&t).await;
    let report =
        env.identity().get_data_report(req(pb::GetDataReportRequest::default(), &d.token)).await.unwrap().into_inner();
    let mut kinds = 0;
    for section in &report.sections {
        assert!(
            privacy.contains(&format!("## {}", capitalize(&section.service))),
            "no section for {}",
            section.service
        );
        for item in &section.items {
            assert!(privacy.contains(&format!("| `{}` |", item.kind)), "docs/privacy.md does not list `{}`", item.kind);
            kinds += 1;
        }
    }
    assert!(kinds >= 7);
    // And the tenant's own report.
    let report = env
        .identity()
        .get_tenant_data_report(req(pb::GetTenantDataReportRequest::default(), &t.cred))
        .await
        .unwrap()
        .into_inner();
    for item in report.sections.iter().flat_map(|s| &s.items) {
        assert!(privacy.contains(&format!("| `{}` |", item.kind)), "docs/privacy.md does not list `{}`", item.kind);
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}
