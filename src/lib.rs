//! spillway: a GPU-centric direct-storage runtime.
//!
//! This crate holds the CUDA device ([`cuda`]), backend selection and the `spillway`
//! command-line tool. The device-agnostic core is `spillway-runtime` (re-exported as
//! [`runtime`]); the backends are `spillway-uring` and `spillway-cufile`.

#![warn(missing_docs)]

pub mod cuda;

pub use spillway_runtime as runtime;
