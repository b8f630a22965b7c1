//! Secret files: the gateway's master secret and the host link keys. They are written with
//! mode 0600. They are opened without following symbolic links and checked on the open
//! descriptor: a file that is not the process user's own, or that group or others can read
//! or write, is refused with the command that fixes it.
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::hostlink::LinkKey;
use crate::keys::{MASTER_LEN, MasterSecret};

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The cause (the OS error) is the source, so a rendered chain shows it once.
    #[error("cannot open, read or write {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is a symbolic link; secret files are opened without following links: \
         point the configuration at the file itself"
    )]
    Symlink { path: PathBuf },
    #[error(
        "{path} is not a regular file; expected a key file written by `rebindgw keygen` or `rebindgw link-keygen`"
    )]
    NotRegular { path: PathBuf },
    #[error(
        "{path} is owned by uid {owner}, but this process runs as uid {uid}; \
         run `chown {uid} {path}` (or run as uid {owner}) and start again"
    )]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
    #[error(
        "{path} is readable or writable by group or others (mode {mode:o}); run `chmod 600 {path}` and start again"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "state directory {path} is open to group or others (mode {mode:o}); \
         run `chmod 700 {path}` and start again"
    )]
    DirTooOpen { path: PathBuf, mode: u32 },
    #[error("{path} already exists; refusing to overwrite a secret")]
    Exists { path: PathBuf },
    #[error("{path}: expected {expected}, found {found}")]
    Malformed {
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
}

impl SecretFileError {
    /// The file (or directory) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SecretFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Key files are a line of hex digits; anything longer is not one.
const MAX_KEY_FILE: u64 = 4096;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretFileError + '_ {
    move |source| {
        if source.raw_os_error() == Some(libc::ELOOP) {
            SecretFileError::Symlink {
                path: path.to_path_buf(),
            }
        } else {
            SecretFileError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), SecretFileError> {
    let uid = crate::io::ids::effective_uid();
    if meta.uid() != uid {
        return Err(SecretFileError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    Ok(())
}

/// Checks an open secret file (fstat on its descriptor, so what is checked is what is read):
/// a regular file, owned by this process's user, that group and others can neither read nor
/// write.
pub fn check_private_file(path: &Path, file: &File) -> Result<(), SecretFileError> {
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(SecretFileError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    check_owner(path, &meta)?;
    owner_only(path, meta.mode(), |path, mode| SecretFileError::TooOpen {
        path,
        mode,
    })
}

/// `Ok` when group and others have no permission bits in `mode`; else the error `too_open`
/// builds from the path and the permission bits.
fn owner_only(
    path: &Path,
    mode: u32,
    too_open: fn(PathBuf, u32) -> SecretFileError,
) -> Result<(), SecretFileError> {
    let mode = mode & 0o777;
    if mode & 0o077 != 0 {
        return Err(too_open(path.to_path_buf(), mode));
    }
    Ok(())
}

/// Refuses a state directory that is not this user's own or that group or others may enter,
/// list or write.
pub fn check_private_dir(path: &Path) -> Result<(), SecretFileError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_dir() {
        return Err(SecretFileError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "expected a directory for the gateway's state",
            ),
        });
    }
    check_owner(path, &meta)?;
    owner_only(path, meta.mode(), |path, mode| {
        SecretFileError::DirTooOpen { path, mode }
    })
}

/// Refuses files that group or others may read or write (a check by path, for files read
/// by other tools; the key files here are checked on the open descriptor instead).
pub fn check_private(path: &Path) -> Result<(), SecretFileError> {
    owner_only(
        path,
        fs::metadata(path).map_err(io_err(path))?.mode(),
        |path, mode| SecretFileError::TooOpen { path, mode },
    )
}

/// Opens a secret file for reading without following a symbolic link, and checks it.
pub(crate) fn open_private(path: &Path) -> Result<File, SecretFileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))?;
    check_private_file(path, &file)?;
    Ok(file)
}

/// Opens (or creates with mode 0600, whatever the umask) a private read-write file without
/// following a symbolic link. A file of another user is refused; one that group or others
/// may read is narrowed to 0600 on the open descriptor, and its old mode returned so the
/// caller can warn.
pub fn open_private_rw(path: &Path) -> Result<(File, Option<u32>), SecretFileError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(SecretFileError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    check_owner(path, &meta)?;
    let mode = meta.mode() & 0o777;
    if mode != 0o600 {
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
        return Ok((file, Some(mode)));
    }
    Ok((file, None))
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
    let file = open_private(path)?;
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(io_err(path))?;
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

    #[test]
    fn symlinked_secret_files_are_refused() {
        let d = dir();
        let real = d.join("real.key");
        generate_master(&real).unwrap();
        let link = d.join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = load_master(&link).unwrap_err().to_string();
        assert!(
            err.contains("symbolic link") && err.contains("link.key"),
            "{err}"
        );
        fs::remove_dir_all(d).ok();
    }

    /// Needs root (as the test machines run) to hand a file to another user.
    #[test]
    fn secret_files_of_another_user_are_refused() {
        let d = dir();
        let p = d.join("master.key");
        generate_master(&p).unwrap();
        if std::os::unix::fs::chown(&p, Some(4242), None).is_err() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let err = load_master(&p).unwrap_err().to_string();
        assert!(
            err.contains("owned by uid 4242") && err.contains("chown"),
            "{err}"
        );
        fs::remove_dir_all(d).ok();
    }

    #[test]
    fn group_writable_secret_files_are_refused() {
        let d = dir();
        let p = d.join("link.key");
        generate_link_key(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o620)).unwrap();
        let err = load_link_key(&p).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        fs::remove_dir_all(d).ok();
    }

    #[test]
    fn os_errors_are_rendered_once() {
        let d = dir();
        let p = d.join("missing.key");
        let err = load_master(&p).unwrap_err();
        let shown = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(
            shown.matches("No such file or directory").count(),
            1,
            "{shown}"
        );
        assert!(shown.contains("missing.key"), "{shown}");
        fs::remove_dir_all(d).ok();
    }

    #[test]
    fn state_dirs_must_be_private_and_owned() {
        let d = dir();
        let s = d.join("state");
        fs::create_dir(&s).unwrap();
        fs::set_permissions(&s, fs::Permissions::from_mode(0o755)).unwrap();
        let err = check_private_dir(&s).unwrap_err().to_string();
        assert!(err.contains("chmod 700") && err.contains("state"), "{err}");
        fs::set_permissions(&s, fs::Permissions::from_mode(0o700)).unwrap();
        check_private_dir(&s).unwrap();
        if std::os::unix::fs::chown(&s, Some(4242), None).is_ok() {
            let err = check_private_dir(&s).unwrap_err().to_string();
            assert!(err.contains("chown"), "{err}");
        }
        fs::remove_dir_all(d).ok();
    }

    #[test]
    fn private_rw_files_are_created_and_narrowed_to_0600() {
        let d = dir();
        let p = d.join("registry.redb");
        let (_f, widened) = open_private_rw(&p).unwrap();
        assert_eq!(widened, None);
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let (_f, widened) = open_private_rw(&p).unwrap();
        assert_eq!(widened, Some(0o644));
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let link = d.join("link.redb");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(
            open_private_rw(&link),
            Err(SecretFileError::Symlink { .. })
        ));
        fs::remove_dir_all(d).ok();
    }
}
