//! GREASE (RFC 9420 section 13.5) gets one answer on every path: openmls
//! 0.9 refuses greased leaves in key packages and new groups but would
//! accept one in an update path; Spine's verifier refuses all of them with
//! `Refusal::Unsupported`. The greased messages are made with openmls
//! itself, as a client with GREASE on would make them.

use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use spine_mls::verifier::{Verifier, validate_key_package};
use spine_mls::{CIPHERSUITE, DeviceName, Refusal};

fn greased(provider: &OpenMlsRustCrypto) -> Capabilities {
    Capabilities::builder().with_grease(provider.rand()).build()
}

fn device(provider: &OpenMlsRustCrypto, name: &str) -> (SignatureKeyPair, CredentialWithKey) {
    let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
    signer.store(provider.storage()).unwrap();
    let credential = BasicCredential::new(DeviceName::new("tn_g", "ac_g", name).to_identity()).into();
    let signature_key = signer.public().into();
    (signer, CredentialWithKey { credential, signature_key })
}

fn group(provider: &OpenMlsRustCrypto, capabilities: Option<Capabilities>) -> (MlsGroup, SignatureKeyPair) {
    let (signer, cred) = device(provider, "dv_creator");
    let mut b = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY);
    if let Some(c) = capabilities {
        b = b.capabilities(c);
    }
    (MlsGroup::new(provider, &signer, &b.build(), cred).unwrap(), signer)
}

fn group_info(provider: &OpenMlsRustCrypto, g: &MlsGroup, signer: &SignatureKeyPair) -> Vec<u8> {
    g.export_group_info(provider.crypto(), signer, true).unwrap().tls_serialize_detached().unwrap()
}

#[test]
fn greased_leaves_are_refused_on_every_path() {
    let provider = OpenMlsRustCrypto::default();

    // An update path with a greased leaf: openmls's own verifier would take
    // it; Spine's does not.
    let (mut g, signer) = group(&provider, None);
    let mut v = Verifier::from_group_info(&group_info(&provider, &g, &signer)).unwrap();
    let params = LeafNodeParameters::builder().with_capabilities(greased(&provider)).build();
    let update = g.self_update(&provider, &signer, params).unwrap();
    let commit = update.commit().tls_serialize_detached().unwrap();
    assert_eq!(v.verify(&commit).unwrap_err().refusal(), Some(Refusal::Unsupported));
    // The same commit without GREASE goes through (the refusal is GREASE's).
    g.clear_pending_commit(provider.storage()).unwrap();
    let plain = g.self_update(&provider, &signer, LeafNodeParameters::default()).unwrap();
    assert!(v.verify(&plain.commit().tls_serialize_detached().unwrap()).is_ok());

    // A new group whose creator's leaf is greased.
    let (g, signer) = group(&provider, Some(greased(&provider)));
    let refused = Verifier::from_group_info(&group_info(&provider, &g, &signer)).unwrap_err();
    assert_eq!(refused.refusal(), Some(Refusal::Unsupported));

    // A greased key package.
    let (signer, cred) = device(&provider, "dv_kp");
    let kp = KeyPackage::builder()
        .leaf_node_capabilities(greased(&provider))
        .build(CIPHERSUITE, &provider, &signer, cred)
        .unwrap();
    let bytes = MlsMessageOut::from(kp.key_package().clone()).tls_serialize_detached().unwrap();
    assert_eq!(validate_key_package(&bytes).unwrap_err().refusal(), Some(Refusal::Unsupported));
}
