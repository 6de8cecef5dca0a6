//! Generates Rust code for every `.proto` under `proto/spine` with protox (no
//! system `protoc`) and tonic-prost-build, and writes the encoded descriptor
//! set that server reflection serves.

use std::path::{Path, PathBuf};

use prost::Message;

fn protos(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read proto dir") {
        let path = entry.expect("proto dir entry").path();
        if path.is_dir() {
            protos(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let mut files = Vec::new();
    protos(&root.join("spine"), &mut files);
    files.sort();
    println!("cargo:rerun-if-changed={}", root.join("spine").display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let fds = protox::compile(&files, [&root]).unwrap_or_else(|e| panic!("{e:?}"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("spine_descriptor.bin"), fds.encode_to_vec()).expect("write descriptor set");

    tonic_prost_build::configure()
        .build_client(cfg!(feature = "client"))
        .build_server(cfg!(feature = "server"))
        // Malformed request bytes are the caller's fault: INVALID_ARGUMENT,
        // not the INTERNAL that the stock codec gives.
        .codec_path("crate::codec::SpineCodec")
        .compile_fds(fds)
        .expect("generate code");
}
