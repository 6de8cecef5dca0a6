//! The protobuf codec for every Spine service.
//!
//! It is tonic-prost's codec with one change: bytes that do not decode as the
//! request message are reported as INVALID_ARGUMENT (the sender's fault)
//! instead of INTERNAL, so frontends can tell bad input from a server bug.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

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
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
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

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| Status::invalid_argument(format!("malformed protobuf message: {e}")))
    }
}
