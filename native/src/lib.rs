//! `pyserver._native`: the Rust core of pyserver.
//!
//! Each part lives in its own module as plain Rust (no PyO3 types inside);
//! its `python` submodule is the thin edge that converts to and from Python.

use pyo3::prelude::*;

mod logcodec;
mod ring;
mod snapcache;

/// True when this module was compiled with optimisations (no debug assertions).
const RELEASE_BUILD: bool = !cfg!(debug_assertions);

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("RELEASE_BUILD", RELEASE_BUILD)?;
    ring::python::register(m)?;
    logcodec::python::register(m)?;
    snapcache::python::register(m)?;
    Ok(())
}
