//! CUDA device (placeholder until written).
