//! The protobuf codec for every Spine service.
//!
//! It is tonic-prost's codec with two changes, both so that a frontend can
//! tell its own bad input from a server bug:
//! - bytes that do not decode as the message are INVALID_ARGUMENT, not the
//!   INTERNAL the stock codec gives;
//! - it starts encoders and decoders small (see below).
//!
//! A node's own message limit (`limits.max_message_bytes`) is enforced on
//! the wire before decoding, by `spine_runtime::frames`; tonic's cap
//! ([`TRANSPORT_MAX_MESSAGE_BYTES`]) sits behind it.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

/// The cap services give tonic (`max_decoding_message_size`).
pub const TRANSPORT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Prost codec whose decode errors are INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct SpineCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SpineCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SpineCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SpineDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        // Spine holds many long-lived, mostly idle streams (presence
        // watches, mailboxes): start each with 1 KiB instead of tonic's
        // 8 KiB, and hand data to the transport every 8 KiB instead of
        // 32 KiB, so a client that stops reading pushes back sooner.
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(1024, 8 * 1024))
    }

    fn decoder(&mut self) -> Self::Decoder {
        SpineDecoder(PhantomData)
    }
}

/// Decodes `U`, mapping malformed bytes to INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct SpineDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for SpineDecoder<U> {
    type Item = U;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        // A calls session reads through its stream's buffer for as long as
        // the device is connected, mostly idle: 1 KiB, not tonic's 8 KiB,
        // grown to fit a larger message as it arrives.
        BufferSettings::new(1024, 8 * 1024)
    }

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| Status::invalid_argument(format!("malformed protobuf message: {e}")))
    }
}
