//! The NBD transmission codec: request header parse and reply encode.

use bytes::{Bytes, BytesMut};
use corral_nbd::transmission::{Reply, ReplyEncoder, RequestHeader};
use criterion::{Criterion, criterion_group, criterion_main};

fn codec(c: &mut Criterion) {
    let mut buf = BytesMut::new();
    RequestHeader {
        flags: 0,
        command: 0,
        cookie: 42,
        offset: 1 << 20,
        length: 4096,
    }
    .encode(&mut buf);
    let header = buf.freeze();
    c.bench_function("parse request header", |b| {
        b.iter(|| RequestHeader::parse(&header).unwrap())
    });
    let encoder = ReplyEncoder::new(false);
    let data = Bytes::from(vec![0u8; 4096]);
    c.bench_function("encode 4 KiB read reply", |b| {
        let mut out = BytesMut::with_capacity(64);
        b.iter(|| {
            out.clear();
            encoder.encode(
                &Reply::Data {
                    cookie: 42,
                    offset: 0,
                    data: data.clone(),
                },
                &mut out,
            )
        })
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
