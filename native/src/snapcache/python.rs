//! The Python edge of the snapshot cache: `pyserver._native.SnapshotCache`.
//!
//! Converts arguments, raises the same errors as the pure twin
//! (`pyserver/pure/snapcache.py`), and keeps Python code from running while
//! the core is borrowed: dropping an image can run its `__del__`, which may
//! call back into this cache, so images that leave the cache are dropped (and
//! result lists built, which may trigger the garbage collector) only after
//! the borrow is released.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyInt, PyList};
use pyo3::PyTraverseError;

use super::LruCache;

/// An int in `minimum..=u64::MAX`, else the pure twin's TypeError or ValueError.
#[inline(always)]
fn to_u64(value: &Bound<'_, PyAny>, what: &str, minimum: u64) -> PyResult<u64> {
    if let Ok(int) = value.cast::<PyInt>() {
        match int_to_u64(int) {
            Some(number) if number >= minimum => return Ok(number),
            _ => {}
        }
    }
    Err(not_a_u64(value, what, minimum))
}

/// The error `to_u64` raises, kept off the fast path.
#[cold]
#[inline(never)]
fn not_a_u64(value: &Bound<'_, PyAny>, what: &str, minimum: u64) -> PyErr {
    if !value.is_instance_of::<PyInt>() {
        let type_name = match value.get_type().name() {
            Ok(name) => name.to_string(),
            Err(err) => return err,
        };
        return PyTypeError::new_err(format!("{what} must be an int, not {type_name}"));
    }
    PyValueError::new_err(format!("{what} must be in {minimum}..2**64-1"))
}

/// The value of an int, or None (and no pending error) if it is negative or
/// above u64::MAX.
#[inline(always)]
fn int_to_u64(int: &Bound<'_, PyInt>) -> Option<u64> {
    // PyLong_AsUnsignedLong has a fast path for small ints that
    // PyLong_AsUnsignedLongLong (a byte-array conversion in 3.11) lacks; use
    // it where unsigned long is 64 bits wide.
    // SAFETY: `int` is a live int object and we are attached to the interpreter.
    #[cfg(all(target_pointer_width = "64", not(windows)))]
    let value: u64 = unsafe { ffi::PyLong_AsUnsignedLong(int.as_ptr()) };
    #[cfg(not(all(target_pointer_width = "64", not(windows))))]
    let value: u64 = unsafe { ffi::PyLong_AsUnsignedLongLong(int.as_ptr()) };
    // u64::MAX is also the error value: only a pending error tells them apart.
    if value == u64::MAX && PyErr::take(int.py()).is_some() {
        return None;
    }
    Some(value)
}

#[inline(always)]
fn user_id(value: &Bound<'_, PyAny>) -> PyResult<u64> {
    to_u64(value, "user id", 0)
}

/// The `default` argument of get, peek and pop: None when not given.
#[inline(always)]
fn or_default(py: Python<'_>, default: Option<&Bound<'_, PyAny>>) -> Py<PyAny> {
    default.map_or_else(|| py.None(), |value| value.clone().unbind())
}

/// User images keyed by user id, bounded by a count and a total weight (bytes).
#[pyclass(module = "pyserver._native", name = "SnapshotCache")]
pub struct SnapshotCache {
    core: LruCache<Py<PyAny>>,
}

#[pymethods]
impl SnapshotCache {
    #[new]
    fn new(max_entries: &Bound<'_, PyAny>, max_weight: &Bound<'_, PyAny>) -> PyResult<Self> {
        let max_entries = to_u64(max_entries, "max_entries", 1)?;
        let max_weight = to_u64(max_weight, "max_weight", 1)?;
        let max_entries = usize::try_from(max_entries).unwrap_or(usize::MAX);
        // to_u64 already enforced the minimum of 1, so this cannot fail.
        let core = LruCache::new(max_entries, max_weight)
            .map_err(|err| PyValueError::new_err(err.to_string()))?;
        Ok(Self { core })
    }

    #[getter]
    fn max_entries(&self) -> usize {
        self.core.max_entries()
    }

    #[getter]
    fn max_weight(&self) -> u64 {
        self.core.max_weight()
    }

    #[getter]
    fn weight(&self) -> u64 {
        self.core.weight()
    }

    #[getter]
    fn hits(&self) -> u64 {
        self.core.hits()
    }

    #[getter]
    fn misses(&self) -> u64 {
        self.core.misses()
    }

    #[getter]
    fn evictions(&self) -> u64 {
        self.core.evictions()
    }

    /// The image, made most recently used (a hit), or default (a miss).
    #[pyo3(signature = (user_id, default=None))]
    fn get(
        &mut self,
        py: Python<'_>,
        user_id: &Bound<'_, PyAny>,
        default: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let key = self::user_id(user_id)?;
        Ok(match self.core.get(key) {
            Some(image) => image.clone_ref(py),
            None => or_default(py, default),
        })
    }

    /// The image without touching recency or the counters.
    #[pyo3(signature = (user_id, default=None))]
    fn peek(
        &self,
        py: Python<'_>,
        user_id: &Bound<'_, PyAny>,
        default: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let key = self::user_id(user_id)?;
        Ok(match self.core.peek(key) {
            Some(image) => image.clone_ref(py),
            None => or_default(py, default),
        })
    }

    /// Store (or replace) as most recently used; returns the evicted
    /// (user_id, image) pairs, least recently used first.
    fn put<'py>(
        mut slf: PyRefMut<'py, Self>,
        user_id: &Bound<'py, PyAny>,
        image: Py<PyAny>,
        weight: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let py = slf.py();
        let key = self::user_id(user_id)?;
        let weight = to_u64(weight, "weight", 0)?;
        let outcome = slf.core.put(key, image, weight);
        drop(slf);
        // As a Bound, the old image is released without Py's check for an
        // attached thread; its __del__ (if any) may now use this cache freely.
        drop(outcome.replaced.map(|image| image.into_bound(py)));
        if outcome.evicted.is_empty() {
            return Ok(PyList::empty(py));
        }
        PyList::new(py, outcome.evicted)
    }

    /// Remove and return the image, or default. Not an eviction.
    #[pyo3(signature = (user_id, default=None))]
    fn pop(
        &mut self,
        py: Python<'_>,
        user_id: &Bound<'_, PyAny>,
        default: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let key = self::user_id(user_id)?;
        Ok(match self.core.pop(key) {
            Some(image) => image,
            None => or_default(py, default),
        })
    }

    fn __contains__(&self, user_id: &Bound<'_, PyAny>) -> bool {
        match user_id.cast::<PyInt>() {
            Ok(int) => int_to_u64(int).is_some_and(|key| self.core.contains(key)),
            Err(_) => false,
        }
    }

    fn __len__(&self) -> usize {
        self.core.len()
    }

    /// Drop every entry (not counted as evictions); counters are kept.
    fn clear(mut slf: PyRefMut<'_, Self>) {
        if slf.core.is_empty() {
            return;
        }
        let images = slf.core.clear();
        drop(slf);
        drop(images);
    }

    /// Every (user_id, image), least recently used first, without touching recency.
    fn items<'py>(slf: PyRef<'py, Self>) -> PyResult<Bound<'py, PyList>> {
        let py = slf.py();
        let pairs: Vec<(u64, Py<PyAny>)> = slf
            .core
            .iter()
            .map(|(key, image)| (key, image.clone_ref(py)))
            .collect();
        drop(slf);
        PyList::new(py, pairs)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for (_, image) in self.core.iter() {
            visit.call(image)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        // Only the garbage collector calls this, on an unreachable cycle whose
        // finalizers have already run, so nothing can call back into the cache.
        drop(self.core.clear());
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SnapshotCache>()
}
