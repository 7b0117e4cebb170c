//! Certificates for one test cluster, made with rcgen (ECDSA P-256): a CA that signs the
//! serving certificate and every client certificate, and the service-account key pair.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::Error;

pub(crate) struct Pki {
    ca_params: CertificateParams,
    ca_key: KeyPair,
    pub ca_pem: String,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
    pub sa_public_pem: String,
    pub sa_private_pem: String,
}

/// A client certificate and its key, PEM.
pub(crate) struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn generate() -> Result<Self, Error> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = name("pipeline-testenv-ca", &[]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_pem = ca_params.self_signed(&ca_key)?.pem();

        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        serving.distinguished_name = name("kube-apiserver", &[]);
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        let serving_cert_pem = {
            let issuer = Issuer::from_params(&ca_params, &ca_key);
            serving.signed_by(&serving_key, &issuer)?.pem()
        };

        let sa_key = KeyPair::generate()?;
        Ok(Self {
            ca_params,
            ca_key,
            ca_pem,
            serving_cert_pem,
            serving_key_pem: serving_key.serialize_pem(),
            sa_public_pem: sa_key.public_key_pem(),
            sa_private_pem: sa_key.serialize_pem(),
        })
    }

    /// A client certificate for `user` (CN) in `groups` (O), which the API server's
    /// x509 authenticator maps to that user and those groups.
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> Result<ClientCert, Error> {
        if groups.len() > MAX_CERT_GROUPS {
            return Err(Error::Other(format!(
                "a test client certificate holds at most {MAX_CERT_GROUPS} groups, not {} (use an impersonating client for more)",
                groups.len()
            )));
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(user, groups);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// At most two organizations (groups): rcgen keys a name's attributes by type, so the
/// second one is written as the same OID (2.5.4.10) through a custom type.
pub(crate) const MAX_CERT_GROUPS: usize = 2;

fn name(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(org) = organizations.first() {
        dn.push(DnType::OrganizationName, *org);
    }
    if let Some(org) = organizations.get(1) {
        dn.push(DnType::CustomDnType(vec![2, 5, 4, 10]), *org);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}
