//! TLS to the source, for both kinds of connection (the normal ones through
//! tokio-postgres, the replication ones through `replication.rs`): libpq's
//! `sslmode` semantics, the PEM files a connector names (read at each
//! connection), the SSLRequest exchange, the handshake (rustls with the ring
//! provider), the `tls-server-end-point` data SCRAM-SHA-256-PLUS binds to,
//! and the refusal to send a password in cleartext over an unencrypted
//! connection. No pgrx here: the pure parts are covered by plain `#[test]`s.

use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

pub const SSL_MODES: &str = "disable, allow, prefer, require, verify-ca, verify-full";

impl SslMode {
    /// libpq's names, any case; empty means libpq's default, `prefer`.
    pub fn parse(s: &str) -> Option<SslMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "prefer" => Some(SslMode::Prefer),
            "disable" => Some(SslMode::Disable),
            "allow" => Some(SslMode::Allow),
            "require" => Some(SslMode::Require),
            "verify-ca" => Some(SslMode::VerifyCa),
            "verify-full" => Some(SslMode::VerifyFull),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the mode checks the server certificate whatever else is set.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// What is checked of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Encryption only (the handshake signatures are still checked).
    Nothing,
    /// The chain up to a root of `sslrootcert`, not the host name.
    Chain,
    /// The chain and that the certificate names the host.
    ChainAndHost,
}

/// As libpq: `verify-full` checks the chain and the host, `verify-ca` the
/// chain; the weaker modes check the chain when a root certificate is given
/// (libpq's "require with a root CA file behaves like verify-ca") and
/// nothing otherwise.
pub fn verification(mode: SslMode, has_root: bool) -> Verify {
    match mode {
        SslMode::VerifyFull => Verify::ChainAndHost,
        SslMode::VerifyCa => Verify::Chain,
        _ if has_root => Verify::Chain,
        _ => Verify::Nothing,
    }
}

/// One way of opening the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// No SSLRequest.
    Plain,
    /// SSLRequest; a server that answers 'N' is an error.
    Tls,
    /// SSLRequest; a server that answers 'N' gets a plain connection.
    TlsOrPlain,
}

/// The attempts a mode makes, in order. `allow` tries plain first and TLS
/// when the server rejects the plain connection during authentication
/// (SQLSTATE class 28, e.g. a `hostssl`-only pg_hba.conf).
pub fn attempts(mode: SslMode) -> &'static [Attempt] {
    match mode {
        SslMode::Disable => &[Attempt::Plain],
        SslMode::Allow => &[Attempt::Plain, Attempt::Tls],
        SslMode::Prefer => &[Attempt::TlsOrPlain],
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[Attempt::Tls],
    }
}

/// What a connector asks for (from its `data`). Paths are of the server's
/// OS user; no file is read until a connection opens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub mode: SslMode,
    /// PEM CA bundle (libpq `sslrootcert`).
    pub rootcert: String,
    /// PEM client certificate chain (libpq `sslcert`); may hold the key too.
    pub cert: String,
    /// PEM client key (libpq `sslkey`); empty: the key in `cert`'s file.
    pub key: String,
    /// Send a password the server asks for in cleartext (AuthenticationCleartextPassword)
    /// over an unencrypted connection, or a TLS one whose certificate is not verified.
    pub allow_cleartext_password: bool,
}

/// The error a plain connection's read returns instead of the server's
/// request for a cleartext password (see [`Stream`]).
#[derive(Debug, Clone, Copy)]
pub struct CleartextRefused;

impl std::fmt::Display for CleartextRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "the source asks for the password in cleartext over an unencrypted connection \
             or one whose certificate is not verified (pg_hba.conf method password, ldap, \
             radius, pam or bsd); not sent: use sslmode verify-ca or verify-full (or an \
             sslrootcert), a scram-sha-256 rule on the source, or set \
             allow_cleartext_password to true in the connector's data",
        )
    }
}

impl std::error::Error for CleartextRefused {}

/// Whether an I/O error is the refusal above (also when wrapped as a
/// source of another error).
pub fn is_cleartext_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<CleartextRefused>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|i| i.is::<CleartextRefused>()) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// A prepared TLS set-up for one host: the files are read and the rustls
/// configuration built when this is made (once per connection).
#[derive(Clone)]
pub struct Connector {
    mode: SslMode,
    config: Option<Arc<ClientConfig>>,
    server_name: ServerName<'static>,
    allow_cleartext: bool,
    /// The source's certificate is checked (a chain up to `sslrootcert`).
    verified: bool,
    rootcert: String,
}

fn read_file(key: &str, path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {key} file \"{path}\": {e}"))
}

fn load_roots(path: &str) -> Result<RootCertStore, String> {
    let pem = read_file("sslrootcert", path)?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert =
            cert.map_err(|e| format!("the sslrootcert file \"{path}\" is not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("a certificate of the sslrootcert file \"{path}\": {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "the sslrootcert file \"{path}\" holds no PEM certificate"
        ));
    }
    Ok(roots)
}

/// Whether a PEM file holds an encrypted private key (PKCS#8 or the
/// traditional OpenSSL form).
pub fn is_encrypted_key(pem: &[u8]) -> bool {
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    has(b"ENCRYPTED PRIVATE KEY") || has(b"Proc-Type: 4,ENCRYPTED")
}

type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load_client(cert_path: &str, key_path: &str) -> Result<ClientIdentity, String> {
    let cert_pem = read_file("sslcert", cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the sslcert file \"{cert_path}\" is not valid PEM: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "the sslcert file \"{cert_path}\" holds no PEM certificate"
        ));
    }
    let (key_pem, key_file, hint) = if key_path.is_empty() {
        (
            cert_pem,
            cert_path,
            " (put the key in the same file, or name the key file in the connector's sslkey)",
        )
    } else {
        (read_file("sslkey", key_path)?, key_path, "")
    };
    if is_encrypted_key(&key_pem) {
        return Err(format!(
            "the private key in \"{key_file}\" is encrypted; synchdb reads unencrypted PEM keys \
             only (decrypt it with openssl pkey, readable only by the server's OS user)"
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("no private key in \"{key_file}\"{hint}")
        }
        e => format!("the private key in \"{key_file}\" is not valid PEM: {e}"),
    })?;
    Ok((chain, key))
}

impl Connector {
    /// Reads the files `opts` names and builds the TLS configuration.
    /// Errors name the file (and never a password).
    pub fn new(opts: &Options, host: &str) -> Result<Connector, String> {
        let parsed = ServerName::try_from(host.trim().to_string()).ok();
        let server_name = match parsed {
            Some(n) => n,
            None if opts.mode == SslMode::VerifyFull => {
                return Err(format!(
                    "sslmode verify-full: the host \"{host}\" is not a DNS name or an IP address to check the certificate against"
                ))
            }
            // Any name: it is not checked, and an IP address sends no SNI.
            None => ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into()),
        };
        let config = if opts.mode == SslMode::Disable {
            None
        } else {
            Some(Arc::new(client_config(opts)?))
        };
        Ok(Connector {
            mode: opts.mode,
            config,
            server_name,
            allow_cleartext: opts.allow_cleartext_password,
            verified: verification(opts.mode, !opts.rootcert.trim().is_empty()) != Verify::Nothing,
            rootcert: opts.rootcert.clone(),
        })
    }

    pub fn attempts(&self) -> &'static [Attempt] {
        attempts(self.mode)
    }

    /// A sentence for the handshake failures a user can fix here.
    fn explain(&self, e: &io::Error) -> String {
        use rustls::CertificateError as C;
        let Some(rustls::Error::InvalidCertificate(c)) =
            e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        else {
            return String::new();
        };
        match c {
            C::UnknownIssuer => format!(
                " (the source's certificate is not signed by a CA of the sslrootcert file \"{}\")",
                self.rootcert
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                " (sslmode verify-full checks the host name against the certificate's subjectAltName)"
                    .into()
            }
            _ => String::new(),
        }
    }

    /// Opens a TCP connection and, for a TLS attempt, negotiates and runs
    /// the handshake.
    pub async fn open(&self, host: &str, port: u16, attempt: Attempt) -> Result<Stream, String> {
        let mut tcp = tcp_connect(host, port)
            .await
            .map_err(|e| format!("cannot reach the source: {e}"))?;
        let plain = |tcp| {
            Stream::Plain(Guarded {
                tcp,
                watch: Watch::new(self.allow_cleartext),
            })
        };
        if attempt == Attempt::Plain {
            return Ok(plain(tcp));
        }
        let Some(config) = self.config.clone() else {
            return Ok(plain(tcp));
        };
        let mut req = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut req);
        let io = |e: io::Error| format!("TLS negotiation with the source: {e}");
        tcp.write_all(&req).await.map_err(io)?;
        // Exactly one byte: nothing the server sends before the handshake
        // may be taken as part of the encrypted stream.
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(io)?;
        match answer[0] {
            b'S' => {}
            b'N' if attempt == Attempt::TlsOrPlain => return Ok(plain(tcp)),
            b'N' => {
                return Err(format!(
                    "the source does not accept TLS connections (its ssl setting is off), and sslmode {} requires TLS",
                    self.mode.as_str()
                ))
            }
            other => {
                return Err(format!(
                    "the source answered the TLS request with the unexpected byte 0x{other:02x}"
                ))
            }
        }
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                format!(
                    "TLS handshake with the source failed: {e}{}",
                    self.explain(&e)
                )
            })?;
        // Always binding data over TLS: without it SCRAM would say the
        // client cannot bind ('n'), which a man in the middle could relay.
        let end_point = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| end_point(c.as_ref()))
            .ok_or_else(|| "the source sent no certificate in the TLS handshake".to_string())?;
        let verified = self.verified;
        Ok(Stream::Tls(
            Box::new(tls),
            TlsInfo {
                end_point,
                verified,
                watch: Watch::new(self.allow_cleartext || verified),
            },
        ))
    }
}

fn client_config(opts: &Options) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match opts.rootcert.trim() {
        "" => None,
        path => Some(Arc::new(load_roots(path)?)),
    };
    let verifier: Arc<dyn ServerCertVerifier> =
        match (verification(opts.mode, roots.is_some()), roots) {
            (Verify::Nothing, _) => Arc::new(ChainOnly {
                roots: None,
                provider: provider.clone(),
            }),
            (Verify::ChainAndHost, Some(roots)) => {
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| format!("the sslrootcert file: {e}"))?
            }
            (Verify::Chain, Some(roots)) => Arc::new(ChainOnly {
                roots: Some(roots),
                provider: provider.clone(),
            }),
            (_, None) => {
                return Err(format!(
                    "sslmode {} needs a root certificate (sslrootcert)",
                    opts.mode.as_str()
                ))
            }
        };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match opts.cert.trim() {
        "" => Ok(builder.with_no_client_auth()),
        cert => {
            let (chain, key) = load_client(cert, opts.key.trim())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate \"{cert}\" and its key: {e}"))
        }
    }
}

/// `verify-ca`: the chain up to one of `roots`, not the host name; with no
/// roots (`require` without `sslrootcert`) any certificate. The handshake
/// signatures are checked either way (the server holds the key of the
/// certificate it shows).
#[derive(Debug)]
struct ChainOnly {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn tcp_connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // A dead peer is noticed on an idle connection too.
        let _ = socket.set_keepalive(true);
        match socket.connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("host \"{host}\" has no address"),
        )
    }))
}

/// Refuses the server's request for a cleartext password unless allowed:
/// the first message a stream reads is inspected before the caller sees it
/// whole (tokio-postgres answers that request on its own).
pub struct Watch {
    head: [u8; 9],
    seen: usize,
    watching: bool,
}

impl Watch {
    /// `allowed`: a cleartext password may be sent (the user allows it, or
    /// the source's certificate is verified).
    fn new(allowed: bool) -> Watch {
        Watch {
            head: [0; 9],
            seen: 0,
            watching: !allowed,
        }
    }

    /// Looks at bytes just read; an error when they make the request.
    fn check(&mut self, new: &[u8]) -> io::Result<()> {
        if !self.watching {
            return Ok(());
        }
        for b in new {
            if self.seen < self.head.len() {
                self.head[self.seen] = *b;
                self.seen += 1;
            }
        }
        match asks_cleartext(&self.head[..self.seen]) {
            Some(true) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                CleartextRefused,
            )),
            Some(false) => {
                self.watching = false;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// A plain TCP stream, watched for a cleartext password request.
pub struct Guarded {
    tcp: TcpStream,
    watch: Watch,
}

/// What is known of an encrypted connection.
pub struct TlsInfo {
    /// The `tls-server-end-point` data of the source's certificate.
    end_point: Vec<u8>,
    /// The certificate was checked against `sslrootcert`.
    verified: bool,
    /// Unless verified (or allowed), no cleartext password.
    watch: Watch,
}

/// Looks at the first bytes the server sent after the startup message:
/// `Some(true)` when they are AuthenticationCleartextPassword, `Some(false)`
/// when they are something else, `None` while undecided.
pub fn asks_cleartext(head: &[u8]) -> Option<bool> {
    match head.first() {
        None => None,
        Some(b'R') if head.len() < 9 => None,
        Some(b'R') => Some(head[5..9] == 3i32.to_be_bytes()),
        Some(_) => Some(false),
    }
}

/// A connection to the source, encrypted or not.
pub enum Stream {
    Plain(Guarded),
    /// The TLS session and what is known of it.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>, TlsInfo),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(..))
    }

    /// The channel binding data for SCRAM-SHA-256-PLUS: always `Some`
    /// when encrypted.
    pub fn end_point(&self) -> Option<&[u8]> {
        match self {
            Stream::Tls(_, i) => Some(&i.end_point),
            Stream::Plain(_) => None,
        }
    }

    /// Encrypted, and the source's certificate checked against
    /// `sslrootcert` (`verify-ca`, `verify-full`, or a weaker mode with a
    /// root certificate): a cleartext password may go to it.
    pub fn verified(&self) -> bool {
        match self {
            Stream::Tls(_, i) => i.verified,
            Stream::Plain(_) => false,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let watch = match self.get_mut() {
            Stream::Tls(s, i) => {
                match Pin::new(s.as_mut()).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {}
                    other => return other,
                }
                &mut i.watch
            }
            Stream::Plain(g) => {
                match Pin::new(&mut g.tcp).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {}
                    other => return other,
                }
                &mut g.watch
            }
        };
        Poll::Ready(watch.check(&buf.filled()[before..]))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Plain(g) => Pin::new(&mut g.tcp).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Plain(g) => Pin::new(&mut g.tcp).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tls(s, _) => s.is_write_vectored(),
            Stream::Plain(g) => g.tcp.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Plain(g) => Pin::new(&mut g.tcp).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Plain(g) => Pin::new(&mut g.tcp).poll_shutdown(cx),
        }
    }
}

/// tokio-postgres sees the channel binding data of an encrypted stream.
impl tokio_postgres::tls::TlsStream for Stream {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match self.end_point() {
            // Always over TLS: tokio-postgres then sends SCRAM-SHA-256-PLUS
            // when offered, else plain SCRAM with 'y', never 'n'.
            Some(h) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(h.to_vec()),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

/// The TLS "connector" handed to tokio-postgres: the stream is already
/// encrypted by [`Connector::open`] (tokio-postgres is told to negotiate
/// directly, so it sends no SSLRequest of its own), and is handed back as it
/// is, so the normal and the replication connections share one TLS path.
pub struct AlreadyEncrypted;

impl tokio_postgres::tls::TlsConnect<Stream> for AlreadyEncrypted {
    type Stream = Stream;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Stream, io::Error>>;

    fn connect(self, stream: Stream) -> Self::Future {
        std::future::ready(Ok(stream))
    }
}

/// The hash RFC 5929 `tls-server-end-point` uses for a certificate: the
/// hash of its signature algorithm, MD5 and SHA-1 replaced by SHA-256
/// (PostgreSQL's `be_tls_get_certificate_hash` does the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndPointHash {
    Sha256,
    Sha384,
    Sha512,
}

/// The DER content of the OID prefix of PKCS#1 RSA signatures
/// (1.2.840.113549.1.1).
const OID_PKCS1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
/// ECDSA signatures (1.2.840.10045.4).
const OID_ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
/// dsa-with-sha1 (1.2.840.10040.4.3).
const OID_DSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x03];
/// dsa-with-sha256 (2.16.840.1.101.3.4.3.2).
const OID_DSA_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x02];

/// The hash for a signature algorithm OID (its DER content bytes); `None`
/// for algorithms without one (Ed25519), whose hash is in parameters
/// (RSASSA-PSS) or not known here: [`end_point`] uses SHA-256 for them.
pub fn end_point_hash_for(oid: &[u8]) -> Option<EndPointHash> {
    if let Some(rest) = oid.strip_prefix(OID_PKCS1) {
        return match rest {
            // md5, sha1, sha256 WithRSAEncryption
            [4] | [5] | [11] => Some(EndPointHash::Sha256),
            [12] => Some(EndPointHash::Sha384),
            [13] => Some(EndPointHash::Sha512),
            _ => None,
        };
    }
    if let Some(rest) = oid.strip_prefix(OID_ECDSA) {
        return match rest {
            // ecdsa-with-SHA1, ecdsa-with-SHA256
            [1] | [3, 2] => Some(EndPointHash::Sha256),
            [3, 3] => Some(EndPointHash::Sha384),
            [3, 4] => Some(EndPointHash::Sha512),
            _ => None,
        };
    }
    if oid == OID_DSA_SHA1 || oid == OID_DSA_SHA256 {
        return Some(EndPointHash::Sha256);
    }
    None
}

/// One DER element: (tag, content, what follows). `None` when malformed.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in input.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(header..end)?, input.get(end..)?))
}

/// The signatureAlgorithm OID of a DER certificate
/// (`SEQUENCE { tbsCertificate, SEQUENCE { OID, ... }, BIT STRING }`).
pub fn signature_algorithm(cert_der: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (tag, cert, _) = der_element(cert_der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, _tbs, rest) = der_element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, alg, _) = der_element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, oid, _) = der_element(alg)?;
    (tag == OID).then_some(oid)
}

/// The `tls-server-end-point` channel binding data of a DER certificate.
/// Never `None` for a certificate: a signature algorithm without a hash RFC
/// 5929 maps (Ed25519, RSA-PSS, an unknown or unparsed OID) gets SHA-256,
/// so that SCRAM over TLS never says the client cannot bind (a source that
/// cannot compute the same hash fails the authentication: no downgrade).
pub fn end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    if cert_der.is_empty() {
        return None;
    }
    let hash = signature_algorithm(cert_der)
        .and_then(end_point_hash_for)
        .unwrap_or(EndPointHash::Sha256);
    let alg = match hash {
        EndPointHash::Sha256 => &ring::digest::SHA256,
        EndPointHash::Sha384 => &ring::digest::SHA384,
        EndPointHash::Sha512 => &ring::digest::SHA512,
    };
    Some(ring::digest::digest(alg, cert_der).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(SslMode::parse(""), Some(SslMode::Prefer));
        assert_eq!(SslMode::parse(" Require "), Some(SslMode::Require));
        for m in [
            SslMode::Disable,
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(SslMode::parse(m.as_str()), Some(m));
            assert!(SSL_MODES.contains(m.as_str()));
        }
        for bad in ["verify_ca", "on", "true", "ssl", "verify"] {
            assert_eq!(SslMode::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn what_each_mode_checks() {
        assert_eq!(verification(SslMode::Require, false), Verify::Nothing);
        // libpq: require with a root certificate behaves like verify-ca.
        assert_eq!(verification(SslMode::Require, true), Verify::Chain);
        assert_eq!(verification(SslMode::Prefer, true), Verify::Chain);
        assert_eq!(verification(SslMode::VerifyCa, true), Verify::Chain);
        assert_eq!(
            verification(SslMode::VerifyFull, true),
            Verify::ChainAndHost
        );
        assert_eq!(attempts(SslMode::Disable), &[Attempt::Plain]);
        assert_eq!(attempts(SslMode::Allow), &[Attempt::Plain, Attempt::Tls]);
        assert_eq!(attempts(SslMode::Prefer), &[Attempt::TlsOrPlain]);
        assert_eq!(attempts(SslMode::VerifyFull), &[Attempt::Tls]);
    }

    #[test]
    fn verify_modes_need_a_root() {
        let opts = Options {
            mode: SslMode::VerifyCa,
            ..Options::default()
        };
        let e = Connector::new(&opts, "127.0.0.1").err().unwrap_or_default();
        assert!(e.contains("sslrootcert"), "{e}");
        let opts = Options {
            mode: SslMode::Require,
            rootcert: "/nonexistent/root.pem".into(),
            ..Options::default()
        };
        let e = Connector::new(&opts, "127.0.0.1").err().unwrap_or_default();
        assert!(e.contains("\"/nonexistent/root.pem\""), "{e}");
        // Nothing to read: a plain connector builds without files.
        let opts = Options {
            mode: SslMode::Disable,
            ..Options::default()
        };
        assert!(Connector::new(&opts, "db.example.com").is_ok());
        assert!(Connector::new(&Options::default(), "127.0.0.1").is_ok());
    }

    #[test]
    fn cleartext_request_detected() {
        let mut r3 = vec![b'R'];
        r3.extend_from_slice(&8i32.to_be_bytes());
        r3.extend_from_slice(&3i32.to_be_bytes());
        assert_eq!(asks_cleartext(&r3), Some(true));
        for cut in 0..r3.len() {
            assert_eq!(asks_cleartext(&r3[..cut]), None, "cut {cut}");
        }
        let mut r10 = r3.clone();
        r10[5..9].copy_from_slice(&10i32.to_be_bytes());
        assert_eq!(asks_cleartext(&r10), Some(false));
        let mut r5 = r3.clone();
        r5[5..9].copy_from_slice(&5i32.to_be_bytes());
        assert_eq!(asks_cleartext(&r5), Some(false));
        assert_eq!(asks_cleartext(b"E"), Some(false));
        let e = io::Error::new(io::ErrorKind::PermissionDenied, CleartextRefused);
        assert!(is_cleartext_refusal(&e));
        assert!(!is_cleartext_refusal(&io::Error::other("x")));
    }

    #[test]
    fn end_point_hash_selection() {
        let rsa = |n: u8| [OID_PKCS1, &[n]].concat();
        assert_eq!(end_point_hash_for(&rsa(4)), Some(EndPointHash::Sha256));
        assert_eq!(end_point_hash_for(&rsa(5)), Some(EndPointHash::Sha256));
        assert_eq!(end_point_hash_for(&rsa(11)), Some(EndPointHash::Sha256));
        assert_eq!(end_point_hash_for(&rsa(12)), Some(EndPointHash::Sha384));
        assert_eq!(end_point_hash_for(&rsa(13)), Some(EndPointHash::Sha512));
        // RSASSA-PSS: the hash is in the parameters.
        assert_eq!(end_point_hash_for(&rsa(10)), None);
        let ec = |tail: &[u8]| [OID_ECDSA, tail].concat();
        assert_eq!(end_point_hash_for(&ec(&[1])), Some(EndPointHash::Sha256));
        assert_eq!(end_point_hash_for(&ec(&[3, 2])), Some(EndPointHash::Sha256));
        assert_eq!(end_point_hash_for(&ec(&[3, 3])), Some(EndPointHash::Sha384));
        assert_eq!(end_point_hash_for(&ec(&[3, 4])), Some(EndPointHash::Sha512));
        assert_eq!(end_point_hash_for(OID_DSA_SHA1), Some(EndPointHash::Sha256));
        // Ed25519 (1.3.101.112).
        assert_eq!(end_point_hash_for(&[0x2b, 0x65, 0x70]), None);
    }

    /// A certificate-shaped DER value: SEQUENCE { SEQUENCE {..tbs}, SEQUENCE { OID }, BIT STRING }.
    fn fake_cert(oid: &[u8], tbs_len: usize) -> Vec<u8> {
        fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut v = vec![tag];
            if body.len() < 0x80 {
                v.push(u8::try_from(body.len()).unwrap_or(0));
            } else {
                v.push(0x82);
                v.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
            }
            v.extend_from_slice(body);
            v
        }
        let tbs = tlv(0x30, &vec![0x05; tbs_len]);
        let alg = tlv(0x30, &[tlv(0x06, oid), vec![0x05, 0x00]].concat());
        let sig = tlv(0x03, &[0x00, 0xaa, 0xbb]);
        tlv(0x30, &[tbs, alg, sig].concat())
    }

    #[test]
    fn end_point_of_a_certificate() {
        let oid = [OID_PKCS1, &[12u8]].concat();
        for tbs_len in [3, 300] {
            let cert = fake_cert(&oid, tbs_len);
            assert_eq!(signature_algorithm(&cert), Some(&oid[..]));
            let h = end_point(&cert).unwrap_or_default();
            assert_eq!(
                h,
                ring::digest::digest(&ring::digest::SHA384, &cert)
                    .as_ref()
                    .to_vec()
            );
        }
        let sha1 = fake_cert(&[OID_PKCS1, &[5u8]].concat(), 10);
        assert_eq!(end_point(&sha1).map(|h| h.len()), Some(32));
        // Truncated or malformed input never panics.
        let cert = fake_cert(&oid, 300);
        for cut in 0..cert.len() {
            let _ = end_point(&cert[..cut]);
        }
        assert_eq!(end_point(b""), None);
        // Unparsed, RSA-PSS, Ed25519, unknown: SHA-256 of the certificate,
        // never no binding data.
        let junk = [0x30, 0x84, 0xff, 0xff, 0xff, 0xff];
        let sha256 = |c: &[u8]| {
            ring::digest::digest(&ring::digest::SHA256, c)
                .as_ref()
                .to_vec()
        };
        assert_eq!(end_point(&junk), Some(sha256(&junk)));
        for oid in [
            [OID_PKCS1, &[10u8]].concat(),
            vec![0x2b, 0x65, 0x70],
            vec![0x2a, 0x03, 0x04],
        ] {
            let cert = fake_cert(&oid, 20);
            assert_eq!(end_point(&cert), Some(sha256(&cert)));
        }
    }

    /// A real Ed25519 certificate (`openssl req -x509 -newkey ed25519`) and
    /// the SHA-256 of its DER.
    const ED25519_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBLjCB4aADAgECAhQEZvfilnvgK5lKLO/kSuWxcxf6ATAFBgMrZXAwDTELMAkG
A1UEAwwCZWQwHhcNMjYxMTI2MDU1MzMwWhcNMzYxMTIzMDU1MzMwWjANMQswCQYD
VQQDDAJlZDAqMAUGAytlcAMhALHQMFAf4+w0h3L3754Ytxz0sPUOJQrXhqXbWstN
Vt2Eo1MwUTAdBgNVHQ4EFgQUqranw6BBideE7SjN2PEWNPA6B44wHwYDVR0jBBgw
FoAUqranw6BBideE7SjN2PEWNPA6B44wDwYDVR0TAQH/BAUwAwEB/zAFBgMrZXAD
QQA65spdw29Uop69nA1ajJOp4QZQ/V3fh7BWA9BD0n9BsLo9/T+hWNM4b3YHEqRv
hiubxIVAMFTOUQR3GEM9LK0B
-----END CERTIFICATE-----
";
    const ED25519_END_POINT: &str =
        "f55ebb9df8afe25ea8ff3b8c9b26c810fbc1d30117abb84682cfcf902c1d14bd";

    #[test]
    fn end_point_of_an_ed25519_certificate() {
        let der = CertificateDer::from_pem_slice(ED25519_CERT.as_bytes()).expect("pem");
        assert_eq!(
            signature_algorithm(der.as_ref()),
            Some(&[0x2b, 0x65, 0x70][..])
        );
        let hex: Option<String> =
            end_point(der.as_ref()).map(|h| h.iter().map(|b| format!("{b:02x}")).collect());
        assert_eq!(hex.as_deref(), Some(ED25519_END_POINT));
    }

    #[test]
    fn cleartext_watch() {
        let r3 = [b'R', 0, 0, 0, 8, 0, 0, 0, 3];
        let mut w = Watch::new(false);
        assert!(w.check(&r3[..4]).is_ok());
        let e = w.check(&r3[4..]).expect_err("refused");
        assert!(is_cleartext_refusal(&e));
        assert!(Watch::new(true).check(&r3).is_ok());
        let mut w = Watch::new(false);
        assert!(w.check(&[b'R', 0, 0, 0, 8, 0, 0, 0, 10]).is_ok());
        assert!(w.check(&r3).is_ok(), "only the first message is watched");
    }

    /// A real certificate (EC P-256, signed ecdsa-with-SHA384) and its
    /// SHA-384, as `openssl x509 -outform DER | openssl dgst -sha384` gives.
    const EC_SHA384_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBcDCCARWgAwIBAgIUGxrl24lAj2rBebQ8b1m+P7MxonIwCgYIKoZIzj0EAwMw
DTELMAkGA1UEAwwCZXAwHhcNMjYxMTI2MDUyOTM1WhcNMzYxMTIzMDUyOTM1WjAN
MQswCQYDVQQDDAJlcDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABKM0m2AdX4dP
6VxGlKyfjVZ3mIKecWtWbs+wUYHoTJYUhNSp2DVA5AN1rqh9wMZCflzGCC0qta6r
zLhcJZZxqN6jUzBRMB0GA1UdDgQWBBShE7sVzx3YA8TYJjnWTvVRLBS5RDAfBgNV
HSMEGDAWgBShE7sVzx3YA8TYJjnWTvVRLBS5RDAPBgNVHRMBAf8EBTADAQH/MAoG
CCqGSM49BAMDA0kAMEYCIQCH/UGrE0koVbZSjJ2HypY0b5KmtbP2vXARASgKKhjm
FwIhAKhZEK3Ssqhu56+z81v7gsTK2fq70167LOI6Cnq0ySQB
-----END CERTIFICATE-----
";
    const EC_SHA384_END_POINT: &str = "acd30f90367554c585901cc34bc15e5bd635254813318364c4dde5ce9b2918222164e3b76f09fe20d3251956bc5db601";

    #[test]
    fn end_point_of_a_real_certificate() {
        let der = CertificateDer::from_pem_slice(EC_SHA384_CERT.as_bytes()).expect("pem");
        let hex: String = end_point(der.as_ref())
            .unwrap_or_default()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, EC_SHA384_END_POINT);
    }

    #[test]
    fn encrypted_keys_detected() {
        assert!(is_encrypted_key(
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nabc\n"
        ));
        assert!(is_encrypted_key(
            b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
        ));
        assert!(!is_encrypted_key(b"-----BEGIN PRIVATE KEY-----\nabc\n"));
    }
}
