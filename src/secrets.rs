//! Secret files: the gateway's master secret and the host link keys. They are written with
//! mode 0600, and a file that group or others can read is refused.
#![forbid(unsafe_code)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::hostlink::LinkKey;
use crate::keys::{MASTER_LEN, MasterSecret};

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}` and start again"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path} already exists; refusing to overwrite a secret")]
    Exists { path: PathBuf },
    #[error("{path}: expected {expected}, found {found}")]
    Malformed {
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretFileError + '_ {
    move |source| SecretFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses files that group or others may read or write.
pub fn check_private(path: &Path) -> Result<(), SecretFileError> {
    let mode = fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Writes `contents` to a new file with mode 0600 (never overwrites).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => SecretFileError::Exists {
                path: path.to_path_buf(),
            },
            _ => SecretFileError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// `rebindgw keygen`: a fresh master secret, stored as 64 hex digits.
pub fn generate_master(path: &Path) -> Result<(), SecretFileError> {
    let m = MasterSecret::generate();
    let text = Zeroizing::new(format!("{}\n", hex::encode(m.expose())));
    write_private(path, text.as_bytes())
}

fn read_hex<const N: usize>(
    path: &Path,
    what: &'static str,
) -> Result<Zeroizing<[u8; N]>, SecretFileError> {
    check_private(path)?;
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io_err(path))?);
    let mut out = Zeroizing::new([0u8; N]);
    hex::decode_to_slice(text.trim(), &mut out[..]).map_err(|_| SecretFileError::Malformed {
        path: path.to_path_buf(),
        expected: what,
        found: format!("{} characters", text.trim().len()),
    })?;
    Ok(out)
}

/// Loads a master secret written by [`generate_master`].
pub fn load_master(path: &Path) -> Result<MasterSecret, SecretFileError> {
    let b = read_hex::<MASTER_LEN>(path, "64 hex digits (a 32-byte master secret)")?;
    Ok(MasterSecret::from_bytes(*b))
}

/// Writes a fresh link key file.
pub fn generate_link_key(path: &Path) -> Result<LinkKey, SecretFileError> {
    let k = LinkKey::generate();
    let text = Zeroizing::new(format!("{}\n", hex::encode(k.0)));
    write_private(path, text.as_bytes())?;
    Ok(k)
}

pub fn load_link_key(path: &Path) -> Result<LinkKey, SecretFileError> {
    let b = read_hex::<16>(path, "32 hex digits (a 16-byte link key)")?;
    Ok(LinkKey(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "rebindgw-secrets-{}-{}",
            std::process::id(),
            hex::encode(crate::crypto::random_array::<6>())
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn keygen_writes_0600_and_loads() {
        let d = dir();
        let p = d.join("sub/master.key");
        generate_master(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        load_master(&p).unwrap();
        assert!(matches!(
            generate_master(&p),
            Err(SecretFileError::Exists { .. })
        ));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_master(&p).unwrap_err().to_string();
        assert!(
            err.contains("chmod 600") && err.contains("master.key"),
            "{err}"
        );
        fs::remove_dir_all(d).ok();
    }

    #[test]
    fn malformed_key_files_are_named() {
        let d = dir();
        let p = d.join("link.key");
        write_private(&p, b"abcd\n").unwrap();
        let err = load_link_key(&p).unwrap_err().to_string();
        assert!(
            err.contains("32 hex digits") && err.contains("link.key"),
            "{err}"
        );
        let q = d.join("link2.key");
        let k = generate_link_key(&q).unwrap();
        assert_eq!(load_link_key(&q).unwrap().0, k.0);
        fs::remove_dir_all(d).ok();
    }
}
