//! AES-128-GCM fused for the REBIND / REBIND_ACK shapes (AES-NI + PCLMULQDQ).
#![allow(unsafe_code)]
