//! Two SHA-256 compressions in lockstep (SHA-NI), for the per-REBIND session-key KDF.
#![allow(unsafe_code)]
