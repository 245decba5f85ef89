//! spillway: a GPU-centric direct-storage runtime.
//!
//! This crate holds the CUDA device ([`cuda`]), backend selection ([`select`]) and the
//! `spillway` command-line tool ([`bench`], [`info`], [`nvme`]). The device-agnostic core is
//! `spillway-runtime` (re-exported as [`runtime`]); the backends are `spillway-uring` and
//! `spillway-cufile`.

#![warn(missing_docs)]

pub mod bench;
pub mod cli;
pub mod cuda;
pub mod exit;
pub mod fs;
pub mod info;
pub mod nvme;
pub mod open;
pub mod rank;
pub mod select;
pub mod settings;
pub mod size;

pub use spillway_runtime as runtime;
