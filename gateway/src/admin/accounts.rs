//! Accounts for the dashboard and the API: people, their roles and scopes, passwords,
//! two-factor codes, sessions, API tokens and login throttling.
//!
//! ## Roles and scope
//! | role | sees | may |
//! |---|---|---|
//! | `admin` | every home | everything, manage accounts, read the audit log |
//! | `coordinator` | homes in its municipalities | acknowledge, clear |
//! | `facility` | its homes | acknowledge, clear |
//! | `family` | its own home | read, acknowledge |
//!
//! [`User::may_see`] is the one rule; every page, API route and live stream asks it, and a
//! home outside the scope is answered exactly as a home that does not exist (404).
//!
//! ## Secrets
//! - Passwords: argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes), checked by
//!   [`check_password`]: at least [`MIN_PASSWORD_CHARS`] characters once Unicode spaces are
//!   folded, five different characters, no short unit repeated, not the username, not a
//!   well-known password with digits added. Verifying one costs ~50 ms of CPU, so it runs on a
//!   small bounded pool, never while the web's database connection is held
//!   (`crate::web::App::verify_password`).
//! - Session and API tokens: 32 random bytes; only their SHA-256 is stored, so a copy of
//!   the database does not log anyone in. A new password ends the account's sessions and
//!   revokes its API tokens.
//! - TOTP (RFC 6238: SHA-1, 30 s, 6 digits, ±1 step); a code is accepted once
//!   (`totp_last_step`). Required for admins: `users add --role admin` enrols it. The secret is
//!   stored encrypted (AES-256-GCM) with a [`TotpKey`] derived from the gateway's link secret,
//!   which lives outside the database (a file or an environment variable).
//!
//! ## Throttling
//! [`Throttle`] is pure (time passed in): five attempts for a username (twenty from one
//! address, since an office shares one) within 15 minutes refuse further tries for that key
//! until the oldest of them is 15 minutes old. An attempt is *reserved* before its password is
//! verified and counts as a failure unless it succeeds, so forty attempts sent at once get five
//! verifications, not forty. A success takes back only its own reservation. It is kept in memory:
//! a restart forgets it, which costs an attacker a gateway restart they cannot cause.
//!
//! Over 800 lines for a reason: the rules of accounts, passwords, sessions, two-factor codes,
//! API tokens and login throttling belong together (one place decides who may sign in); their
//! rows are behind the store seam (`store/*_accounts.rs`).

use std::collections::{HashMap, VecDeque};

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::Duration;
use hmac::{Hmac, Mac};
use mamori_protocol::mqtt::{HomeId, Role};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::domain::engine::Time;
use crate::domain::homes::Home;
use crate::edge::store::{AccountRows, StoreError};

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// An account failure.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The store refused.
    #[error("accounts: {0}")]
    Store(#[from] StoreError),
    /// Something the caller can fix.
    #[error("{0}")]
    Invalid(String),
    /// A password that may not be used.
    #[error("{}", .0.text(false))]
    Password(PasswordProblem),
}

/// Why a password may not be used, said to the person choosing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordProblem {
    /// Fewer than [`MIN_PASSWORD_CHARS`] characters.
    TooShort,
    /// Fewer than five different characters.
    FewDifferent,
    /// A few characters repeated.
    Repeated,
    /// A run up or down the alphabet or the digits.
    Run,
    /// It contains the username.
    HasUsername,
    /// Digits with too few different.
    FewDigits,
    /// One of the first an attacker tries.
    Common,
}

impl PasswordProblem {
    /// The reason, in Japanese or in English.
    pub fn text(self, japanese: bool) -> String {
        let (ja, en) = match self {
            Self::TooShort => (
                format!("パスワードは{MIN_PASSWORD_CHARS}文字以上にしてください（前後の空白は数えません）。"),
                format!(
                    "A password needs at least {MIN_PASSWORD_CHARS} characters (spaces at either end do not count)."
                ),
            ),
            Self::FewDifferent => (
                "異なる文字を5種類以上使ってください。".into(),
                "A password needs at least 5 different characters.".into(),
            ),
            Self::Repeated => (
                "同じ文字の繰り返しはパスワードに使えません。".into(),
                "A password cannot be a few characters repeated.".into(),
            ),
            Self::Run => (
                "「abcdef」や「123456」のような並びはパスワードに使えません。".into(),
                "A password cannot be a run of letters or digits.".into(),
            ),
            Self::HasUsername => {
                ("ユーザー名を含むパスワードは使えません。".into(), "A password cannot contain the username.".into())
            }
            Self::FewDigits => (
                "数字だけのパスワードは推測されやすいため、言葉を組み合わせてください。".into(),
                "A password of digits alone is easy to guess: use words.".into(),
            ),
            Self::Common => (
                "このパスワードはよく使われていて、真っ先に試されます。別のものにしてください。".into(),
                "That password is one of the first an attacker tries: choose another.".into(),
            ),
        };
        if japanese {
            ja
        } else {
            en
        }
    }
}

/// A role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountRole {
    /// Everything.
    Admin,
    /// A municipality's coordinator.
    Coordinator,
    /// A care facility.
    Facility,
    /// A family.
    Family,
}

impl AccountRole {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountRole::Admin => "admin",
            AccountRole::Coordinator => "coordinator",
            AccountRole::Facility => "facility",
            AccountRole::Family => "family",
        }
    }

    /// Parse a name.
    pub fn parse(s: &str) -> Option<AccountRole> {
        Some(match s {
            "admin" => AccountRole::Admin,
            "coordinator" => AccountRole::Coordinator,
            "facility" => AccountRole::Facility,
            "family" => AccountRole::Family,
            _ => return None,
        })
    }

    /// The escalation role an acknowledgement by this account counts as.
    pub fn ack_role(self) -> Role {
        match self {
            AccountRole::Admin => Role::SupportCentre,
            AccountRole::Coordinator => Role::Coordinator,
            AccountRole::Facility => Role::Facility,
            AccountRole::Family => Role::Family,
        }
    }
}

/// An account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// Row id.
    pub id: i64,
    /// Login name.
    pub username: String,
    /// Shown name.
    pub display_name: String,
    /// Role.
    pub role: AccountRole,
    /// Coordinator scope: municipality codes.
    pub municipalities: Vec<String>,
    /// Facility and family scope: home ids.
    pub homes: Vec<String>,
    /// Two-factor codes are asked at login.
    pub totp: bool,
    /// Disabled: cannot log in; sessions and tokens stop working.
    pub disabled: bool,
}

impl User {
    /// Whether this account may see a home. The one scope rule.
    pub fn may_see(&self, home: &Home) -> bool {
        if self.disabled {
            return false;
        }
        match self.role {
            AccountRole::Admin => true,
            AccountRole::Coordinator => self.municipalities.iter().any(|m| m == &home.municipality),
            AccountRole::Facility | AccountRole::Family => self.homes.iter().any(|h| h == home.id.as_str()),
        }
    }

    /// Whether this account may see an incident of a municipality (coordinators of it, admins).
    pub fn may_see_municipality(&self, code: &str) -> bool {
        !self.disabled
            && match self.role {
                AccountRole::Admin => true,
                AccountRole::Coordinator => self.municipalities.iter().any(|m| m == code),
                AccountRole::Facility | AccountRole::Family => false,
            }
    }

    /// May clear alerts by hand.
    pub fn may_clear(&self) -> bool {
        self.role != AccountRole::Family
    }

    /// Whether this account may create or change the care plan of a home in `municipality`
    /// (administrators; coordinators in their own municipalities).
    pub fn may_edit_plan(&self, municipality: &str) -> bool {
        matches!(self.role, AccountRole::Admin | AccountRole::Coordinator) && self.may_see_municipality(municipality)
    }

    /// Whether this account may start a drill at a home it may see (coordinators and
    /// administrators: a drill reaches every contact of the home).
    pub fn may_drill(&self) -> bool {
        matches!(self.role, AccountRole::Admin | AccountRole::Coordinator)
    }
}

/// A new account, as the CLI or the admin page asks for it.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Login name: 3–32 of `a-z 0-9 . _ -`.
    pub username: String,
    /// Shown name.
    pub display_name: String,
    /// Role.
    pub role: AccountRole,
    /// Coordinator scope.
    pub municipalities: Vec<String>,
    /// Facility/family scope.
    pub homes: Vec<String>,
}

impl NewUser {
    /// Check the fields and the scope's shape for the role.
    pub fn validate(&self) -> Result<(), AccountError> {
        let bad = |m: String| Err(AccountError::Invalid(m));
        let u = &self.username;
        if !(3..=32).contains(&u.len())
            || !u.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        {
            return bad(format!("username {u:?}: use 3 to 32 of a-z, 0-9, '.', '_', '-'"));
        }
        if self.display_name.trim().is_empty() || self.display_name.chars().count() > 64 {
            return bad("display name: 1 to 64 characters".into());
        }
        for m in &self.municipalities {
            if !crate::domain::homes::valid_municipality(m) {
                return bad(format!(
                    "municipality {m:?} is not a 6-digit local government code with a valid check digit"
                ));
            }
        }
        for h in &self.homes {
            if HomeId::new(h).is_err() {
                return bad(format!("home {h:?} is not a valid home id"));
            }
        }
        match self.role {
            AccountRole::Coordinator if self.municipalities.is_empty() => {
                bad("a coordinator needs at least one --municipality".into())
            }
            AccountRole::Facility if self.homes.is_empty() => bad("a facility needs at least one --home".into()),
            AccountRole::Family if self.homes.len() != 1 => bad("a family account has exactly one --home".into()),
            AccountRole::Admin if !(self.municipalities.is_empty() && self.homes.is_empty()) => {
                bad("an admin sees every home: give no --municipality or --home".into())
            }
            AccountRole::Coordinator if !self.homes.is_empty() => {
                bad("a coordinator is scoped by --municipality, not --home".into())
            }
            AccountRole::Facility | AccountRole::Family if !self.municipalities.is_empty() => {
                bad("a facility or family account is scoped by --home, not --municipality".into())
            }
            _ => Ok(()),
        }
    }
}

/// Well-known passwords (their letters, lowercase): a password that is one of these with digits
/// or punctuation around it is refused.
const TRIVIAL: &[&str] = &[
    "password",
    "passw0rd",
    "passwort",
    "motdepasse",
    "qwerty",
    "qwertyuiop",
    "qwertyui",
    "asdfghjkl",
    "asdfgh",
    "zxcvbnm",
    "abcdefghijkl",
    "abcdefg",
    "abcdef",
    "iloveyou",
    "welcome",
    "letmein",
    "admin",
    "administrator",
    "root",
    "user",
    "guest",
    "mamori",
    "changeme",
    "default",
    "secret",
    "monkey",
    "dragon",
    "football",
    "baseball",
    "sunshine",
    "princess",
    "superman",
    "batman",
    "trustno",
    "master",
    "shadow",
    "michael",
    "jennifer",
    "hello",
    "sakura",
    "doraemon",
    "pokemon",
    "pikachu",
    "naruto",
    "tokyo",
    "japan",
    "nippon",
    "kumamoto",
    "nagano",
    "hospital",
    "family",
    "coordinator",
    "facility",
];

/// Whether a password may be used (for `username`): the reason when not.
pub fn check_password(password: &str, username: &str) -> Result<(), AccountError> {
    let bad = |p: PasswordProblem| Err(AccountError::Password(p));
    // Unicode spaces (ideographic, no-break...) are spaces; leading and trailing ones do not count.
    let folded: String = password.chars().map(|c| if c.is_whitespace() { ' ' } else { c }).collect();
    let folded = folded.trim();
    let chars: Vec<char> = folded.chars().collect();
    if chars.len() < MIN_PASSWORD_CHARS {
        return bad(PasswordProblem::TooShort);
    }
    if chars.iter().collect::<std::collections::BTreeSet<_>>().len() < 5 {
        return bad(PasswordProblem::FewDifferent);
    }
    if (1..=4).any(|unit| chars.len().is_multiple_of(unit) && chars.chunks(unit).all(|c| c == &chars[..unit])) {
        return bad(PasswordProblem::Repeated);
    }
    let lower = folded.to_lowercase();
    // A run up or down the keyboard's digits or the alphabet (`123456789012`, `abcdefghijkl`).
    let b = lower.as_bytes();
    let steps = b
        .windows(2)
        .filter(|w| {
            (i16::from(w[1]) - i16::from(w[0])).abs() == 1 || matches!((w[0], w[1]), (b'9', b'0') | (b'0', b'9'))
        })
        .count();
    if steps + 2 >= b.len() {
        return bad(PasswordProblem::Run);
    }
    if username.len() >= 3 && lower.contains(&username.to_lowercase()) {
        return bad(PasswordProblem::HasUsername);
    }
    // Letters, with the usual substitutions undone (`Passw0rd` is `password`).
    let letters: String = lower
        .chars()
        .map(|c| match c {
            '0' => 'o',
            '1' | '!' => 'i',
            '3' => 'e',
            '4' | '@' => 'a',
            '5' | '$' => 's',
            '7' => 't',
            c => c,
        })
        .filter(|c| c.is_alphabetic())
        .collect();
    let digits_only = lower.chars().all(|c| c.is_ascii_digit() || c.is_ascii_punctuation() || c == ' ');
    if digits_only && chars.iter().filter(|c| c.is_ascii_digit()).collect::<std::collections::BTreeSet<_>>().len() < 8 {
        return bad(PasswordProblem::FewDigits);
    }
    let plain: String = lower.chars().filter(|c| c.is_alphabetic()).collect();
    let trivial = |t: &&str| {
        plain == *t || letters == *t || ((plain.contains(*t) || letters.contains(*t)) && plain.len() <= t.len() + 4)
    };
    if !letters.is_empty() && TRIVIAL.iter().any(trivial) {
        return bad(PasswordProblem::Common);
    }
    Ok(())
}

/// Hash a password (argon2id, random salt) after [`check_password`].
pub fn hash_password(password: &str) -> Result<String, AccountError> {
    hash_password_for(password, "")
}

/// Hash `username`'s new password (argon2id, random salt) after [`check_password`].
pub fn hash_password_for(password: &str, username: &str) -> Result<String, AccountError> {
    check_password(password, username)?;
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AccountError::Invalid(format!("cannot hash the password: {e}")))
}

/// Check a password against its stored hash.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// A hash to verify against when the username does not exist, so that a wrong username
/// costs the same time as a wrong password.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("decoy-password-never-used").unwrap_or_default())
}

/// The key TOTP secrets are encrypted with at rest, derived from the gateway's link secret
/// (which lives outside the database), so that a copy of the database alone does not give the
/// second factor away.
#[derive(Clone)]
pub struct TotpKey([u8; 32]);

impl std::fmt::Debug for TotpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpKey(…)")
    }
}

/// What an encrypted TOTP secret starts with in the database.
const SEALED: &str = "enc1:";

impl TotpKey {
    /// Derive the key from a secret kept outside the database.
    pub fn derive(secret: &[u8]) -> TotpKey {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| {
            // HMAC takes keys of any length: this cannot fail.
            Hmac::<Sha256>::new_from_slice(b"mamori").expect("a fixed key")
        });
        mac.update(b"mamori: TOTP secrets at rest, v1");
        TotpKey(mac.finalize().into_bytes().into())
    }

    fn aead(&self) -> Result<aws_lc_rs::aead::RandomizedNonceKey, AccountError> {
        aws_lc_rs::aead::RandomizedNonceKey::new(&aws_lc_rs::aead::AES_256_GCM, &self.0)
            .map_err(|_| AccountError::Invalid("cannot set up the TOTP key".into()))
    }

    /// Encrypt a secret for the database.
    pub fn seal(&self, secret: &str) -> Result<String, AccountError> {
        let mut data = secret.as_bytes().to_vec();
        let nonce = self
            .aead()?
            .seal_in_place_append_tag(aws_lc_rs::aead::Aad::from(b"totp"), &mut data)
            .map_err(|_| AccountError::Invalid("cannot encrypt the TOTP secret".into()))?;
        let mut out = nonce.as_ref().to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{SEALED}{}", data_encoding::BASE64URL_NOPAD.encode(&out)))
    }

    /// Decrypt a secret from the database (one stored before encryption is returned as is).
    pub fn open(&self, stored: &str) -> Option<String> {
        let Some(b64) = stored.strip_prefix(SEALED) else { return Some(stored.to_string()) };
        let raw = data_encoding::BASE64URL_NOPAD.decode(b64.as_bytes()).ok()?;
        if raw.len() < aws_lc_rs::aead::NONCE_LEN {
            return None;
        }
        let (nonce, ct) = raw.split_at(aws_lc_rs::aead::NONCE_LEN);
        let nonce = aws_lc_rs::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut ct = ct.to_vec();
        let plain = self.aead().ok()?.open_in_place(nonce, aws_lc_rs::aead::Aad::from(b"totp"), &mut ct).ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

/// A random token: 32 bytes, URL-safe base64.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    data_encoding::BASE64URL_NOPAD.encode(&b)
}

/// What is stored for a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new TOTP secret (20 random bytes), base32 as authenticator apps take it.
pub fn new_totp_secret() -> String {
    let mut b = [0u8; 20];
    rand::rng().fill_bytes(&mut b);
    data_encoding::BASE32_NOPAD.encode(&b)
}

/// The `otpauth://` URI for an authenticator app.
pub fn totp_uri(username: &str, secret: &str) -> String {
    format!("otpauth://totp/mamori:{username}?secret={secret}&issuer=mamori&algorithm=SHA1&digits=6&period=30")
}

/// The code for a time step (RFC 6238 over RFC 4226).
pub fn totp_code(secret_b32: &str, step: i64) -> Option<u32> {
    let key = data_encoding::BASE32_NOPAD.decode(secret_b32.trim_end_matches('=').as_bytes()).ok()?;
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(&key).ok()?;
    mac.update(&step.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let off = usize::from(h[19] & 0x0f);
    let bin = u32::from_be_bytes([h[off] & 0x7f, h[off + 1], h[off + 2], h[off + 3]]);
    Some(bin % 1_000_000)
}

/// The step a code matches at `now` (±1 step), if any, and later than `last_step`.
pub fn totp_check(secret_b32: &str, code: &str, now: Time, last_step: i64) -> Option<i64> {
    let code: u32 = code.trim().parse().ok().filter(|_| code.trim().len() == 6)?;
    let step = now.timestamp().div_euclid(30);
    (step - 1..=step + 1).find(|s| *s > last_step && totp_code(secret_b32, *s) == Some(code))
}

/// Failed-login bookkeeping (pure; time passed in).
#[derive(Debug, Default)]
pub struct Throttle {
    failures: HashMap<String, VecDeque<Time>>,
    /// Per key: when a refusal was last written to the audit log, and refusals since.
    refused: HashMap<String, (Time, u64)>,
}

impl Throttle {
    /// Failures allowed in the window for a username (`u:` keys).
    pub const MAX_FAILURES: usize = 5;
    /// Failures allowed in the window from one address (`ip:` keys).
    pub const MAX_FAILURES_PER_ADDRESS: usize = 20;

    fn limit(key: &str) -> usize {
        if key.starts_with("ip:") {
            Self::MAX_FAILURES_PER_ADDRESS
        } else {
            Self::MAX_FAILURES
        }
    }
    /// The window, min.
    pub const WINDOW_MIN: i64 = 15;

    fn window() -> Duration {
        Duration::minutes(Self::WINDOW_MIN)
    }

    fn prune(&mut self, now: Time) {
        if self.failures.len() > 100_000 {
            // Bounded memory under a spray of usernames: forget the quiet ones.
            self.failures.retain(|_, q| q.back().is_some_and(|t| now - *t < Self::window()));
            self.refused.retain(|_, (t, _)| now - *t < Self::window());
        }
    }

    /// Reserve an attempt for every key: `Err(wait)` while one of them is locked out, else the
    /// reservation, which counts as a failure until [`Throttle::succeed`] takes it back. Reserve
    /// before verifying: attempts sent at once then count before any of them is checked.
    pub fn reserve(&mut self, keys: &[&str], now: Time) -> Result<Time, Duration> {
        self.prune(now);
        let mut wait = Duration::zero();
        for k in keys {
            if let Some(q) = self.failures.get_mut(*k) {
                while q.front().is_some_and(|t| now - *t >= Self::window()) {
                    q.pop_front();
                }
                if q.len() >= Self::limit(k) {
                    if let Some(first) = q.front() {
                        wait = wait.max(*first + Self::window() - now);
                    }
                }
            }
        }
        if wait > Duration::zero() {
            return Err(wait);
        }
        for k in keys {
            self.failures.entry((*k).to_string()).or_default().push_back(now);
        }
        Ok(now)
    }

    /// An attempt succeeded: take back its reservation (earlier failures stay counted).
    pub fn succeed(&mut self, keys: &[&str], reservation: Time) {
        for k in keys {
            if let Some(q) = self.failures.get_mut(*k) {
                if let Some(i) = q.iter().rposition(|t| *t == reservation) {
                    q.remove(i);
                }
            }
        }
    }

    /// A refused attempt for `key`: `Some(n)` when it should be written to the audit log now,
    /// with the attempts refused since the last entry (one entry a minute per key, however
    /// fast an attacker tries).
    pub fn refused(&mut self, key: &str, now: Time) -> Option<u64> {
        let e = self.refused.entry(key.to_string()).or_insert((Time::MIN_UTC, 0));
        e.1 += 1;
        if now - e.0 >= Duration::minutes(1) {
            let n = e.1;
            *e = (now, 0);
            Some(n)
        } else {
            None
        }
    }
}

/// The accounts' rules over their rows ([`AccountRows`], any store backend).
pub struct Accounts<'a> {
    rows: &'a mut dyn AccountRows,
}

/// What a login checks, read from the database in one short step.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The account.
    pub user: User,
    /// Its password hash (verified by the caller, off the database).
    pub hash: String,
    /// Its TOTP secret, decrypted (`Some("")` when it does not decrypt: no code can match).
    pub totp: Option<String>,
    /// The last TOTP step used.
    pub last_step: i64,
}

/// A session found by its cookie.
#[derive(Debug, Clone)]
pub struct Session {
    /// Its user.
    pub user: User,
    /// The form token.
    pub csrf: String,
    /// The cookie's stored hash.
    pub id_hash: String,
}

impl<'a> Accounts<'a> {
    /// Over a store's account rows.
    pub fn new(rows: &'a mut dyn AccountRows) -> Accounts<'a> {
        Accounts { rows }
    }

    /// Add an account. Its homes must be registered (a facility or family account for a home
    /// that does not exist would see nothing, or the home that later takes the id).
    pub fn add(
        &mut self,
        u: &NewUser,
        password: &str,
        totp_secret: Option<&str>,
        key: &TotpKey,
        now: Time,
    ) -> Result<User, AccountError> {
        u.validate()?;
        let hash = hash_password_for(password, &u.username)?;
        if self.rows.user_by_name(&u.username)?.is_some() {
            return Err(AccountError::Invalid(format!("user {} exists already", u.username)));
        }
        for h in &u.homes {
            if !self.rows.home_exists(h)? {
                return Err(AccountError::Invalid(format!(
                    "home {h} is not registered (import it first: homes import, or the homes file)"
                )));
            }
        }
        let totp_secret = totp_secret.map(|t| key.seal(t)).transpose()?;
        self.rows.insert_user(u, &hash, totp_secret.as_deref(), now)?;
        self.rows.user_by_name(&u.username)?.ok_or_else(|| AccountError::Invalid("the new user vanished".into()))
    }

    /// Every account.
    pub fn list(&self) -> Result<Vec<User>, AccountError> {
        Ok(self.rows.users()?)
    }

    /// One account by name.
    pub fn by_username(&self, username: &str) -> Result<Option<User>, AccountError> {
        Ok(self.rows.user_by_name(username)?)
    }

    /// What a login checks, read in one short step (the password itself is verified by the
    /// caller, off the database: [`verify_password`]). `None`: no such user.
    pub fn credentials(&self, username: &str, key: &TotpKey) -> Result<Option<Credentials>, AccountError> {
        let Some(s) = self.rows.login_secrets(username)? else { return Ok(None) };
        let Some(user) = self.rows.user_by_name(username)? else { return Ok(None) };
        // A secret that does not decrypt (another key) is no secret: the login fails.
        let totp = s.totp_secret.map(|s| key.open(&s).ok_or(())).transpose();
        Ok(Some(Credentials {
            user,
            hash: s.password_hash,
            totp: totp.unwrap_or(Some(String::new())),
            last_step: s.totp_last_step,
        }))
    }

    /// The second step of a login whose password was right: `Ok(None)` for any failure
    /// (disabled, wrong or reused code, an admin without a second factor); the user once the
    /// code's step is recorded.
    pub fn second_factor(&mut self, c: &Credentials, code: &str, now: Time) -> Result<Option<User>, AccountError> {
        if c.user.disabled {
            return Ok(None);
        }
        match &c.totp {
            Some(secret) => {
                let Some(step) = totp_check(secret, code, now, c.last_step) else { return Ok(None) };
                // Once per step, even with two logins at once: only one update wins.
                Ok(self.rows.use_totp_step(c.user.id, step)?.then(|| c.user.clone()))
            }
            // Required for admins; `users add` enrols it, so this is a damaged row.
            None if c.user.role == AccountRole::Admin => Ok(None),
            None => Ok(Some(c.user.clone())),
        }
    }

    /// The stored password hash of an account.
    pub fn password_hash(&self, username: &str) -> Result<Option<String>, AccountError> {
        Ok(self.rows.login_secrets(username)?.map(|s| s.password_hash))
    }

    /// Set a password ([`check_password`]): ends the account's sessions and revokes its API
    /// tokens (a token made by whoever knew the old password must not outlive it).
    pub fn set_password(&mut self, username: &str, password: &str) -> Result<(), AccountError> {
        let hash = hash_password_for(password, username)?;
        if !self.rows.replace_password(username, &hash)? {
            return Err(AccountError::Invalid(format!("no user {username}")));
        }
        Ok(())
    }

    /// Encrypt every TOTP secret still stored in clear (from before encryption at rest);
    /// returns how many.
    pub fn seal_totp_secrets(&mut self, key: &TotpKey) -> Result<usize, AccountError> {
        let mut n = 0;
        for (id, secret) in self.rows.totp_secrets()?.into_iter().filter(|(_, s)| !s.starts_with(SEALED)) {
            self.rows.set_totp_secret(id, &key.seal(&secret)?)?;
            n += 1;
        }
        Ok(n)
    }

    /// Disable or enable; disabling ends its sessions.
    pub fn set_disabled(&mut self, username: &str, disabled: bool) -> Result<(), AccountError> {
        if !self.rows.set_disabled(username, disabled)? {
            return Err(AccountError::Invalid(format!("no user {username}")));
        }
        if disabled {
            self.rows.end_sessions(username)?;
        }
        Ok(())
    }

    /// Change an account's role and scope in place, with the rules of a new account (a
    /// coordinator's municipalities, a facility's or family's registered homes). Its sessions
    /// and tokens go on with the new scope at their next request. Not to or from admin: an
    /// admin account is made with its two-factor secret (`users add --role admin`), and an
    /// admin's rights are taken away by disabling the account.
    pub fn set_scope(
        &mut self,
        username: &str,
        role: AccountRole,
        municipalities: Vec<String>,
        homes: Vec<String>,
    ) -> Result<User, AccountError> {
        let Some(old) = self.rows.user_by_name(username)? else {
            return Err(AccountError::Invalid(format!("no user {username}")));
        };
        if (old.role == AccountRole::Admin) != (role == AccountRole::Admin) {
            return Err(AccountError::Invalid(
                "an account does not become or stop being an admin in place: add an admin account (it gets its \
                 two-factor secret), or disable this one"
                    .into(),
            ));
        }
        let new = NewUser {
            username: old.username.clone(),
            display_name: old.display_name.clone(),
            role,
            municipalities,
            homes,
        };
        new.validate()?;
        for h in &new.homes {
            if !self.rows.home_exists(h)? {
                return Err(AccountError::Invalid(format!(
                    "home {h} is not registered (import it first: homes import, or the homes file)"
                )));
            }
        }
        self.rows.set_scope(username, role, &new.municipalities, &new.homes)?;
        self.rows.user_by_name(username)?.ok_or_else(|| AccountError::Invalid(format!("no user {username}")))
    }

    /// Turn on two-factor codes once the user has typed a code from the new secret.
    pub fn enable_totp(
        &mut self,
        username: &str,
        secret: &str,
        code: &str,
        key: &TotpKey,
        now: Time,
    ) -> Result<bool, AccountError> {
        let Some(step) = totp_check(secret, code, now, 0) else { return Ok(false) };
        self.rows.enrol_totp(username, &key.seal(secret)?, step)?;
        Ok(true)
    }

    /// Start a session; returns the cookie's token.
    pub fn start_session(&mut self, user: &User, now: Time) -> Result<String, AccountError> {
        let token = new_token();
        self.rows.insert_session(&token_hash(&token), user.id, &new_token(), now)?;
        Ok(token)
    }

    /// The live session for a cookie: not idle for `idle`, not older than `max_age`, user enabled.
    pub fn session(
        &mut self,
        token: &str,
        now: Time,
        idle: Duration,
        max_age: Duration,
    ) -> Result<Option<Session>, AccountError> {
        let id_hash = token_hash(token);
        let Some(row) = self.rows.session(&id_hash)? else { return Ok(None) };
        let (Some(created), Some(seen)) = (row.created_at, row.last_seen) else { return Ok(None) };
        if now - seen > idle || now - created > max_age {
            self.rows.delete_session(&id_hash)?;
            return Ok(None);
        }
        let Some(user) = self.rows.user_by_id(row.user_id)?.filter(|u| !u.disabled) else { return Ok(None) };
        if now - seen > Duration::seconds(30) {
            self.rows.touch_session(&id_hash, now)?;
        }
        Ok(Some(Session { user, csrf: row.csrf, id_hash }))
    }

    /// Whether a session (by its stored hash) is still live: not idle for `idle` (by the last
    /// request, which this does not move), not older than `max_age`, its user enabled. A live
    /// stream asks this, so that it ends at logout, expiry or disable.
    pub fn session_alive(
        &self,
        id_hash: &str,
        now: Time,
        idle: Duration,
        max_age: Duration,
    ) -> Result<bool, AccountError> {
        let Some(row) = self.rows.session(id_hash)? else { return Ok(false) };
        let fresh =
            row.created_at.is_some_and(|c| now - c <= max_age) && row.last_seen.is_some_and(|s| now - s <= idle);
        Ok(fresh && self.rows.user_by_id(row.user_id)?.is_some_and(|u| !u.disabled))
    }

    /// End a session.
    pub fn end_session(&mut self, id_hash: &str) -> Result<(), AccountError> {
        Ok(self.rows.delete_session(id_hash)?)
    }

    /// Issue an API token acting as a user; returns the token (shown once).
    pub fn add_token(&mut self, username: &str, name: &str, now: Time) -> Result<String, AccountError> {
        let user = self.by_username(username)?.ok_or_else(|| AccountError::Invalid(format!("no user {username}")))?;
        let token = format!("mmr_{}", new_token());
        self.rows.insert_token(&token_hash(&token), user.id, name, now)?;
        Ok(token)
    }

    /// An account's API tokens: what each is for, when it was made, whether it is revoked.
    pub fn tokens(&self, username: &str) -> Result<Vec<crate::edge::store::TokenRow>, AccountError> {
        if self.rows.user_by_name(username)?.is_none() {
            return Err(AccountError::Invalid(format!("no user {username}")));
        }
        Ok(self.rows.tokens(username)?)
    }

    /// Revoke one of an account's API tokens (a lost laptop's), leaving the others; returns
    /// what it was for.
    pub fn revoke_token(&mut self, username: &str, id: i64) -> Result<String, AccountError> {
        let name = self.tokens(username)?.into_iter().find(|t| t.id == id).map(|t| t.name);
        if !self.rows.revoke_token(username, id)? {
            return Err(AccountError::Invalid(match name {
                Some(_) => format!("token {id} of {username} is revoked already"),
                None => format!("{username} has no token {id}"),
            }));
        }
        Ok(name.unwrap_or_default())
    }

    /// The user a bearer token acts as (not revoked, user enabled).
    pub fn token_user(&self, token: &str) -> Result<Option<User>, AccountError> {
        Ok(self.rows.token_user(&token_hash(token))?.filter(|u| !u.disabled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        chrono::DateTime::from_timestamp(1_790_000_000 + s, 0).unwrap()
    }

    #[test]
    fn totp_matches_the_rfc_6238_sha1_vectors() {
        // RFC 6238 appendix B: the ASCII key "12345678901234567890", 8 digits there; we keep 6.
        let secret = data_encoding::BASE32_NOPAD.encode(b"12345678901234567890");
        assert_eq!(totp_code(&secret, 59 / 30), Some(94_287_082 % 1_000_000));
        assert_eq!(totp_code(&secret, 1_111_111_109 / 30), Some(7_081_804 % 1_000_000));
        assert_eq!(totp_code(&secret, 20_000_000_000 / 30), Some(65_353_130 % 1_000_000));
    }

    #[test]
    fn a_totp_code_works_once_within_a_step_either_side() {
        let secret = new_totp_secret();
        let now = t(0);
        let step = now.timestamp() / 30;
        let code = format!("{:06}", totp_code(&secret, step).unwrap());
        assert_eq!(totp_check(&secret, &code, now, 0), Some(step));
        assert_eq!(totp_check(&secret, &code, now + Duration::seconds(30), 0), Some(step));
        assert_eq!(totp_check(&secret, &code, now + Duration::seconds(90), 0), None, "too late");
        assert_eq!(totp_check(&secret, &code, now, step), None, "used already");
        assert_eq!(totp_check(&secret, "12345", now, 0), None);
        assert_eq!(totp_check(&secret, "abcdef", now, 0), None);
    }

    #[test]
    fn attempts_lock_a_username_or_an_address_for_the_rest_of_fifteen_minutes() {
        let mut th = Throttle::default();
        for i in 0..5 {
            assert!(th.reserve(&["u:alice", "ip:1.2.3.4"], t(i)).is_ok());
        }
        let wait = th.reserve(&["u:alice"], t(10)).unwrap_err();
        assert_eq!(wait, Duration::minutes(15) - Duration::seconds(10));
        for i in 5..20 {
            assert!(th.reserve(&[&format!("u:user{i}"), "ip:1.2.3.4"], t(i)).is_ok());
        }
        assert!(th.reserve(&["u:carol", "ip:1.2.3.4"], t(30)).is_err(), "twenty from one address lock it");
        assert!(th.reserve(&["u:bob", "ip:5.6.7.8"], t(10)).is_ok(), "others are not held up");
        assert!(th.reserve(&["u:alice"], t(15 * 60)).is_ok(), "the oldest failure left the window");
    }

    #[test]
    fn forty_attempts_at_once_get_five_and_a_success_takes_back_only_its_own() {
        let mut th = Throttle::default();
        let keys = ["u:alice", "ip:1.2.3.4"];
        // Forty sent at once: each reserves before any is verified.
        let granted: Vec<Time> = (0..40).filter_map(|_| th.reserve(&keys, t(0)).ok()).collect();
        assert_eq!(granted.len(), 5);
        // One of them was right: it takes back its reservation, the four others stay.
        th.succeed(&keys, granted[4]);
        assert!(th.reserve(&keys, t(1)).is_ok(), "one more, not a fresh five");
        assert!(th.reserve(&keys, t(1)).is_err());
    }

    #[test]
    fn refusals_are_audited_once_a_minute_with_their_count() {
        let mut th = Throttle::default();
        assert_eq!(th.refused("u:alice", t(0)), Some(1));
        for s in 1..59 {
            assert_eq!(th.refused("u:alice", t(s)), None);
        }
        assert_eq!(th.refused("u:alice", t(60)), Some(59));
    }

    #[test]
    fn trivial_passwords_are_refused_and_the_reason_is_given() {
        for bad in [
            "            ",
            "\u{3000}\u{3000}\u{3000}\u{3000}\u{3000}\u{3000}\u{3000}\u{3000}\u{3000}\u{3000}\u{3000}\u{3000}",
            "aaaaaaaaaaaa",
            "abcabcabcabc",
            "password1234",
            "Passw0rd!2024",
            "123456789012",
            "  short1!  ",
            "sato-is-the-best-sato",
        ] {
            assert!(check_password(bad, "sato").is_err(), "{bad:?} was accepted");
        }
        for good in ["mamori-demo-password", "correct horse battery staple", "夜中でも電源を見守る2026", "k7#Qw!z9Lm2x"]
        {
            assert!(check_password(good, "sato").is_ok(), "{good:?} was refused: {:?}", check_password(good, "sato"));
        }
    }

    #[test]
    fn totp_secrets_are_sealed_with_a_key_from_outside_the_database() {
        let key = TotpKey::derive(b"the link secret");
        let sealed = key.seal("JBSWY3DPEHPK3PXP").unwrap();
        assert!(sealed.starts_with("enc1:") && !sealed.contains("JBSWY3DP"));
        assert_eq!(key.open(&sealed).as_deref(), Some("JBSWY3DPEHPK3PXP"));
        assert_eq!(key.open("JBSWY3DPEHPK3PXP").as_deref(), Some("JBSWY3DPEHPK3PXP"), "stored before sealing");
        assert_eq!(TotpKey::derive(b"another").open(&sealed), None, "another key opens nothing");
        assert_ne!(key.seal("JBSWY3DPEHPK3PXP").unwrap(), sealed, "a fresh nonce every time");
    }

    #[test]
    fn scopes_follow_the_role() {
        let home = |id: &str, m: &str| {
            let mut h: Home = serde_json::from_value(serde_json::json!({
                "id": id, "municipality": m, "label": id, "devices": [], "backup": [], "contacts": []
            }))
            .unwrap();
            h.id = HomeId::new(id).unwrap();
            h
        };
        let (a, b) = (home("home-a", "431001"), home("home-b", "131016"));
        let user = |role, m: &[&str], h: &[&str]| User {
            id: 1,
            username: "u".into(),
            display_name: "U".into(),
            role,
            municipalities: m.iter().map(|s| s.to_string()).collect(),
            homes: h.iter().map(|s| s.to_string()).collect(),
            totp: false,
            disabled: false,
        };
        let coord = user(AccountRole::Coordinator, &["431001"], &[]);
        assert!(coord.may_see(&a) && !coord.may_see(&b));
        assert!(coord.may_see_municipality("431001") && !coord.may_see_municipality("131016"));
        let fac = user(AccountRole::Facility, &[], &["home-b"]);
        assert!(!fac.may_see(&a) && fac.may_see(&b) && !fac.may_see_municipality("131016"));
        let admin = user(AccountRole::Admin, &[], &[]);
        assert!(admin.may_see(&a) && admin.may_see(&b));
        let off = User { disabled: true, ..admin };
        assert!(!off.may_see(&a));
    }

    #[test]
    fn new_users_are_checked_for_their_role() {
        let u = |role, m: &[&str], h: &[&str]| NewUser {
            username: "sato".into(),
            display_name: "Sato".into(),
            role,
            municipalities: m.iter().map(|s| s.to_string()).collect(),
            homes: h.iter().map(|s| s.to_string()).collect(),
        };
        assert!(u(AccountRole::Coordinator, &["431001"], &[]).validate().is_ok());
        assert!(u(AccountRole::Coordinator, &[], &[]).validate().is_err());
        assert!(u(AccountRole::Coordinator, &["431002"], &[]).validate().is_err(), "bad check digit");
        assert!(u(AccountRole::Family, &[], &["a", "b"]).validate().is_err());
        assert!(u(AccountRole::Admin, &["431001"], &[]).validate().is_err());
        assert!(NewUser { username: "Sato San".into(), ..u(AccountRole::Admin, &[], &[]) }.validate().is_err());
        assert!(hash_password("short").is_err());
    }
}
