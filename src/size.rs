//! Byte sizes on the command line: parsing ("4KiB", "1M", "2GB", "4096") and printing; the
//! runtime's parser, which settings and fault plans use too.

pub use spillway_runtime::{format_size, parse_size};
