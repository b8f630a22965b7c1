//! The host's enrolled-clients file: the out-of-band credentials of PROTOCOL.md §7.
//!
//! ```toml
//! [[client]]
//! name = "alice"
//! client_id = "00112233445566778899aabbccddeeff"                                 # 16 bytes, hex
//! psk = "…64 hex digits…"                                                        # 32 bytes, hex
//! ```
//!
//! The file holds secrets, so it must be mode 0600 (no group or other permission bits):
//! [`ClientsFile::load`] refuses anything else. [`enroll`] and [`enroll_many`] create it with
//! that mode and replace it atomically (temporary file in the same directory, fsync, rename),
//! so a host reloading it never sees half a file. Two enrollers running at once may lose one
//! another's entry (last rename wins); enroll from one place.
//!
//! Names are 1–64 characters from `A-Z a-z 0-9 - _ . @ + :`, so they print safely in logs and
//! need no escaping in TOML.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto;
use crate::wire::ClientCredentials;

/// Longest accepted client name.
pub const MAX_NAME_LEN: usize = 64;

/// Why the clients file could not be read, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    #[error("clients file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "clients file {path} has mode {mode:04o}: it holds secrets and must not be accessible \
         by group or others; run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("clients file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("clients file {path}: entry {entry} ({name}): key `{key}`: {problem}")]
    Entry {
        path: PathBuf,
        /// 1-based position of the `[[client]]` table.
        entry: usize,
        name: String,
        key: &'static str,
        problem: String,
    },
    #[error("clients file {path}: a client named {name:?} is already enrolled")]
    DuplicateName { path: PathBuf, name: String },
    #[error("invalid client name {name:?}: {problem}")]
    BadName { name: String, problem: &'static str },
}

/// One enrolled client.
#[derive(Clone)]
pub struct ClientEntry {
    pub name: String,
    /// `client_id` and `psk`; the psk is zeroized on drop and never printed.
    pub creds: ClientCredentials,
}

impl std::fmt::Debug for ClientEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientEntry")
            .field("name", &self.name)
            .field("client_id", &hex::encode(self.creds.client_id))
            .finish_non_exhaustive()
    }
}

/// The loaded file, indexed by `client_id`.
#[derive(Clone, Debug, Default)]
pub struct ClientsFile {
    entries: Vec<ClientEntry>,
    by_id: HashMap<[u8; 16], usize>,
}

/// A TOML entry as read, before validation. The psk text is zeroized on drop.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: Option<String>,
    client_id: Option<String>,
    psk: Option<SecretText>,
}

struct SecretText(Zeroizing<String>);

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| SecretText(Zeroizing::new(s)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    client: Vec<RawEntry>,
}

impl ClientsFile {
    /// Builds an in-memory set (tests, embedding). Later duplicates of a `client_id` are ignored.
    pub fn from_entries(entries: Vec<ClientEntry>) -> Self {
        let mut f = ClientsFile::default();
        for e in entries {
            if !f.by_id.contains_key(&e.creds.client_id) {
                f.by_id.insert(e.creds.client_id, f.entries.len());
                f.entries.push(e);
            }
        }
        f
    }

    /// Reads and validates the file. Refuses a file with any group/other permission bit.
    pub fn load(path: &Path) -> Result<Self, ClientsError> {
        check_mode(path)?;
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| ClientsError::Io {
            path: path.to_owned(),
            source,
        })?);
        Self::parse(&text, path)
    }

    /// Parses file contents; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ClientsError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ClientsError::Syntax {
            path: path.to_owned(),
            message: e.message().to_owned()
                + &e.span()
                    .map(|s| format!(" (at line {})", line_of(text, s.start)))
                    .unwrap_or_default(),
        })?;
        let mut file = ClientsFile::default();
        let mut names = HashSet::with_capacity(raw.client.len());
        for (i, r) in raw.client.into_iter().enumerate() {
            let entry = i + 1;
            let err = |name: &str, key: &'static str, problem: String| ClientsError::Entry {
                path: path.to_owned(),
                entry,
                name: if name.is_empty() {
                    "unnamed".to_owned()
                } else {
                    format!("{name:?}")
                },
                key,
                problem,
            };
            let name = r.name.ok_or_else(|| err("", "name", "missing".into()))?;
            check_name(&name).map_err(|e| err(&name, "name", e.to_string()))?;
            let id_hex = r
                .client_id
                .ok_or_else(|| err(&name, "client_id", "missing".into()))?;
            let client_id: [u8; 16] = decode_hex(&id_hex)
                .map_err(|p| err(&name, "client_id", format!("expected 32 hex digits, {p}")))?;
            let psk_text = r.psk.ok_or_else(|| err(&name, "psk", "missing".into()))?;
            let psk: Zeroizing<[u8; 32]> = Zeroizing::new(
                decode_hex(&psk_text.0)
                    .map_err(|p| err(&name, "psk", format!("expected 64 hex digits, {p}")))?,
            );
            if !names.insert(name.clone()) {
                return Err(err(&name, "name", "duplicate name".into()));
            }
            if file.by_id.contains_key(&client_id) {
                return Err(err(&name, "client_id", "duplicate client_id".into()));
            }
            file.by_id.insert(client_id, file.entries.len());
            file.entries.push(ClientEntry {
                name,
                creds: ClientCredentials {
                    client_id,
                    psk: *psk,
                },
            });
        }
        Ok(file)
    }

    /// The client with this `client_id`.
    pub fn get(&self, client_id: &[u8; 16]) -> Option<&ClientEntry> {
        self.by_id.get(client_id).map(|&i| &self.entries[i])
    }

    pub fn contains_name(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &ClientEntry> {
        self.entries.iter()
    }

    /// The file's TOML text (secrets included; zeroized on drop).
    fn render(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(self.entries.len() * 160));
        s.push_str("# Mesh reference host: enrolled clients. Secret: keep mode 0600.\n");
        let mut psk_hex = Zeroizing::new([0u8; 64]);
        for e in &self.entries {
            hex::encode_to_slice(e.creds.psk, &mut *psk_hex).expect("64-byte buffer");
            // Names are validated to need no escaping.
            let _ = write!(
                s,
                "\n[[client]]\nname = \"{}\"\nclient_id = \"{}\"\npsk = \"",
                e.name,
                hex::encode(e.creds.client_id)
            );
            s.push_str(std::str::from_utf8(&*psk_hex).expect("hex is ASCII"));
            s.push_str("\"\n");
        }
        s
    }

    /// Writes the file atomically with mode 0600.
    fn store(&self, path: &Path) -> Result<(), ClientsError> {
        write_atomic(path, self.render().as_bytes())
    }
}

fn line_of(text: &str, byte: usize) -> usize {
    1 + text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

fn decode_hex<const N: usize>(s: &str) -> Result<[u8; N], String> {
    if s.len() != 2 * N {
        return Err(format!("got {} characters", s.len()));
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| "got a non-hex character".to_owned())?;
    Ok(out)
}

/// Checks a client name: 1–64 characters from `A-Z a-z 0-9 - _ . @ + :`.
pub fn check_name(name: &str) -> Result<(), ClientsError> {
    let bad = |problem| ClientsError::BadName {
        name: name.to_owned(),
        problem,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("longer than 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.@+:".contains(&b))
    {
        return Err(bad("allowed characters are A-Z a-z 0-9 - _ . @ + :"));
    }
    Ok(())
}

fn check_mode(path: &Path) -> Result<(), ClientsError> {
    let meta = fs::metadata(path).map_err(|source| ClientsError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ClientsError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` via a 0600 temporary file in the same directory, fsync and rename,
/// then fsyncs the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ClientsError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| ClientsError::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| ClientsError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        hex::encode(crypto::random_array::<6>())
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename durable; failure here loses nothing already visible, so ignore it.
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Loads the file if it exists (creating its parent directory, mode 0700, if missing).
fn load_or_empty(path: &Path) -> Result<ClientsFile, ClientsError> {
    if path.exists() {
        return ClientsFile::load(path);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| ClientsError::Io {
                path: dir.to_owned(),
                source,
            })?;
    }
    Ok(ClientsFile::default())
}

/// A newly enrolled client, as handed to its owner. Serializes (serde_json) to exactly
/// `{"name": …, "client_id": "<32 hex>", "psk": "<64 hex>"}`. Debug never shows the psk.
#[derive(Clone)]
pub struct Enrolled {
    pub name: String,
    pub creds: ClientCredentials,
}

impl std::fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolled")
            .field("name", &self.name)
            .field("client_id", &hex::encode(self.creds.client_id))
            .finish_non_exhaustive()
    }
}

impl Serialize for Enrolled {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let psk = Zeroizing::new(hex::encode(self.creds.psk));
        let mut st = s.serialize_struct("Enrolled", 3)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("client_id", &hex::encode(self.creds.client_id))?;
        st.serialize_field("psk", psk.as_str())?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for Enrolled {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            name: String,
            client_id: String,
            psk: SecretText,
        }
        let r = Raw::deserialize(d)?;
        let client_id = decode_hex(&r.client_id)
            .map_err(|p| serde::de::Error::custom(format!("client_id: 32 hex digits, {p}")))?;
        let psk: Zeroizing<[u8; 32]> = Zeroizing::new(
            decode_hex(&r.psk.0)
                .map_err(|p| serde::de::Error::custom(format!("psk: 64 hex digits, {p}")))?,
        );
        Ok(Enrolled {
            name: r.name,
            creds: ClientCredentials {
                client_id,
                psk: *psk,
            },
        })
    }
}

fn fresh_entry(name: String, existing: &ClientsFile) -> ClientEntry {
    loop {
        let client_id = crypto::random_array();
        if existing.get(&client_id).is_none() {
            return ClientEntry {
                name,
                creds: ClientCredentials {
                    client_id,
                    psk: crypto::random_array(),
                },
            };
        }
    }
}

/// Enrolls one client: creates the file (0600, parent directory too) if missing, refuses a
/// name already enrolled, and generates a random 16-byte `client_id` and 32-byte psk.
pub fn enroll(path: &Path, name: &str) -> Result<Enrolled, ClientsError> {
    let mut v = enroll_names(path, std::iter::once(name.to_owned()))?;
    Ok(v.pop().expect("one enrolled"))
}

/// Enrolls `count` clients named `{prefix}{i}` for i in `0..count` with one file write. Fails
/// without writing if any of those names is already enrolled.
pub fn enroll_many(path: &Path, prefix: &str, count: usize) -> Result<Vec<Enrolled>, ClientsError> {
    enroll_names(path, (0..count).map(|i| format!("{prefix}{i}")))
}

/// Removes the clients with these names (one file write); returns how many were found.
pub fn remove_names(path: &Path, names: &HashSet<String>) -> Result<usize, ClientsError> {
    let file = ClientsFile::load(path)?;
    let before = file.entries.len();
    let kept = ClientsFile::from_entries(
        file.entries
            .into_iter()
            .filter(|e| !names.contains(&e.name))
            .collect(),
    );
    let removed = before - kept.entries.len();
    if removed > 0 {
        kept.store(path)?;
    }
    Ok(removed)
}

fn enroll_names(
    path: &Path,
    names: impl Iterator<Item = String>,
) -> Result<Vec<Enrolled>, ClientsError> {
    let mut file = load_or_empty(path)?;
    let mut seen: HashSet<String> = file.entries.iter().map(|e| e.name.clone()).collect();
    let mut out = Vec::new();
    for name in names {
        check_name(&name)?;
        if !seen.insert(name.clone()) {
            return Err(ClientsError::DuplicateName {
                path: path.to_owned(),
                name,
            });
        }
        let e = fresh_entry(name, &file);
        file.by_id.insert(e.creds.client_id, file.entries.len());
        out.push(Enrolled {
            name: e.name.clone(),
            creds: e.creds.clone(),
        });
        file.entries.push(e);
    }
    file.store(path)?;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    #[test]
    fn os_errors_are_shown_once() {
        let err = super::ClientsFile::load(std::path::Path::new("/nonexistent/clients.toml"))
            .unwrap_err();
        let shown = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
        assert!(shown.contains("/nonexistent/clients.toml"), "{shown}");
    }

    use super::*;
    use std::time::Instant;

    /// A fresh empty directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "rebindgw-{tag}-{}-{}",
                std::process::id(),
                hex::encode(crypto::random_array::<6>())
            ));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn enroll_creates_0600_file_and_parent() {
        let d = TempDir::new("enroll");
        let path = d.0.join("sub/dir/clients.toml");
        let a = enroll(&path, "alice").unwrap();
        assert_eq!(mode(&path), 0o600);
        let b = enroll(&path, "bob").unwrap();
        assert_ne!(a.creds.client_id, b.creds.client_id);
        let f = ClientsFile::load(&path).unwrap();
        assert_eq!(f.len(), 2);
        let got = f.get(&a.creds.client_id).unwrap();
        assert_eq!(got.name, "alice");
        assert_eq!(got.creds.psk, a.creds.psk);
        assert!(f.contains_name("bob"));
        // No temporary files left behind.
        let left: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn duplicate_name_refused() {
        let d = TempDir::new("dup");
        let path = d.0.join("clients.toml");
        enroll(&path, "alice").unwrap();
        let e = enroll(&path, "alice").unwrap_err();
        assert!(matches!(e, ClientsError::DuplicateName { .. }), "{e}");
        assert!(e.to_string().contains("alice"));
        assert!(enroll(&path, "bad name").is_err());
        assert_eq!(ClientsFile::load(&path).unwrap().len(), 1);
    }

    #[test]
    fn enrolled_json_shape() {
        let d = TempDir::new("json");
        let path = d.0.join("clients.toml");
        let a = enroll(&path, "alice").unwrap();
        let v: serde_json::Value = serde_json::to_value(&a).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["client_id", "name", "psk"]);
        assert_eq!(obj["name"], "alice");
        let id = obj["client_id"].as_str().unwrap();
        let psk = obj["psk"].as_str().unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(psk.len(), 64);
        assert!(id.bytes().chain(psk.bytes()).all(|b| b.is_ascii_hexdigit()));
        assert_eq!(id, hex::encode(a.creds.client_id));
        let text = serde_json::to_string(&a).unwrap();
        assert!(text.starts_with("{\"name\":\"alice\",\"client_id\":\""));
        let back: Enrolled = serde_json::from_str(&text).unwrap();
        assert_eq!(back.creds.psk, a.creds.psk);
        // Debug never shows the psk.
        assert!(!format!("{a:?}").contains(psk));
        let f = ClientsFile::load(&path).unwrap();
        assert!(!format!("{f:?}").contains(psk));
    }

    #[test]
    fn group_readable_refused_with_fix() {
        let d = TempDir::new("perm");
        let path = d.0.join("clients.toml");
        enroll(&path, "alice").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let e = ClientsFile::load(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains(&format!("chmod 600 {}", path.display())), "{e}");
        assert!(
            enroll(&path, "bob").is_err(),
            "enroll must not rewrite an exposed file"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ClientsFile::load(&path).is_ok());
    }

    #[test]
    fn errors_name_file_entry_and_key() {
        let p = Path::new("/etc/mesh/clients.toml");
        let ok_id = "00112233445566778899aabbccddeeff";
        let ok_psk = "ab".repeat(32);
        let text = format!(
            "[[client]]\nname = \"a\"\nclient_id = \"{ok_id}\"\npsk = \"{ok_psk}\"\n\
             [[client]]\nname = \"b\"\nclient_id = \"0011\"\npsk = \"{ok_psk}\"\n"
        );
        let e = ClientsFile::parse(&text, p).unwrap_err().to_string();
        assert!(e.contains("/etc/mesh/clients.toml"), "{e}");
        assert!(e.contains("entry 2"), "{e}");
        assert!(e.contains("\"b\""), "{e}");
        assert!(e.contains("client_id"), "{e}");
        assert!(!e.contains(&ok_psk), "{e}");

        let text = format!("[[client]]\nname = \"a\"\nclient_id = \"{ok_id}\"\npsk = \"zz\"\n");
        let e = ClientsFile::parse(&text, p).unwrap_err().to_string();
        assert!(e.contains("`psk`"), "{e}");

        let text = format!("[[client]]\nname = \"a\"\nclient_id = \"{ok_id}\"\n");
        let e = ClientsFile::parse(&text, p).unwrap_err().to_string();
        assert!(e.contains("`psk`: missing"), "{e}");

        let text = format!(
            "[[client]]\nname = \"a\"\nclient_id = \"{ok_id}\"\npsk = \"{ok_psk}\"\n\
             [[client]]\nname = \"c\"\nclient_id = \"{ok_id}\"\npsk = \"{ok_psk}\"\n"
        );
        let e = ClientsFile::parse(&text, p).unwrap_err().to_string();
        assert!(e.contains("duplicate client_id"), "{e}");

        let e = ClientsFile::parse("[[client]]\nnmae = 1\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nmae") && e.contains("line"), "{e}");

        assert!(ClientsFile::parse("", p).unwrap().is_empty());
    }

    #[test]
    fn bulk_enroll_is_fast_and_loads_back() {
        let d = TempDir::new("bulk");
        let path = d.0.join("clients.toml");
        enroll(&path, "load7").unwrap();
        assert!(enroll_many(&path, "load", 1000).is_err(), "load7 exists");
        let start = Instant::now();
        let v = enroll_many(&path, "bulk-", 1000).unwrap();
        let f = ClientsFile::load(&path).unwrap();
        assert!(start.elapsed().as_secs_f64() < 1.0, "{:?}", start.elapsed());
        assert_eq!(v.len(), 1000);
        assert_eq!(f.len(), 1001);
        assert_eq!(v[999].name, "bulk-999");
        for e in &v {
            assert_eq!(f.get(&e.creds.client_id).unwrap().creds.psk, e.creds.psk);
        }
        assert_eq!(mode(&path), 0o600);
    }
}
