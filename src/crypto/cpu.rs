//! The CPU probe and the AES backend choice: which of the hand-written SIMD paths (the
//! trial engine's backends, [`super::block::FastAes128`], [`super::gcm::SessionGcm`],
//! [`super::sha256::compress_x2`], [`super::sha256_x16`]) this CPU and [`BACKEND_ENV`]
//! (`REBINDGW_AES_BACKEND`) allow, and the KDF path ([`KdfPath`], [`KDF_ENV`] =
//! `REBINDGW_KDF`).
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// Environment variable that overrides the backend choice (see [`backend_from_env`]).
pub const BACKEND_ENV: &str = "REBINDGW_AES_BACKEND";

/// An AES implementation the engine can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The `aes` crate (which itself may use AES-NI), batched per key.
    Portable,
    /// Hand-written AES-NI (x86_64 with `aes`).
    AesNi,
    /// Hand-written VAES-256 (x86_64 with `vaes`, `avx2` and `aes`).
    Vaes,
}

/// Every backend, in order of preference from worst to best.
pub(crate) const ALL_BACKENDS: [Backend; 3] = [Backend::Portable, Backend::AesNi, Backend::Vaes];

/// CPU features that the backends and the other SIMD code of this module need, probed once.
#[derive(Clone, Copy, Debug)]
pub(super) struct CpuFeatures {
    aes: bool,
    avx2: bool,
    vaes: bool,
    /// AES-NI, PCLMULQDQ, SSSE3 and SSE4.1: [`gcm::SessionGcm`]'s fast path.
    pub(super) clmul: bool,
    /// SHA-NI, SSSE3 and SSE4.1: [`sha256::compress_x2`]'s fast path.
    pub(super) sha_ni: bool,
    /// AVX-512 F and BW: [`super::sha256_x16`]'s 16-lane SHA-256.
    pub(super) avx512: bool,
}

pub(super) fn cpu_features() -> CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let aes = std::arch::is_x86_feature_detected!("aes");
            let sse41 = std::arch::is_x86_feature_detected!("ssse3")
                && std::arch::is_x86_feature_detected!("sse4.1");
            CpuFeatures {
                aes,
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                vaes: std::arch::is_x86_feature_detected!("vaes"),
                clmul: aes && sse41 && std::arch::is_x86_feature_detected!("pclmulqdq"),
                sha_ni: sse41 && std::arch::is_x86_feature_detected!("sha"),
                avx512: std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures {
                aes: false,
                avx2: false,
                vaes: false,
                clmul: false,
                sha_ni: false,
                avx512: false,
            }
        }
    })
}

impl Backend {
    /// The backend's name, as accepted by [`FromStr`] and [`BACKEND_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Backend::Portable => "portable",
            Backend::AesNi => "aesni",
            Backend::Vaes => "vaes",
        }
    }

    /// CPU features this backend needs that the running CPU lacks (empty when supported).
    pub fn missing_features(self) -> Vec<&'static str> {
        if cfg!(not(target_arch = "x86_64")) && self != Backend::Portable {
            return vec!["x86_64"];
        }
        let f = cpu_features();
        let needs: &[(&'static str, bool)] = match self {
            Backend::Portable => &[],
            Backend::AesNi => &[("aes", f.aes)],
            Backend::Vaes => &[("aes", f.aes), ("avx2", f.avx2), ("vaes", f.vaes)],
        };
        needs
            .iter()
            .filter(|(_, has)| !has)
            .map(|(name, _)| *name)
            .collect()
    }

    /// Whether this backend can run on this CPU.
    pub fn is_supported(self) -> bool {
        let f = cpu_features();
        match self {
            Backend::Portable => true,
            Backend::AesNi => cfg!(target_arch = "x86_64") && f.aes,
            Backend::Vaes => cfg!(target_arch = "x86_64") && f.aes && f.avx2 && f.vaes,
        }
    }

    /// The fastest backend this CPU supports (detected once).
    pub fn best() -> Backend {
        static BEST: OnceLock<Backend> = OnceLock::new();
        *BEST.get_or_init(|| {
            ALL_BACKENDS
                .iter()
                .rev()
                .copied()
                .find(|b| b.is_supported())
                .unwrap_or(Backend::Portable)
        })
    }

    /// Every backend this CPU supports, `Portable` first.
    pub fn all_supported() -> Vec<Backend> {
        ALL_BACKENDS
            .iter()
            .copied()
            .filter(|b| b.is_supported())
            .collect()
    }

    pub(crate) fn unsupported_error(self) -> EngineError {
        EngineError::Unsupported {
            backend: self,
            missing: self.missing_features().join(", "),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Backend, EngineError> {
        ALL_BACKENDS
            .iter()
            .copied()
            .find(|b| b.name() == s)
            .ok_or_else(|| EngineError::UnknownBackend {
                value: s.to_owned(),
            })
    }
}

/// Errors of the trial-decryption engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A backend name that is not one of the accepted values.
    #[error("unknown AES backend {value:?}: expected one of \"portable\", \"aesni\", \"vaes\"")]
    UnknownBackend {
        /// The rejected name.
        value: String,
    },
    /// The backend needs CPU features this CPU lacks.
    #[error("AES backend {backend} is not supported: this CPU lacks {missing}")]
    Unsupported {
        /// The requested backend.
        backend: Backend,
        /// The missing CPU features, comma-separated.
        missing: String,
    },
    /// The value of [`BACKEND_ENV`] was rejected.
    #[error("{var}={value:?}: {reason}")]
    Env {
        /// The environment variable ([`BACKEND_ENV`]).
        var: &'static str,
        /// Its value.
        value: String,
        /// Why it was rejected ([`EngineError::UnknownBackend`] or [`EngineError::Unsupported`]).
        reason: Box<EngineError>,
    },
}

/// Chooses the backend from [`BACKEND_ENV`] if it is set and not empty, else [`Backend::best`].
///
/// Errors if the value is not a backend name, or names a backend this CPU does not support;
/// the message names the variable, the value and what the CPU lacks.
pub fn backend_from_env() -> Result<Backend, EngineError> {
    match std::env::var_os(BACKEND_ENV) {
        None => backend_from_value(None),
        Some(v) => backend_from_value(Some(&v.to_string_lossy())),
    }
}

/// [`backend_from_env`] on an explicit value of [`BACKEND_ENV`] (`None` = unset).
pub fn backend_from_value(value: Option<&str>) -> Result<Backend, EngineError> {
    let value = match value {
        None | Some("") => return Ok(Backend::best()),
        Some(v) => v,
    };
    let env_err = |reason| EngineError::Env {
        var: BACKEND_ENV,
        value: value.to_owned(),
        reason: Box::new(reason),
    };
    let backend: Backend = value.parse().map_err(env_err)?;
    if backend.is_supported() {
        Ok(backend)
    } else {
        Err(env_err(backend.unsupported_error()))
    }
}

/// The backend of this process for the fast paths that have no backend handed to them
/// ([`super::block::FastAes128`]'s `KeyInit`, [`super::gcm::SessionGcm::new`],
/// [`super::sha256::compress_x2`]): [`BACKEND_ENV`] read once, see
/// [`process_backend_from_value`].
pub fn process_backend() -> Backend {
    static PROCESS: OnceLock<Backend> = OnceLock::new();
    *PROCESS.get_or_init(|| {
        let value = std::env::var_os(BACKEND_ENV).map(|v| v.to_string_lossy().into_owned());
        process_backend_from_value(value.as_deref())
    })
}

/// [`backend_from_value`], except that a rejected value gives [`Backend::Portable`]: the
/// portable code is always correct, and someone who set the variable meant to leave the
/// default. The entry points (the gateway, `conformance`) call [`backend_from_env`] first and
/// refuse to start on such a value, so this only matters for code that runs without them.
pub fn process_backend_from_value(value: Option<&str>) -> Backend {
    backend_from_value(value).unwrap_or(Backend::Portable)
}

/// Whether `backend` lets the non-engine fast paths (AES-NI, PCLMULQDQ, SHA-NI) run: every
/// backend but [`Backend::Portable`]. The CPU must have the instructions too.
pub(crate) fn fast_paths_allowed(backend: Backend) -> bool {
    backend != Backend::Portable
}

/// Environment variable that picks the REBIND session-key KDF path (see [`KdfPath`]).
pub const KDF_ENV: &str = "REBINDGW_KDF";

/// How a batch's session keys are derived (PROTOCOL.md §6's HKDF, one per REBIND).
///
/// Both paths give the same keys; [`BACKEND_ENV`]`=portable` turns the SIMD inside either
/// off (SHA-NI for `Pairs`, AVX-512 for `Lanes16`, which then runs the portable per-key code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KdfPath {
    /// Two keys at a time, each SHA-256 step one [`super::sha256::compress_x2`] (SHA-NI).
    Pairs,
    /// Up to 16 keys at a time across the lanes of AVX-512 registers
    /// ([`super::sha256_x16`]); a remainder of fewer than [`KdfPath::MIN_LANES`] keys goes in
    /// pairs.
    Lanes16,
}

impl KdfPath {
    /// Below this many keys a 16-lane pass costs more than pairs (one pass ≈ 8 pairs here).
    pub const MIN_LANES: usize = 8;

    pub fn name(self) -> &'static str {
        match self {
            KdfPath::Pairs => "pairs",
            KdfPath::Lanes16 => "lanes16",
        }
    }

    /// `Lanes16` where the CPU has AVX-512 F and BW and the process backend allows fast
    /// paths, else `Pairs` (detected once).
    pub fn best() -> KdfPath {
        if super::sha256_x16::available(process_backend()) {
            KdfPath::Lanes16
        } else {
            KdfPath::Pairs
        }
    }
}

/// The KDF path of this process: [`KDF_ENV`] (`pairs` or `lanes16`) read once, else
/// [`KdfPath::best`]. An unknown value, or `lanes16` on a CPU without AVX-512, gives `Pairs`
/// (always correct; the portable fallback).
pub fn process_kdf_path() -> KdfPath {
    static PATH: OnceLock<KdfPath> = OnceLock::new();
    *PATH.get_or_init(|| {
        let value = std::env::var_os(KDF_ENV).map(|v| v.to_string_lossy().into_owned());
        kdf_path_from_value(value.as_deref())
    })
}

/// [`process_kdf_path`] on an explicit value of [`KDF_ENV`] (`None` = unset).
pub fn kdf_path_from_value(value: Option<&str>) -> KdfPath {
    match value {
        None | Some("") => KdfPath::best(),
        Some("lanes16") if KdfPath::best() == KdfPath::Lanes16 => KdfPath::Lanes16,
        Some(_) => KdfPath::Pairs,
    }
}

#[cfg(test)]
mod kdf_path_tests {
    use super::*;

    #[test]
    fn kdf_env_values() {
        assert_eq!(kdf_path_from_value(Some("pairs")), KdfPath::Pairs);
        assert_eq!(kdf_path_from_value(Some("bogus")), KdfPath::Pairs);
        assert_eq!(kdf_path_from_value(None), KdfPath::best());
        assert_eq!(kdf_path_from_value(Some("")), KdfPath::best());
        assert_eq!(kdf_path_from_value(Some("lanes16")), KdfPath::best());
    }
}
