//! spillway: a GPU-centric direct-storage runtime.
//!
//! This crate holds the CUDA device ([`cuda`]), backend selection ([`select`]), the
//! settings ([`settings`]), opening an engine from them ([`open`]) and, with the `cli`
//! feature (on by default), the `spillway` command-line tool (`bench`, `info`, `nvme`). The
//! device-agnostic core is `spillway-runtime` (re-exported as [`runtime`]); the backends are
//! `spillway-uring`, `spillway-cufile` and `spillway-spdk`. The Python and C packages use
//! the library without the `cli` feature, so they link no argument parser.

#![warn(missing_docs)]

#[cfg(feature = "cli")]
pub mod bench;
pub mod choice;
#[cfg(feature = "cli")]
pub mod cli;
pub mod cuda;
#[cfg(feature = "cli")]
pub mod exit;
pub mod fs;
#[cfg(feature = "cli")]
pub mod info;
#[cfg(feature = "cli")]
pub mod nvme;
pub mod open;
pub mod rank;
pub mod select;
pub mod settings;
pub mod size;

pub use spillway_runtime as runtime;
