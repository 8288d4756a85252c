//! Administration: who may do what, what they did, and the deployment's credentials.
//!
//! | module | what |
//! |---|---|
//! | [`accounts`] | dashboard and API accounts: roles, scopes, passwords, TOTP, sessions, tokens |
//! | [`audit`] | the hash-chained, append-only audit log |
//! | [`pki`] | the deployment's CA, Mosquitto's config and each home's credentials |
//! | [`nats`] | the clustered broker's config, generated from the same PKI |

pub mod accounts;
pub mod audit;
pub mod nats;
pub mod pki;
