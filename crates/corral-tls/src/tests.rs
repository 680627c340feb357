//! Each refusal the listener and the dialler make, and rotation, over real
//! sockets on loopback: an echo server behind [`grpc::incoming`], a client
//! through [`grpc::connect_tcp`].

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use super::*;
use crate::pki::{Pki, Validity};

/// Write a CA and one certificate it signs under `dir/<tag>-*`.
fn identity(dir: &Path, tag: &str, pki: &Pki, names: &[&str], validity: Validity) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join(format!("{tag}.pem")),
        key: dir.join(format!("{tag}-key.pem")),
        ca: dir.join(format!("{tag}-ca.pem")),
    };
    pki.issue(tag, names, validity)
        .unwrap()
        .write(&files.cert, &files.key)
        .unwrap();
    pki.write_ca(&files.ca).unwrap();
    files
}

/// A server's identity for 127.0.0.1, signed by `pki`, valid for a day.
fn server_identity(dir: &Path, pki: &Pki) -> TlsFiles {
    identity(dir, "server", pki, &["127.0.0.1"], Validity::Days(1))
}

/// An echo server on 127.0.0.1; returns its port.
async fn echo_server(tls: ServerTls) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut conns = Box::pin(grpc::incoming(listener, Some(tls)));
    tokio::spawn(async move {
        while let Some(Ok(mut io)) = conns.next().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = io.read(&mut buf).await {
                    // Writes are gathered until flushed, as HTTP/2 does.
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() || io.flush().await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// Connect and echo one message; the error as text if anything failed.
async fn round_trip(port: u16, tls: &ClientTls) -> Result<(), String> {
    let attempt = async {
        let mut s = grpc::connect_tcp("127.0.0.1", port, tls)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"ping").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.map_err(|e| e.to_string())?;
        if &got != b"ping" {
            return Err(format!("echo returned {got:?}"));
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[tokio::test]
async fn peers_of_one_ca_talk() {
    let dir = TempDir::new().unwrap();
    let pki = Pki::new("test CA").unwrap();
    let server = server_identity(dir.path(), &pki);
    let client = identity(dir.path(), "client", &pki, &["client"], Validity::Days(1));
    let port = echo_server(ServerTls::new(server).unwrap()).await;
    round_trip(port, &ClientTls::new(client).unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn listener_refuses_a_client_of_another_ca() {
    let dir = TempDir::new().unwrap();
    let pki = Pki::new("cluster CA").unwrap();
    let other = Pki::new("someone else's CA").unwrap();
    let server = server_identity(dir.path(), &pki);
    // The intruder trusts the cluster's CA but its own certificate is not
    // signed by it.
    let mut intruder = identity(dir.path(), "intruder", &other, &["x"], Validity::Days(1));
    intruder.ca = server.ca.clone();
    let port = echo_server(ServerTls::new(server).unwrap()).await;
    let err = round_trip(port, &ClientTls::new(intruder).unwrap())
        .await
        .unwrap_err();
    assert!(!err.is_empty());
}

#[tokio::test]
async fn listener_refuses_an_expired_client_certificate() {
    let dir = TempDir::new().unwrap();
    let pki = Pki::new("cluster CA").unwrap();
    let server = server_identity(dir.path(), &pki);
    let expired = identity(dir.path(), "old", &pki, &["old"], Validity::Expired);
    let port = echo_server(ServerTls::new(server).unwrap()).await;
    round_trip(port, &ClientTls::new(expired).unwrap())
        .await
        .unwrap_err();
}

#[tokio::test]
async fn listener_refuses_a_client_without_a_certificate() {
    let dir = TempDir::new().unwrap();
    let pki = Pki::new("cluster CA").unwrap();
    let server = server_identity(dir.path(), &pki);
    let port = echo_server(ServerTls::new(server.clone()).unwrap()).await;
    // A client that checks the server properly but has no certificate.
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(load_roots(&server.ca).unwrap())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let result = async {
        let mut s = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        s.write_all(b"ping").await?;
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await?;
        Ok::<_, std::io::Error>(())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), result)
        .await
        .expect("refused, not hung");
    assert!(
        outcome.is_err(),
        "a client without a certificate was served"
    );
}

#[tokio::test]
async fn listener_drops_a_plaintext_client() {
    let dir = TempDir::new().unwrap();
    let pki = Pki::new("cluster CA").unwrap();
    let server = server_identity(dir.path(), &pki);
    let port = echo_server(ServerTls::new(server).unwrap()).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    // Whatever the listener answers (a TLS alert at most), it is never an
    // echo of what was sent, and the connection ends.
    assert!(read.is_ok(), "connection left open");
    assert!(!buf.windows(3).any(|w| w == b"PRI"));
}

#[tokio::test]
async fn dialler_refuses_a_server_of_another_ca() {
    let dir = TempDir::new().unwrap();
    let pki = Pki::new("cluster CA").unwrap();
    let other = Pki::new("impostor CA").unwrap();
    let mut impostor = identity(
        dir.path(),
        "impostor",
        &other,
        &["127.0.0.1"],
        Validity::Days(1),
    );
    let client = identity(dir.path(), "client", &pki, &["client"], Validity::Days(1));
    // The impostor accepts the cluster's clients, but its own certificate
    // is signed by another CA.
    impostor.ca = client.ca.clone();
    let port = echo_server(ServerTls::new(impostor).unwrap()).await;
    let err = round_trip(port, &ClientTls::new(client).unwrap())
        .await
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn dialler_checks_the_name_in_the_server_certificate() {
    let dir = TempDir::new().unwrap();
    let pki = Pki::new("cluster CA").unwrap();
    let server = identity(
        dir.path(),
        "server",
        &pki,
        &["replicas.corral"],
        Validity::Days(1),
    );
    let client = identity(dir.path(), "client", &pki, &["client"], Validity::Days(1));
    let port = echo_server(ServerTls::new(server).unwrap()).await;
    let tls = ClientTls::new(client).unwrap();
    let err = round_trip(port, &tls).await.unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    let named = tls.with_server_name(Some("replicas.corral".into()));
    round_trip(port, &named).await.unwrap();
}

#[tokio::test]
async fn rotated_files_take_effect_for_new_connections() {
    let dir = TempDir::new().unwrap();
    let old = Pki::new("old CA").unwrap();
    let new = Pki::new("new CA").unwrap();
    let server = identity(
        dir.path(),
        "server",
        &old,
        &["127.0.0.1"],
        Validity::Days(1),
    );
    let client = identity(dir.path(), "client", &old, &["client"], Validity::Days(1));
    let server_tls = ServerTls::new(server.clone()).unwrap();
    let port = echo_server(server_tls).await;
    let client_tls = ClientTls::new(client.clone()).unwrap();
    round_trip(port, &client_tls).await.unwrap();

    // The whole cluster moves to the new CA: the server's files first.
    identity(
        dir.path(),
        "server",
        &new,
        &["127.0.0.1"],
        Validity::Days(1),
    );
    let err = round_trip(port, &client_tls).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // Then the client's: the same ClientTls picks them up.
    identity(dir.path(), "client", &new, &["client"], Validity::Days(1));
    round_trip(port, &client_tls).await.unwrap();
}

#[test]
fn a_broken_rotation_keeps_the_last_good_files() {
    let dir = TempDir::new().unwrap();
    let pki = Pki::new("cluster CA").unwrap();
    let client = identity(dir.path(), "client", &pki, &["client"], Validity::Days(1));
    let tls = ClientTls::new(client.clone()).unwrap();
    let before = tls.config.get();
    std::fs::write(&client.key, "not a key").unwrap();
    let after = tls.config.get();
    assert!(
        Arc::ptr_eq(&before, &after),
        "a bad key replaced the config"
    );
}

#[test]
fn flags_come_in_threes() {
    assert!(TlsFiles::from_flags(None, None, None).unwrap().is_none());
    let err = TlsFiles::from_flags(Some("c".into()), None, Some("a".into())).unwrap_err();
    assert!(err.to_string().contains("--tls-key"), "{err}");
}

#[test]
fn files_that_do_not_load_are_named() {
    let dir = TempDir::new().unwrap();
    let missing = TlsFiles {
        cert: dir.path().join("nope.pem"),
        key: dir.path().join("nope-key.pem"),
        ca: dir.path().join("nope-ca.pem"),
    };
    let err = ServerTls::new(missing).unwrap_err();
    assert!(err.to_string().contains("nope-ca.pem"), "{err}");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let err = ClientTls::new(TlsFiles {
        cert: garbage.clone(),
        key: garbage.clone(),
        ca: garbage,
    })
    .unwrap_err();
    assert!(err.to_string().contains("holds no certificate"), "{err}");
}

#[test]
fn loopback_identity_is_made_once() {
    let dir = TempDir::new().unwrap();
    let files = pki::loopback_identity(&dir.path().join("tls")).unwrap();
    let first = std::fs::read(&files.cert).unwrap();
    let again = pki::loopback_identity(&dir.path().join("tls")).unwrap();
    assert_eq!(files, again);
    assert_eq!(first, std::fs::read(&again.cert).unwrap());
    ServerTls::new(files.clone()).unwrap();
    ClientTls::new(files).unwrap();
}

#[tokio::test]
async fn a_silent_client_holds_its_place_only_until_the_opening_timeout() {
    let dir = TempDir::new().unwrap();
    let pki = Pki::new("cluster CA").unwrap();
    let server = server_identity(dir.path(), &pki);
    let client = identity(dir.path(), "client", &pki, &["client"], Validity::Days(1));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let limits = grpc::ListenerLimits {
        max_connections: 1,
        opening_timeout: Duration::from_millis(300),
    };
    let mut conns = Box::pin(grpc::incoming_with(
        listener,
        Some(ServerTls::new(server).unwrap()),
        limits,
    ));
    // The only place goes to a client that connects and says nothing.
    let silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = ClientTls::new(client).unwrap();
    let real = tokio::spawn(async move { grpc::connect_tcp("127.0.0.1", port, &tls).await });
    // The real client is served once the silent one has timed out.
    let served = tokio::time::timeout(Duration::from_secs(10), conns.next())
        .await
        .expect("served after the silent client's timeout")
        .unwrap()
        .unwrap();
    assert!(served.is_tls());
    real.await.unwrap().unwrap();
    // The silent client's connection was closed by the server.
    let mut silent = silent;
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed, not left open");
    assert!(matches!(n, Ok(0) | Err(_)));
}

#[tokio::test]
async fn a_plain_listener_names_a_tls_client() {
    let dir = TempDir::new().unwrap();
    let pki = Pki::new("cluster CA").unwrap();
    let client = identity(dir.path(), "client", &pki, &["client"], Validity::Days(1));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut conns = Box::pin(grpc::incoming(listener, None));
    let tls = ClientTls::new(client).unwrap();
    let err = grpc::connect_tcp("127.0.0.1", port, &tls)
        .await
        .unwrap_err();
    assert!(!err.to_string().is_empty());
    // Nothing was handed to the server.
    let next = tokio::time::timeout(Duration::from_millis(300), conns.next()).await;
    assert!(next.is_err(), "a TLS client was served as plain TCP");
}

/// A TLS connection over loopback between [`ServerTls::accept`] and
/// [`grpc::connect_tcp`]: both sides shaped by [`io::TlsIo`] (read buffer
/// under rustls, gathered writes and drained reads above it). Returns once
/// both handshakes are over and nothing else was sent.
async fn tls_pair(dir: &Path) -> (io::ServerStream, io::ClientStream) {
    let pki = Pki::new("test CA").unwrap();
    let server = ServerTls::new(server_identity(dir, &pki)).unwrap();
    let client = identity(dir, "client", &pki, &["client"], Validity::Days(1));
    let client = ClientTls::new(client).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepting = async {
        let (tcp, _) = listener.accept().await.unwrap();
        server.accept(tcp).await.unwrap()
    };
    let connecting = async { grpc::connect_tcp("127.0.0.1", port, &client).await.unwrap() };
    let pair = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(accepting, connecting)
    });
    pair.await.expect("TLS handshake timed out")
}

/// The bytes of message `seq`, `len` long: different for every message
/// and every position, so a byte lost, doubled or moved is seen.
fn message(seq: u32, len: usize) -> Vec<u8> {
    let mut x = seq.wrapping_mul(0x9e37_79b9) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Message lengths around every boundary the layers have (the 4 KiB rustls
/// reads, 16 KiB records, the 64 KiB buffers), many tiny ones, and a few
/// much larger than any buffer.
fn lengths() -> Vec<usize> {
    let mut lens = vec![0, 1, 2, 27, 28, 4095, 4096, 4097];
    for edge in [16 << 10, 64 << 10] {
        lens.extend([edge - 22, edge - 1, edge, edge + 1, edge + 22]);
    }
    lens.extend([200 << 10, (1 << 20) + 3]);
    // Then a long run of small and middling ones, as requests come.
    let mut x: u32 = 12345;
    for _ in 0..3000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        lens.push(match x >> 28 {
            0..=9 => (x as usize >> 8) % 64,
            10..=13 => 4096 + (x as usize >> 8) % 64,
            _ => (x as usize >> 8) % (40 << 10),
        });
    }
    lens
}

/// Write `[len][seq][bytes]` frames, flushing after every `flush_every`-th.
async fn send_frames(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    lens: &[usize],
    flush_every: usize,
) -> std::io::Result<()> {
    for (seq, &len) in lens.iter().enumerate() {
        let seq = seq as u32;
        w.write_all(&(len as u32).to_be_bytes()).await?;
        w.write_all(&seq.to_be_bytes()).await?;
        w.write_all(&message(seq, len)).await?;
        if (seq as usize).is_multiple_of(flush_every) {
            w.flush().await?;
        }
    }
    w.flush().await
}

/// Read `lens.len()` frames and check each: its length, its number and
/// every byte. `Err` names the first that is wrong.
async fn check_frames(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    lens: &[usize],
) -> Result<(), String> {
    for (seq, &len) in lens.iter().enumerate() {
        let mut head = [0u8; 8];
        r.read_exact(&mut head)
            .await
            .map_err(|e| format!("frame {seq}: reading its head: {e}"))?;
        let got_len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let got_seq = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if (got_len, got_seq) != (len, seq as u32) {
            return Err(format!(
                "frame {seq}: head says length {got_len}, number {got_seq}; expected {len}, {seq}"
            ));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)
            .await
            .map_err(|e| format!("frame {seq}: reading {len} bytes: {e}"))?;
        if body != message(seq as u32, len) {
            return Err(format!("frame {seq} ({len} bytes): wrong bytes"));
        }
    }
    Ok(())
}

/// Thousands of frames of every size both ways at once through the read
/// buffer, rustls and the write buffer: every byte arrives once, in
/// order, and end of stream comes after the last of them.
#[tokio::test]
async fn tls_io_keeps_every_byte_in_order() {
    let dir = TempDir::new().unwrap();
    let (server, client) = tls_pair(dir.path()).await;
    let lens = lengths();
    let (mut server_rd, mut server_wr) = tokio::io::split(server);
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let run = async {
        let (up, down, server_got, client_got) = tokio::join!(
            // Client to server: flushes now and then (gathered bursts) and
            // then ends the stream (close_notify).
            async {
                send_frames(&mut client_wr, &lens, 7).await?;
                client_wr.shutdown().await
            },
            // Server to client: a flush after every frame (one per reply).
            async {
                send_frames(&mut server_wr, &lens, 1).await?;
                server_wr.shutdown().await
            },
            async {
                check_frames(&mut server_rd, &lens).await?;
                let mut after = [0u8; 1];
                match server_rd.read(&mut after).await {
                    Ok(0) => Ok(()),
                    other => Err(format!(
                        "after the last frame: {other:?}, not end of stream"
                    )),
                }
            },
            check_frames(&mut client_rd, &lens),
        );
        up.unwrap();
        down.unwrap();
        server_got.unwrap();
        client_got.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("frames did not all arrive");
}

/// A read with room for them takes every record that has arrived, as a
/// plain socket's read takes every byte (tokio-rustls drains its records;
/// a layer that handed over one 16 KiB record per read would cost the
/// NBD loop and HTTP/2 a turn per record).
#[tokio::test]
async fn one_read_takes_every_record_that_arrived() {
    let dir = TempDir::new().unwrap();
    let (mut server, mut client) = tls_pair(dir.path()).await;
    const SENT: usize = 48 << 10;
    client.write_all(&message(1, SENT)).await.unwrap();
    client.flush().await.unwrap();
    // Wait (on the socket, below TLS) until the ciphertext of at least the
    // first two records (16 KiB of plaintext each) is there.
    let mut peeked = vec![0u8; 128 << 10];
    let arrived = async {
        loop {
            let n = server.tcp().peek(&mut peeked).await.unwrap();
            if n >= SENT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), arrived)
        .await
        .expect("the records did not arrive");
    let mut got = vec![0u8; 64 << 10];
    let n = server.read(&mut got).await.unwrap();
    assert!(
        n > 16 << 10,
        "one read returned {n} bytes: no more than one TLS record"
    );
    let mut rest = vec![0u8; SENT - n];
    server.read_exact(&mut rest).await.unwrap();
    got.truncate(n);
    got.extend_from_slice(&rest);
    assert!(got == message(1, SENT), "the bytes read are not those sent");
}
