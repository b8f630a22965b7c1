//! The process's own user id, for the ownership checks on secret files and the state directory.
#![allow(unsafe_code)]

/// The effective user id: the owner that files this process creates get, and the one secret
/// files and the state directory must have.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, touches no memory of ours and cannot fail.
    unsafe { libc::geteuid() }
}
