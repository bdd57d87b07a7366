//! Placeholder: filled in by the part's implementation.
pub mod python;
