//! TLS for the PostgreSQL connection, by `sslmode`, with rustls.
//!
//! `verify-ca` checks the chain; `verify-full` the chain and host name. `require` and `prefer`
//! check the chain as `verify-ca` does when a root certificate is available (`sslrootcert`, or
//! `~/.postgresql/root.crt` if it exists), as libpq does, and encrypt without verifying the
//! server otherwise. An `sslrootcert` that names no readable file is an error in every mode
//! (libpq would quietly skip verification under `require`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, Error as TlsError, SignatureScheme};

use crate::conninfo::{ConnInfo, SslMode};
use crate::PgError;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(host: &str, message: impl Into<String>) -> PgError {
    PgError::Tls { host: host.to_string(), message: message.into() }
}

/// libpq's default root certificate location.
fn default_root_cert() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt"))
}

fn load_certs(host: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PgError> {
    let data = std::fs::read(path).map_err(|e| tls_err(host, format!("reading {}: {e}", path.display())))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &data[..]).collect();
    let certs = certs.map_err(|e| tls_err(host, format!("parsing {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(tls_err(host, format!("{} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

fn load_key(host: &str, path: &Path) -> Result<PrivateKeyDer<'static>, PgError> {
    let data = std::fs::read(path).map_err(|e| tls_err(host, format!("reading {}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut &data[..])
        .map_err(|e| tls_err(host, format!("parsing {}: {e}", path.display())))?
        .ok_or_else(|| tls_err(host, format!("{} holds no private key", path.display())))
}

pub(crate) fn client_config(info: &ConnInfo, host: &str) -> Result<Arc<rustls::ClientConfig>, PgError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(host, e.to_string()))?;
    let root_path = info.sslrootcert.clone().or_else(|| default_root_cert().filter(|p| p.exists()));
    let verify = matches!(info.sslmode, SslMode::VerifyCa | SslMode::VerifyFull) || root_path.is_some();
    let builder = if verify {
        let path = root_path.ok_or_else(|| {
            tls_err(host, "sslmode requires a root certificate: set sslrootcert (or create ~/.postgresql/root.crt)")
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in load_certs(host, &path)? {
            roots.add(cert).map_err(|e| tls_err(host, format!("root certificate {}: {e}", path.display())))?;
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| tls_err(host, e.to_string()))?;
        let check_name = info.sslmode == SslMode::VerifyFull;
        builder.dangerous().with_custom_certificate_verifier(Arc::new(Verifier { webpki: Some(webpki), check_name }))
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(Verifier { webpki: None, check_name: false }))
    };
    let config = match (&info.sslcert, &info.sslkey) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(load_certs(host, cert)?, load_key(host, key)?)
            .map_err(|e| tls_err(host, format!("client certificate: {e}")))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(tls_err(host, "sslcert and sslkey must be given together")),
    };
    Ok(Arc::new(config))
}

pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, PgError> {
    ServerName::try_from(host.to_string()).map_err(|e| tls_err(host, format!("not a valid TLS server name: {e}")))
}

/// Verifies per sslmode: nothing (require), the chain (verify-ca), or chain and name (verify-full).
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    check_name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let Some(webpki) = &self.webpki else { return Ok(ServerCertVerified::assertion()) };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(v) => Ok(v),
            Err(TlsError::InvalidCertificate(rustls::CertificateError::NotValidForName)) if !self.check_name => {
                Ok(ServerCertVerified::assertion())
            }
            Err(TlsError::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. }))
                if !self.check_name =>
            {
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}
