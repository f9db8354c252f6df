//! TLS between the driver and its workers (rustls, as `ractor_cluster` uses): mutual, both
//! sides present a certificate signed by the cluster's CA, and the cookie challenge runs
//! inside the encrypted stream.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::cluster::ClusterError;

/// A process's TLS identity in the cluster: its certificate chain and key, and the CA that
/// signs every member's certificate. The driver requires workers to present a certificate
/// from that CA; a worker verifies the driver's against it (and its name, see
/// [`WorkerConfig::tls`](crate::cluster::WorkerConfig::tls)).
#[derive(Clone)]
pub struct ClusterTls {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    ca: Arc<rustls::RootCertStore>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTls")
            .field("certificates", &self.chain.len())
            .field("ca_roots", &self.ca.len())
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClusterTls {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.ca.roots == other.ca.roots
    }
}

impl Eq for ClusterTls {}

fn tls_error(what: impl std::fmt::Display) -> ClusterError {
    ClusterError::Tls(what.to_string())
}

impl ClusterTls {
    /// From PEM text: the certificate chain (this process's certificate first), its private
    /// key, and the CA certificate(s).
    pub fn from_pem(chain: &[u8], key: &[u8], ca: &[u8]) -> Result<ClusterTls, ClusterError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<_, _>>()
            .map_err(|e| tls_error(format!("certificate chain: {e}")))?;
        if chain.is_empty() {
            return Err(tls_error("certificate chain: no certificate in it"));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| tls_error(format!("private key: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        let mut any = false;
        for cert in CertificateDer::pem_slice_iter(ca) {
            let cert = cert.map_err(|e| tls_error(format!("CA certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| tls_error(format!("CA certificate: {e}")))?;
            any = true;
        }
        if !any {
            return Err(tls_error("CA: no certificate in it"));
        }
        Ok(ClusterTls {
            chain,
            key: Arc::new(key),
            ca: Arc::new(roots),
        })
    }

    /// From PEM files (see [`from_pem`](Self::from_pem)); an unreadable file is an error
    /// naming it.
    pub fn from_pem_files(
        chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<ClusterTls, ClusterError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| tls_error(format!("cannot read {}: {e}", p.display())))
        };
        ClusterTls::from_pem(
            &read(chain.as_ref())?,
            &read(key.as_ref())?,
            &read(ca.as_ref())?,
        )
    }

    /// The driver's side: present this identity, require a client certificate from the CA.
    pub(crate) fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, ClusterError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder(self.ca.clone())
            .build()
            .map_err(tls_error)?;
        let config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_error)?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// A worker's side: verify the driver against the CA, present this identity.
    pub(crate) fn connector(&self) -> Result<tokio_rustls::TlsConnector, ClusterError> {
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(self.ca.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls_error)?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// The name a worker expects in the driver's certificate.
pub(crate) fn server_name(name: &str) -> Result<ServerName<'static>, ClusterError> {
    ServerName::try_from(name.to_string())
        .map_err(|e| tls_error(format!("driver name `{name}`: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_an_error_naming_what_is_wrong() {
        let e = ClusterTls::from_pem(b"not pem", b"", b"").unwrap_err();
        assert!(e.to_string().contains("certificate chain"), "{e}");
        let e = ClusterTls::from_pem_files("/nonexistent/c.pem", "/k", "/ca").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/c.pem"), "{e}");
        assert!(server_name("not a name!").is_err());
        assert!(server_name("tributary-driver").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
    }
}
