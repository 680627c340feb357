//! The codec every generated client and server uses: prost's, except that
//! an encoder reserves a message's whole encoded length before writing it.
//!
//! tonic encodes into one growing `BytesMut` per stream and hands no size
//! hint to the encoder, so a large message (a batch of 1 MiB restore fills,
//! a backup read's reply) grew that buffer by doubling, copying what it had
//! written each time: about one extra copy of every byte, measured as 5% of
//! a restoring engine's samples and 4% of a replica's. Reserving
//! `encoded_len()` first makes it one allocation and no copy. Decoding is
//! prost's as it is (tonic already reserves a message's length once it has
//! read its header).
//!
//! (tonic keeps `EncodeBuf`'s constructor to itself, so this is exercised
//! by every gRPC call of the test suite rather than by a unit test here.)

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::ProstCodec;

/// prost encoding with the output reserved up front (see the module docs).
#[derive(Debug, Clone)]
pub struct SizedProstCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for SizedProstCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for SizedProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedProstEncoder<T>;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        SizedProstEncoder { _type: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}

/// Encodes one `T` into a buffer first grown to hold all of it.
#[derive(Debug, Clone)]
pub struct SizedProstEncoder<T> {
    _type: PhantomData<T>,
}

impl<T: Message> Encoder for SizedProstEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
