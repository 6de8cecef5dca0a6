//! How a service plugs into a node: one trait, [`SpineService`], installed
//! the same way for every service by [`install`], with its message limits
//! declared the same way ([`Limits`]) and applied by [`add_service!`].

use std::sync::Arc;

use tonic::server::NamedService;
use tonic::service::RoutesBuilder;

use crate::{Runtime, StartError};

/// The message sizes a service's gRPC servers accept and send. Requests
/// are bounded first by the node's `limits.max_message_bytes` (larger ones
/// get INVALID_ARGUMENT before they are decoded, see `server`); these are
/// the transport caps behind it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request message tonic decodes.
    pub max_request_bytes: usize,
    /// Largest response message tonic encodes.
    pub max_response_bytes: usize,
}

impl Limits {
    /// What most services need: requests up to the transport cap
    /// ([`spine_proto::codec::TRANSPORT_MAX_MESSAGE_BYTES`]), responses the
    /// same.
    pub const DEFAULT: Limits = Limits {
        max_request_bytes: spine_proto::codec::TRANSPORT_MAX_MESSAGE_BYTES,
        max_response_bytes: spine_proto::codec::TRANSPORT_MAX_MESSAGE_BYTES,
    };
}

/// A Spine service: what a node runs when `services` names it.
#[async_trait::async_trait]
pub trait SpineService {
    /// Its name in the `services` setting (`identity`, `groups`, ...).
    const NAME: &'static str;
    /// Its message limits, applied to each of its gRPC servers.
    const LIMITS: Limits = Limits::DEFAULT;
    /// What the service hands back to the node (a view for tools and
    /// tests; `()` for most).
    type Handle: Send + 'static;
    /// What a caller may choose beyond the configuration, for tools and
    /// tests (a clock to drive, say); `()` for most. Nodes use the default.
    type Options: Default + Send + 'static;

    /// Parses its configuration section, adds its gRPC servers with
    /// [`add_service!`], registers its account-data hook and starts its
    /// upkeep.
    async fn install(at: &mut Installer<'_>, options: Self::Options) -> Result<Self::Handle, StartError>;
}

/// What a node gives a service it installs.
pub struct Installer<'a> {
    pub rt: &'a Arc<Runtime>,
    /// Where other nodes reach this one (`host:port`), for services whose
    /// nodes talk to each other.
    pub advertise: String,
    /// The limits of the service being installed.
    pub limits: Limits,
    routes: &'a mut RoutesBuilder,
    names: Vec<&'static str>,
}

impl std::fmt::Debug for Installer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer").field("advertise", &self.advertise).field("names", &self.names).finish()
    }
}

impl Installer<'_> {
    /// Adds a gRPC server (already given [`Self::limits`]) and records its
    /// name for health reporting. Use [`add_service!`], which applies the
    /// limits.
    #[doc(hidden)]
    pub fn routes_for<S: NamedService>(&mut self, _: &S) -> &mut RoutesBuilder {
        self.names.push(S::NAME);
        self.routes
    }
}

/// Adds a generated gRPC server to the node being installed, with the
/// service's [`Limits`]:
/// `add_service!(at, GroupsServer::new(api))`.
#[macro_export]
macro_rules! add_service {
    ($at:expr, $server:expr) => {{
        let at: &mut $crate::service::Installer<'_> = $at;
        let limits = at.limits;
        let server = $server
            .max_decoding_message_size(limits.max_request_bytes)
            .max_encoding_message_size(limits.max_response_bytes);
        at.routes_for(&server).add_service(server);
    }};
}

/// Installs `S` on a node: every service goes in this one way. Returns the
/// gRPC service names (for health) and the service's handle.
pub async fn install<S: SpineService>(
    rt: &Arc<Runtime>,
    routes: &mut RoutesBuilder,
    advertise: String,
) -> Result<(Vec<&'static str>, S::Handle), StartError> {
    install_with::<S>(rt, routes, advertise, S::Options::default()).await
}

/// [`install`] with options other than the default.
pub async fn install_with<S: SpineService>(
    rt: &Arc<Runtime>,
    routes: &mut RoutesBuilder,
    advertise: String,
    options: S::Options,
) -> Result<(Vec<&'static str>, S::Handle), StartError> {
    let mut at = Installer { rt, advertise, limits: S::LIMITS, routes, names: Vec::new() };
    let handle = S::install(&mut at, options).await?;
    Ok((at.names, handle))
}
