//! TLS to the broker. amiquip's own TLS needs OpenSSL (native-tls), which a static
//! binary should not carry; so jolt makes the TLS connection itself, with rustls (as
//! the HTTP cache's client does), and hands amiquip one end of a loopback TCP pair.
//! Two threads carry the bytes between the pair's other end and the TLS connection,
//! one each way; the connection's state is shared under a lock, taken only to feed
//! or drain it, never across a blocking read.

use anyhow::{anyhow, Context, Result};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The roots a broker's certificate is checked against: the PEM file `ca_file`, or
/// Mozilla's roots (built in).
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let Some(file) = ca_file else {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(roots);
    };
    let pem = std::fs::read(file)
        .with_context(|| format!("Cannot read amqp.ca_file {}", file.display()))?;
    for item in ureq::tls::parse_pem(&pem) {
        if let Ok(ureq::tls::PemItem::Certificate(cert)) = item {
            roots
                .add(CertificateDer::from(cert.der().to_vec()))
                .map_err(|e| anyhow!("amqp.ca_file {}: {e}", file.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(anyhow!(
            "amqp.ca_file {} holds no PEM certificate",
            file.display()
        ));
    }
    Ok(roots)
}

/// Why a TLS connection could not be made.
pub enum Failed {
    /// The broker's certificate was refused: trying again cannot help.
    Refused(anyhow::Error),
    /// Anything else (a timeout, a reset): the caller may try again.
    Other(anyhow::Error),
}

/// Makes a TLS connection over `stream` to `host` (whose certificate must name it),
/// the handshake bounded by `timeout`, and returns the plaintext end for amiquip.
pub fn wrap(
    stream: TcpStream,
    host: &str,
    ca_file: Option<&Path>,
    timeout: std::time::Duration,
) -> Result<TcpStream, Failed> {
    let refused = |e: anyhow::Error| Failed::Refused(e);
    let config = client_config(ca_file).map_err(refused)?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        refused(anyhow!(
            "'{host}' cannot be checked against a certificate: {e}"
        ))
    })?;
    let conn =
        ClientConnection::new(Arc::new(config), name).map_err(|e| Failed::Other(e.into()))?;
    handshake(stream, conn, host, timeout)
}

fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_file)?)
        .with_no_client_auth())
}

fn handshake(
    mut stream: TcpStream,
    mut conn: ClientConnection,
    host: &str,
    timeout: std::time::Duration,
) -> Result<TcpStream, Failed> {
    let other = |e: std::io::Error| Failed::Other(e.into());
    stream.set_read_timeout(Some(timeout)).map_err(other)?;
    stream.set_write_timeout(Some(timeout)).map_err(other)?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut stream) {
            let certificate = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
            let e = anyhow!("TLS with {host} failed: {e}");
            return Err(if certificate {
                Failed::Refused(e)
            } else {
                Failed::Other(e)
            });
        }
    }
    stream.set_read_timeout(None).map_err(other)?;
    stream.set_write_timeout(None).map_err(other)?;
    start_pumps(stream, conn).map_err(Failed::Other)
}

/// The loopback pair, and the threads that carry bytes between it and the TLS
/// connection; returns the end for amiquip.
fn start_pumps(stream: TcpStream, conn: ClientConnection) -> Result<TcpStream> {
    let (plain, inner) = loopback_pair()?;
    let conn = Arc::new(Mutex::new(conn));
    let raw_read = stream.try_clone()?;
    let plain_read = plain.try_clone()?;
    {
        let conn = conn.clone();
        std::thread::Builder::new()
            .name("amqp-tls-up".into())
            .spawn(move || up(plain_read, stream, &conn))?;
    }
    std::thread::Builder::new()
        .name("amqp-tls-down".into())
        .spawn(move || down(raw_read, plain, &conn))?;
    Ok(inner)
}

/// Two connected loopback sockets: the listener accepts exactly the one it expects.
fn loopback_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let inner = TcpStream::connect(listener.local_addr()?)?;
    loop {
        let (outer, peer) = listener.accept()?;
        if peer == inner.local_addr()? {
            inner.set_nodelay(true)?;
            outer.set_nodelay(true)?;
            return Ok((outer, inner));
        }
    }
}

/// amiquip → broker: plaintext from the pair, encrypted onto the raw socket.
fn up(mut plain: TcpStream, mut raw: TcpStream, conn: &Mutex<ClientConnection>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match plain.read(&mut buf) {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
        if n == 0 {
            conn.send_close_notify();
        } else if conn.writer().write_all(&buf[..n]).is_err() {
            break;
        }
        let mut failed = false;
        while conn.wants_write() {
            if conn.write_tls(&mut raw).is_err() {
                failed = true;
                break;
            }
        }
        if n == 0 || failed {
            break;
        }
    }
    let _ = raw.shutdown(Shutdown::Both);
    let _ = plain.shutdown(Shutdown::Both);
}

/// broker → amiquip: records from the raw socket, decrypted onto the pair.
fn down(mut raw: TcpStream, mut plain: TcpStream, conn: &Mutex<ClientConnection>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = vec![0u8; 64 * 1024];
    'read: loop {
        let n = match raw.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut plaintext = Vec::new();
        {
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            let mut records = &buf[..n];
            while !records.is_empty() {
                if conn.read_tls(&mut records).is_err() || conn.process_new_packets().is_err() {
                    break 'read;
                }
                loop {
                    match conn.reader().read(&mut out) {
                        Ok(0) => break 'read, // close_notify
                        Ok(k) => plaintext.extend_from_slice(&out[..k]),
                        Err(_) => break, // WouldBlock: nothing more for now
                    }
                }
            }
            while conn.wants_write() {
                if conn.write_tls(&mut raw).is_err() {
                    break 'read;
                }
            }
        }
        if plain.write_all(&plaintext).is_err() {
            break;
        }
    }
    let _ = plain.shutdown(Shutdown::Both);
    let _ = raw.shutdown(Shutdown::Both);
}
