//! Spine's gRPC contract, generated from `proto/spine/**/v1/*.proto`.
//!
//! The `.proto` files are the contract for every frontend, in any language;
//! this crate is only their Rust form. It must never hold logic beyond the
//! codec: services, not the contract, decide behaviour.
//!
//! Features: `client` generates clients, `server` generates server traits.

pub mod codec;

/// Encoded `FileDescriptorSet` of every Spine proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/spine_descriptor.bin"));

pub mod calls {
    // `ServerEvent` holds a whole `Call` inline; events are short-lived, so
    // the generated enum's size is not worth a box on every event.
    #[allow(clippy::large_enum_variant)]
    #[allow(unused_qualifications, trivial_casts)] // generated code
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/spine.calls.v1.rs"));
    }
}

pub mod common {
    #[allow(unused_qualifications, trivial_casts)] // generated code
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/spine.common.v1.rs"));
    }
}

pub mod groups {
    #[allow(unused_qualifications, trivial_casts)] // generated code
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/spine.groups.v1.rs"));
    }
}

pub mod presence {
    #[allow(unused_qualifications, trivial_casts)] // generated code
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/spine.presence.v1.rs"));
    }
}

pub mod identity {
    #[allow(unused_qualifications, trivial_casts)] // generated code
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/spine.identity.v1.rs"));
    }
}
