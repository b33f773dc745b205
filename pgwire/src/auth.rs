//! Authentication as a sans-IO state machine: the server's authentication requests in, our
//! answers out, and every rule about what pitr agrees to on the way. The socket is the
//! connection module's; here everything is unit-tested.
//!
//! The rules, beyond answering correctly:
//! * `require_auth` (libpq 16): a request of a method it does not allow fails, and so does a
//!   server that lets us in without authentication unless `none` is allowed.
//! * A password never goes in cleartext or as an MD5 hash over TCP without TLS unless
//!   `require_auth` names that method explicitly: an eavesdropper would read it (or brute-force
//!   the salted hash). A Unix socket is local, so it is allowed there.
//! * Once SCRAM has started, AuthenticationOk is accepted only after AuthenticationSASLFinal
//!   with a verified server signature: a server that skips it has not shown that it knows the
//!   password, and may be harvesting proofs for an offline attack. (libpq accepts this unless
//!   `require_auth` is set; pitr never does.)
//! * `channel_binding=require`: only SCRAM-SHA-256-PLUS over TLS, bound to the server's
//!   certificate (`tls-server-end-point`, RFC 5929), and nothing but SASL is answered.

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{
    ChannelBinding as ScramBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;
use sha2::Digest;

use crate::conninfo::{AuthMethod, ChannelBinding, RequireAuth};
use crate::messages::BackendMessage;
use crate::PgError;

/// What carries the connection, as far as authentication cares.
#[derive(Debug, Clone)]
pub(crate) enum Transport {
    /// A Unix-domain socket: local, so a password cannot be read on the way.
    Unix,
    /// TCP without TLS.
    Plain,
    /// TLS over TCP, with the server's end-entity certificate (DER) if it sent one.
    Tls {
        /// The certificate channel binding hashes.
        server_certificate: Option<Vec<u8>>,
    },
}

enum State {
    /// No authentication request yet.
    Start,
    /// A cleartext or MD5 password was sent; AuthenticationOk or an error comes next.
    PasswordSent,
    /// SCRAM runs; `continued` once the server's first message was answered.
    Scram { scram: ScramSha256, bound: bool, continued: bool },
    /// The server's SCRAM signature was verified.
    ScramVerified { bound: bool },
    /// AuthenticationOk was accepted.
    Done,
}

/// What came of one message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Authentication goes on (an answer may have been written out).
    Continue,
    /// AuthenticationOk was accepted: the server has authenticated us.
    Authenticated,
}

/// The client side of authentication, for one connection attempt.
pub(crate) struct Authenticator {
    host: String,
    user: String,
    require_auth: Option<RequireAuth>,
    channel_binding: ChannelBinding,
    transport: Transport,
    state: State,
}

impl Authenticator {
    pub(crate) fn new(
        host: &str,
        user: &str,
        require_auth: Option<RequireAuth>,
        channel_binding: ChannelBinding,
        transport: Transport,
    ) -> Authenticator {
        Authenticator {
            host: host.to_string(),
            user: user.to_string(),
            require_auth,
            channel_binding,
            transport,
            state: State::Start,
        }
    }

    fn fail(&self, message: impl Into<String>) -> PgError {
        PgError::Auth { host: self.host.clone(), message: message.into() }
    }

    fn require_auth_text(&self) -> String {
        self.require_auth.as_ref().map(ToString::to_string).unwrap_or_default()
    }

    /// Fails if `require_auth` does not allow `method`; `what` says what the server asked.
    fn check_allowed(&self, method: AuthMethod, what: &str) -> Result<(), PgError> {
        match &self.require_auth {
            Some(r) if !r.allows(method) => {
                Err(self.fail(format!("require_auth={} does not allow what the server asked for: {what}", r)))
            }
            _ => Ok(()),
        }
    }

    /// A password request (cleartext or MD5) under `channel_binding` and the transport.
    fn check_password_request(&self, method: AuthMethod, what: &str) -> Result<(), PgError> {
        if !matches!(self.state, State::Start) {
            return Err(self.fail(format!("the server asked for {what} in the middle of authentication")));
        }
        self.check_allowed(method, what)?;
        if self.channel_binding == ChannelBinding::Require {
            return Err(self.fail(format!(
                "channel_binding=require, but the server asked for {what} instead of SCRAM-SHA-256-PLUS"
            )));
        }
        let named = self.require_auth.as_ref().is_some_and(|r| r.names(method));
        if matches!(self.transport, Transport::Plain) && !named {
            return Err(self.fail(format!(
                "the server asked for {what} over a TCP connection without TLS; refused, as an eavesdropper \
                 could {}. Connect with TLS (sslmode=verify-full), use SCRAM (password_encryption = \
                 'scram-sha-256' and a scram-sha-256 line in pg_hba.conf), or allow it explicitly with \
                 require_auth={} in the conninfo",
                if method == AuthMethod::Password { "read it" } else { "brute-force it" },
                method.as_str()
            )));
        }
        Ok(())
    }

    /// Handles one message of the authentication phase, writing any answer into `out`.
    /// `password` is asked only when the server wants one.
    pub(crate) fn on_message(
        &mut self,
        msg: &BackendMessage,
        out: &mut BytesMut,
        password: &mut dyn FnMut() -> Result<String, PgError>,
    ) -> Result<Step, PgError> {
        let proto = |e: std::io::Error| PgError::Protocol(e.to_string());
        match msg {
            BackendMessage::AuthenticationCleartextPassword => {
                self.check_password_request(AuthMethod::Password, "the password in cleartext")?;
                let pw = password()?;
                frontend::password_message(pw.as_bytes(), out).map_err(proto)?;
                self.state = State::PasswordSent;
                Ok(Step::Continue)
            }
            BackendMessage::AuthenticationMd5Password { salt } => {
                self.check_password_request(AuthMethod::Md5, "an MD5-hashed password")?;
                let pw = password()?;
                let hash = postgres_protocol::authentication::md5_hash(self.user.as_bytes(), pw.as_bytes(), *salt);
                frontend::password_message(hash.as_bytes(), out).map_err(proto)?;
                self.state = State::PasswordSent;
                Ok(Step::Continue)
            }
            BackendMessage::AuthenticationSasl { mechanisms } => {
                if !matches!(self.state, State::Start) {
                    return Err(self.fail("the server started SASL in the middle of authentication"));
                }
                self.check_allowed(AuthMethod::ScramSha256, "SASL authentication")?;
                let offers = |m: &str| mechanisms.iter().any(|x| x == m);
                let (mechanism, binding, bound) = match (&self.transport, self.channel_binding) {
                    (Transport::Tls { server_certificate }, ChannelBinding::Prefer | ChannelBinding::Require)
                        if offers(SCRAM_SHA_256_PLUS) =>
                    {
                        let cert = server_certificate
                            .as_deref()
                            .ok_or_else(|| self.fail("the server sent no TLS certificate to bind the channel to"))?;
                        let hash = tls_server_end_point(cert).map_err(|e| {
                            self.fail(format!(
                                "cannot bind SCRAM to the TLS channel: {e} (channel_binding=disable authenticates without)"
                            ))
                        })?;
                        (SCRAM_SHA_256_PLUS, ScramBinding::tls_server_end_point(hash), true)
                    }
                    (Transport::Tls { .. }, ChannelBinding::Require) => {
                        return Err(self.fail(format!(
                            "channel_binding=require, but the server does not offer SCRAM-SHA-256-PLUS (it offers {mechanisms:?})"
                        )))
                    }
                    (_, ChannelBinding::Require) => {
                        return Err(self.fail("channel_binding=require, but the connection does not use TLS"))
                    }
                    // "y": we could bind, the server did not offer it; a server that does
                    // support it then knows the offer was stripped on the way.
                    (Transport::Tls { .. }, ChannelBinding::Prefer) if offers(SCRAM_SHA_256) => {
                        (SCRAM_SHA_256, ScramBinding::unrequested(), false)
                    }
                    _ if offers(SCRAM_SHA_256) => (SCRAM_SHA_256, ScramBinding::unsupported(), false),
                    _ => {
                        return Err(self.fail(format!(
                            "the server offers SASL mechanisms {mechanisms:?}; pitr speaks SCRAM-SHA-256 and SCRAM-SHA-256-PLUS"
                        )))
                    }
                };
                let pw = password()?;
                let scram = ScramSha256::new(pw.as_bytes(), binding);
                frontend::sasl_initial_response(mechanism, scram.message(), out).map_err(proto)?;
                self.state = State::Scram { scram, bound, continued: false };
                Ok(Step::Continue)
            }
            BackendMessage::AuthenticationSaslContinue(data) => {
                let State::Scram { scram, continued, .. } = &mut self.state else {
                    return Err(PgError::Protocol(format!("{}: SASL continue without SASL start", self.host)));
                };
                if *continued {
                    return Err(PgError::Protocol(format!("{}: a second SASL continue message", self.host)));
                }
                scram
                    .update(data)
                    .map_err(|e| PgError::Auth { host: self.host.clone(), message: format!("SCRAM: {e}") })?;
                frontend::sasl_response(scram.message(), out).map_err(proto)?;
                *continued = true;
                Ok(Step::Continue)
            }
            BackendMessage::AuthenticationSaslFinal(data) => {
                let State::Scram { scram, bound, continued: true } = &mut self.state else {
                    return Err(PgError::Protocol(format!("{}: SASL final out of order", self.host)));
                };
                let bound = *bound;
                scram.finish(data).map_err(|e| PgError::Auth {
                    host: self.host.clone(),
                    message: format!("SCRAM server signature check failed: {e}"),
                })?;
                self.state = State::ScramVerified { bound };
                Ok(Step::Continue)
            }
            BackendMessage::AuthenticationOk => {
                match &self.state {
                    State::Start => {
                        if self.require_auth.as_ref().is_some_and(|r| !r.allows(AuthMethod::None)) {
                            return Err(self.fail(format!(
                                "require_auth={} does not allow what the server did: let us in without authentication",
                                self.require_auth_text()
                            )));
                        }
                        if self.channel_binding == ChannelBinding::Require {
                            return Err(self.fail(
                                "channel_binding=require, but the server let us in without authentication, so it \
                                 has not proven who it is",
                            ));
                        }
                    }
                    State::PasswordSent => {}
                    State::Scram { .. } => {
                        return Err(self.fail(
                            "the server accepted the login without sending its SCRAM signature \
                             (AuthenticationSASLFinal), so it has not proven that it knows the password; refused",
                        ))
                    }
                    State::ScramVerified { bound } => {
                        if self.channel_binding == ChannelBinding::Require && !bound {
                            return Err(self.fail("channel_binding=require, but the login was not channel-bound"));
                        }
                    }
                    State::Done => return Err(PgError::Protocol(format!("{}: a second AuthenticationOk", self.host))),
                }
                self.state = State::Done;
                Ok(Step::Authenticated)
            }
            BackendMessage::AuthenticationUnsupported(what) => {
                Err(self.fail(format!("{what} authentication is not supported by pitr")))
            }
            other => Err(PgError::Protocol(format!("{}: unexpected {other:?} during authentication", self.host))),
        }
    }
}

/// The `tls-server-end-point` channel binding data of RFC 5929: the hash of the server's DER
/// certificate, with the hash function of the certificate's signature algorithm, SHA-256 in
/// place of MD5 and SHA-1. As PostgreSQL's server, refused for algorithms without a hash of
/// their own (Ed25519, Ed448).
pub(crate) fn tls_server_end_point(cert: &[u8]) -> Result<Vec<u8>, String> {
    let (algorithm, params) = signature_algorithm(cert).ok_or("the server's certificate is not valid DER")?;
    let hash = match algorithm {
        // md5WithRSAEncryption, sha1WithRSAEncryption, sha256WithRSAEncryption
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04 | 0x05 | 0x0b] => Hash::Sha256,
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c] => Hash::Sha384,
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d] => Hash::Sha512,
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e] => Hash::Sha224,
        // RSASSA-PSS: the hash is in the parameters (SHA-1 when absent).
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a] => {
            pss_hash(params).ok_or("unreadable RSASSA-PSS parameters")?
        }
        // ecdsa-with-SHA1
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01] => Hash::Sha256,
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, n @ 0x01..=0x04] => {
            [Hash::Sha224, Hash::Sha256, Hash::Sha384, Hash::Sha512][usize::from(*n) - 1]
        }
        // dsa-with-sha1, dsa-with-sha256
        [0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x03] | [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x02] => {
            Hash::Sha256
        }
        [0x2b, 0x65, 0x70] => return Err("Ed25519 certificates have no hash for tls-server-end-point".into()),
        [0x2b, 0x65, 0x71] => return Err("Ed448 certificates have no hash for tls-server-end-point".into()),
        other => return Err(format!("unknown certificate signature algorithm (OID bytes {other:02x?})")),
    };
    Ok(hash.digest(cert))
}

#[derive(Clone, Copy)]
enum Hash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha224 => sha2::Sha224::digest(data).to_vec(),
            Hash::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(data).to_vec(),
            Hash::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }
}

/// One DER element: (tag, content, what follows). Definite lengths only, as DER requires.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The signature algorithm OID of a certificate and the rest of its AlgorithmIdentifier.
/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, … }.
fn signature_algorithm(cert: &[u8]) -> Option<(&[u8], &[u8])> {
    let (0x30, body, _) = der(cert)? else { return None };
    let (0x30, _tbs, rest) = der(body)? else { return None };
    let (0x30, alg, _) = der(rest)? else { return None };
    let (0x06, oid, params) = der(alg)? else { return None };
    Some((oid, params))
}

/// RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier DEFAULT sha1, … }.
fn pss_hash(params: &[u8]) -> Option<Hash> {
    let (0x30, seq, _) = der(params)? else { return None };
    let Some((0xa0, explicit, _)) = der(seq) else { return Some(Hash::Sha256) };
    let (0x30, alg, _) = der(explicit)? else { return None };
    let (0x06, oid, _) = der(alg)? else { return None };
    match oid {
        [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01] => Some(Hash::Sha256),
        [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02] => Some(Hash::Sha384),
        [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03] => Some(Hash::Sha512),
        [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04] => Some(Hash::Sha224),
        [0x2b, 0x0e, 0x03, 0x02, 0x1a] => Some(Hash::Sha256),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
    }

    /// Self-signed, made with `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha384`.
    const EC_SHA384_CERT: &str = "3082016d30820113a0030201020214467c6c63c8f05e7b383751bb61bf5d3c54166480300a06082a8648ce3d040303300c310a300806035504030c0174301e170d3236313230363035313030315a170d3236313230383035313030315a300c310a300806035504030c01743059301306072a8648ce3d020106082a8648ce3d03010703420004a5683f9e1d3d27a9223cdd9043cc3892bbac68a5862cf951b6e751b85d25b507e9bdb4709f1fb23be8c246f63e71d936bc92dd88895316eeb4e9ff684fd5b2a0a3533051301d0603551d0e041604144c2c96f3f2f3bd75d333dcdd8d8cfc257ce997e6301f0603551d230418301680144c2c96f3f2f3bd75d333dcdd8d8cfc257ce997e6300f0603551d130101ff040530030101ff300a06082a8648ce3d04030303480030450220511e7ae42d512919c612bfb9a7f68336e8a508a57cc5cd1ad04712a0ca2faa7a0221009b05515d1ac66504b9e41572012d5c0b974d84d89884dd4e54d8d7eaac481ff3";
    /// Its SHA-384, from `openssl dgst -sha384`.
    const EC_SHA384_HASH: &str =
        "0ba2267e7de874023d3a2faeb9fd852d600f68c3990eba1e9f31046f8b56ef7e67a9e9f59f2fe5765b4555fb5e2c7fca";
    /// Self-signed Ed25519, made with `openssl req -x509 -newkey ed25519`.
    const ED25519_CERT: &str = "3082012c3081dfa00302010202143ba191d1d4d3040bbb4a2df2611558b8d34d7217300506032b6570300c310a300806035504030c0174301e170d3236313230363035313030315a170d3236313230383035313030315a300c310a300806035504030c0174302a300506032b65700321001d83ced2be11bc227382e7e113d2997309a1b082a5b47c26f34999cb047c1228a3533051301d0603551d0e041604145a708e917d6cb31d87fb1b0aff47c58152a6b707301f0603551d230418301680145a708e917d6cb31d87fb1b0aff47c58152a6b707300f0603551d130101ff040530030101ff300506032b65700341005b93347a9c9860ed739f1a05a13bb8cf44e33351b600c1c120bacbcb2c32f573cde111b27241482ce3bd4476ade343d47a6b9faa08d5fd7890609b5a31a3bc00";

    fn auth(require_auth: &str, channel_binding: ChannelBinding, transport: Transport) -> Authenticator {
        let require_auth = (!require_auth.is_empty()).then(|| require_auth.parse().unwrap());
        Authenticator::new("db:5432", "rep", require_auth, channel_binding, transport)
    }

    fn tls() -> Transport {
        Transport::Tls { server_certificate: Some(unhex(EC_SHA384_CERT)) }
    }

    /// Feeds `msgs`; the first error, or the step of the last message, and what was sent.
    fn run(a: &mut Authenticator, msgs: &[BackendMessage]) -> (Result<Step, String>, BytesMut) {
        let mut out = BytesMut::new();
        let mut asked = || Ok::<_, PgError>("pw".to_string());
        let mut last = Ok(Step::Continue);
        for m in msgs {
            last = a.on_message(m, &mut out, &mut asked).map_err(|e| e.to_string());
            if last.is_err() {
                break;
            }
        }
        (last, out)
    }

    fn refused(a: &mut Authenticator, msgs: &[BackendMessage], phrases: &[&str]) {
        let (r, _) = run(a, msgs);
        let text = r.expect_err("accepted");
        for p in phrases {
            assert!(text.contains(p), "{text:?} lacks {p:?}");
        }
    }

    use BackendMessage::{AuthenticationCleartextPassword as Cleartext, AuthenticationOk as Ok_};

    fn md5() -> BackendMessage {
        BackendMessage::AuthenticationMd5Password { salt: [1, 2, 3, 4] }
    }

    fn sasl(mechs: &[&str]) -> BackendMessage {
        BackendMessage::AuthenticationSasl { mechanisms: mechs.iter().map(|m| m.to_string()).collect() }
    }

    /// A server-first-message that extends whatever client nonce `sent` carried.
    fn server_first(sent: &[u8]) -> BackendMessage {
        let text = String::from_utf8_lossy(sent);
        // The nonce runs from the first "r=" to the next ',': it may hold "r=" itself (printable
        // characters), so splitting on every "r=" cut it short about once in a hundred runs.
        let nonce = text.split_once("r=").unwrap().1.split([',', '\0']).next().unwrap().to_string();
        BackendMessage::AuthenticationSaslContinue(Bytes::from(format!("r={nonce}srv,s=c2FsdHNhbHQ=,i=4096")))
    }

    #[test]
    fn passwords_never_go_unencrypted_over_tcp_unless_named() {
        let p = ChannelBinding::Prefer;
        refused(
            &mut auth("", p, Transport::Plain),
            &[Cleartext],
            &["cleartext", "without TLS", "require_auth=password"],
        );
        refused(&mut auth("", p, Transport::Plain), &[md5()], &["MD5", "without TLS", "require_auth=md5"]);
        // Left out of a ! list is not named: still refused.
        refused(&mut auth("!scram-sha-256", p, Transport::Plain), &[Cleartext], &["require_auth=password"]);
        for (ra, msg) in [("password", Cleartext), ("md5,password", md5())] {
            let (r, out) = run(&mut auth(ra, p, Transport::Plain), &[msg, Ok_]);
            assert_eq!(r, Ok(Step::Authenticated));
            assert_eq!(out[0], b'p');
        }
        for t in [Transport::Unix, tls()] {
            assert_eq!(run(&mut auth("", p, t.clone()), &[Cleartext, Ok_]).0, Ok(Step::Authenticated));
            assert_eq!(run(&mut auth("", p, t), &[md5(), Ok_]).0, Ok(Step::Authenticated));
        }
    }

    #[test]
    fn require_auth_is_enforced() {
        let p = ChannelBinding::Prefer;
        refused(&mut auth("scram-sha-256", p, tls()), &[Cleartext], &["require_auth=scram-sha-256", "cleartext"]);
        refused(&mut auth("!password", p, tls()), &[Cleartext], &["require_auth=!password"]);
        refused(&mut auth("password", p, tls()), &[md5()], &["require_auth=password", "MD5"]);
        refused(&mut auth("md5", p, tls()), &[sasl(&["SCRAM-SHA-256"])], &["require_auth=md5", "SASL"]);
        // Trust: only with none allowed.
        refused(&mut auth("scram-sha-256", p, tls()), &[Ok_], &["without authentication"]);
        refused(&mut auth("!none", p, tls()), &[Ok_], &["require_auth=!none"]);
        assert_eq!(run(&mut auth("", p, tls()), &[Ok_]).0, Ok(Step::Authenticated));
        assert_eq!(run(&mut auth("scram-sha-256,none", p, tls()), &[Ok_]).0, Ok(Step::Authenticated));
        assert_eq!(run(&mut auth("!md5", p, Transport::Unix), &[Cleartext, Ok_]).0, Ok(Step::Authenticated));
        refused(
            &mut auth("", p, tls()),
            &[BackendMessage::AuthenticationUnsupported("GSSAPI")],
            &["GSSAPI", "not supported"],
        );
    }

    #[test]
    fn scram_must_end_with_a_verified_server_signature() {
        for t in [Transport::Plain, tls(), Transport::Unix] {
            let mut a = auth("", ChannelBinding::Prefer, t);
            let (r, out) = run(&mut a, &[sasl(&["SCRAM-SHA-256"])]);
            assert_eq!(r, Ok(Step::Continue));
            let (r, _) = run(&mut a, &[server_first(&out)]);
            assert_eq!(r, Ok(Step::Continue));
            // The server skips AuthenticationSASLFinal.
            refused(&mut a, &[Ok_], &["SCRAM signature", "AuthenticationSASLFinal", "refused"]);
        }
        // Skipping the continue step as well.
        let mut a = auth("", ChannelBinding::Prefer, Transport::Plain);
        refused(&mut a, &[sasl(&["SCRAM-SHA-256"]), Ok_], &["SCRAM signature"]);
        // A wrong signature.
        let mut a = auth("", ChannelBinding::Prefer, Transport::Plain);
        let (_, out) = run(&mut a, &[sasl(&["SCRAM-SHA-256"])]);
        let fin = BackendMessage::AuthenticationSaslFinal(Bytes::from_static(
            b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ));
        refused(&mut a, &[server_first(&out), fin], &["signature check failed"]);
        // Final before continue.
        let mut a = auth("", ChannelBinding::Prefer, Transport::Plain);
        let fin = BackendMessage::AuthenticationSaslFinal(Bytes::from_static(b"v=AAAA"));
        refused(&mut a, &[sasl(&["SCRAM-SHA-256"]), fin], &["out of order"]);
    }

    #[test]
    fn gs2_header_follows_channel_binding() {
        let first = |a: &mut Authenticator, mechs: &[&str]| {
            let (r, out) = run(a, &[sasl(mechs)]);
            r.unwrap();
            String::from_utf8_lossy(&out).into_owned()
        };
        let both = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"];
        let m = first(&mut auth("", ChannelBinding::Prefer, tls()), &both);
        assert!(m.contains("SCRAM-SHA-256-PLUS\0") && m.contains("p=tls-server-end-point,,"), "{m:?}");
        let m = first(&mut auth("", ChannelBinding::Prefer, tls()), &["SCRAM-SHA-256"]);
        assert!(!m.contains("PLUS") && m.contains("y,,n=,r="), "{m:?}");
        let m = first(&mut auth("", ChannelBinding::Disable, tls()), &both);
        assert!(!m.contains("PLUS") && m.contains("n,,n=,r="), "{m:?}");
        let m = first(&mut auth("", ChannelBinding::Prefer, Transport::Plain), &["SCRAM-SHA-256"]);
        assert!(m.contains("n,,n=,r="), "{m:?}");
    }

    #[test]
    fn channel_binding_require() {
        let r = ChannelBinding::Require;
        refused(&mut auth("", r, Transport::Plain), &[sasl(&["SCRAM-SHA-256"])], &["does not use TLS"]);
        refused(&mut auth("", r, tls()), &[sasl(&["SCRAM-SHA-256"])], &["does not offer SCRAM-SHA-256-PLUS"]);
        refused(&mut auth("", r, tls()), &[Cleartext], &["channel_binding=require", "cleartext"]);
        refused(&mut auth("", r, tls()), &[md5()], &["channel_binding=require", "MD5"]);
        refused(&mut auth("", r, tls()), &[Ok_], &["channel_binding=require", "without authentication"]);
        let ed = Transport::Tls { server_certificate: Some(unhex(ED25519_CERT)) };
        refused(&mut auth("", r, ed), &[sasl(&["SCRAM-SHA-256-PLUS"])], &["Ed25519", "channel_binding=disable"]);
        // The binding data is the certificate's hash, sent in the client-final-message.
        let mut a = auth("", r, tls());
        let (_, out) = run(&mut a, &[sasl(&["SCRAM-SHA-256-PLUS"])]);
        let (step, fin) = run(&mut a, &[server_first(&out)]);
        assert_eq!(step, Ok(Step::Continue));
        let text = String::from_utf8_lossy(&fin);
        let cbind = text.split("c=").nth(1).unwrap().split(',').next().unwrap();
        // base64 of "p=tls-server-end-point,," starts "cD10bHMtc2VydmVyLWVuZC1wb2ludCws"; the
        // 48-byte SHA-384 makes it 96 characters in all.
        assert!(cbind.starts_with("cD10bHMtc2VydmVyLWVuZC1wb2ludCws"), "{cbind}");
        assert_eq!(cbind.len(), 96, "{cbind}");
        refused(&mut a, &[Ok_], &["SCRAM signature"]);
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        assert_eq!(tls_server_end_point(&unhex(EC_SHA384_CERT)).unwrap(), unhex(EC_SHA384_HASH));
        assert!(tls_server_end_point(&unhex(ED25519_CERT)).unwrap_err().contains("Ed25519"));
        // Synthetic certificates: SEQUENCE { SEQUENCE {}, SEQUENCE { OID, params }, BIT STRING }.
        let cert = |alg: &[u8]| {
            let mut body = vec![0x30, 0x00, 0x30, alg.len() as u8];
            body.extend_from_slice(alg);
            body.extend_from_slice(&[0x03, 0x01, 0x00]);
            let mut c = vec![0x30, body.len() as u8];
            c.extend(body);
            c
        };
        let oid = |o: &[u8]| {
            let mut v = vec![0x06, o.len() as u8];
            v.extend_from_slice(o);
            v
        };
        let rsa = |last: u8| oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, last]);
        for (alg, len) in
            [(rsa(0x05), 32), (rsa(0x04), 32), (rsa(0x0b), 32), (rsa(0x0c), 48), (rsa(0x0d), 64), (rsa(0x0e), 28)]
        {
            assert_eq!(tls_server_end_point(&cert(&alg)).unwrap().len(), len, "{alg:02x?}");
        }
        let sha1 = cert(&oid(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]));
        assert_eq!(tls_server_end_point(&sha1).unwrap(), sha2::Sha256::digest(&sha1).to_vec());
        // RSASSA-PSS with SHA-512 in its parameters, and with none (SHA-1, so SHA-256).
        let mut pss = rsa(0x0a);
        let sha512 = oid(&[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03]);
        pss.extend([0x30, sha512.len() as u8 + 4, 0xa0, sha512.len() as u8 + 2, 0x30, sha512.len() as u8]);
        pss.extend(&sha512);
        assert_eq!(tls_server_end_point(&cert(&pss)).unwrap().len(), 64);
        let mut pss = rsa(0x0a);
        pss.extend([0x30, 0x00]);
        assert_eq!(tls_server_end_point(&cert(&pss)).unwrap().len(), 32);
        assert!(tls_server_end_point(&cert(&oid(&[0x2a, 0x03]))).unwrap_err().contains("unknown"));
        assert!(tls_server_end_point(&[0x30, 0x82, 0xff]).is_err());
        assert!(tls_server_end_point(&[]).is_err());
    }
}
