//! The PyO3 edge of the hash ring: `HashRing`, `key_position`, `token_position`.
//!
//! Converts arguments (with the same errors as `pyserver.pure.ring`), keeps one
//! Python string per node so lookups hand out a refcount bump instead of a new
//! string, and builds `owners()` results straight into a list.

use std::os::raw::c_ulong;

use pyo3::exceptions::{PyKeyError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyList, PyString, PyTuple};

use super::{HashRing, RingError, MAX_TOKENS_PER_NODE};

pyo3::import_exception!(pyserver.errors, EmptyRing);

const DEFAULT_TOKENS_PER_NODE: u64 = 64;

/// Reads an int in 0..2**64-1 with no allocation and no Python code run.
#[inline(always)]
fn read_u64(obj: Borrowed<'_, '_, PyAny>, what: &str) -> PyResult<u64> {
    let ptr = obj.as_ptr();
    // SAFETY: `ptr` is a live object; the type check comes first, so the
    // conversion never falls back to `__index__` (which could run Python code).
    unsafe {
        if ffi::PyLong_Check(ptr) == 0 {
            return Err(not_a_u64(obj, what));
        }
        let value = if std::mem::size_of::<c_ulong>() == 8 {
            // The cheapest converter on LP64 platforms: a loop over the int's digits.
            ffi::PyLong_AsUnsignedLong(ptr) as u64
        } else {
            ffi::PyLong_AsUnsignedLongLong(ptr)
        };
        if value == u64::MAX && !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear();
            return Err(not_a_u64(obj, what));
        }
        Ok(value)
    }
}

#[cold]
fn not_a_u64(obj: Borrowed<'_, '_, PyAny>, what: &str) -> PyErr {
    if obj.is_instance_of::<PyInt>() {
        match obj.str() {
            Ok(text) => PyValueError::new_err(format!("{what} out of range 0..2**64-1: {text}")),
            Err(err) => err,
        }
    } else {
        type_error(obj, what, "an int")
    }
}

#[cold]
fn type_error(obj: Borrowed<'_, '_, PyAny>, what: &str, wanted: &str) -> PyErr {
    match obj.get_type().name() {
        Ok(name) => PyTypeError::new_err(format!("{what} must be {wanted}, not {name}")),
        Err(err) => err,
    }
}

fn empty_ring() -> PyErr {
    EmptyRing::new_err(RingError::Empty.to_string())
}

/// A user id argument: an int in 0..2**64-1.
struct UserId(u64);

impl<'a, 'py> FromPyObject<'a, 'py> for UserId {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        read_u64(obj, "user id").map(UserId)
    }
}

/// A token index argument: an int in 0..2**64-1.
struct TokenIndex(u64);

impl<'a, 'py> FromPyObject<'a, 'py> for TokenIndex {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        read_u64(obj, "token index").map(TokenIndex)
    }
}

/// The `tokens_per_node` argument: an int in 1..MAX_TOKENS_PER_NODE.
struct TokensPerNode(u64);

impl<'a, 'py> FromPyObject<'a, 'py> for TokensPerNode {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if !obj.is_instance_of::<PyInt>() {
            return Err(type_error(obj, "tokens_per_node", "an int"));
        }
        match obj.extract::<u64>() {
            Ok(n) if (1..=MAX_TOKENS_PER_NODE).contains(&n) => Ok(TokensPerNode(n)),
            _ => Err(PyValueError::new_err(format!(
                "tokens_per_node must be in 1..{MAX_TOKENS_PER_NODE}, got {}",
                obj.str()?
            ))),
        }
    }
}

/// The `k` of `successors`: an int >= 0 (any size; more than the nodes means all).
struct SuccessorCount(usize);

impl<'a, 'py> FromPyObject<'a, 'py> for SuccessorCount {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if !obj.is_instance_of::<PyInt>() {
            return Err(type_error(obj, "k", "an int"));
        }
        if obj.lt(0)? {
            return Err(PyValueError::new_err(format!(
                "k must be >= 0, got {}",
                obj.str()?
            )));
        }
        Ok(SuccessorCount(obj.extract::<usize>().unwrap_or(usize::MAX)))
    }
}

/// A node id argument: a str (its UTF-8 is read where needed).
struct NodeId<'py>(Bound<'py, PyString>);

impl<'a, 'py> FromPyObject<'a, 'py> for NodeId<'py> {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match obj.cast::<PyString>() {
            Ok(text) => Ok(NodeId(text.to_owned())),
            Err(_) => Err(type_error(obj, "node id", "a str")),
        }
    }
}

/// xxh3_64 of the user id as 8 little-endian bytes.
#[pyfunction]
fn key_position(user_id: UserId) -> u64 {
    super::key_position(user_id.0)
}

/// xxh3_64 of utf8(f"{node_id}#{index}").
#[pyfunction]
fn token_position(node_id: NodeId<'_>, index: TokenIndex) -> PyResult<u64> {
    Ok(super::token_position(node_id.0.to_str()?, index.0))
}

/// A consistent hash ring of app-server nodes (DESIGN.md "Hash ring").
#[pyclass(name = "HashRing", module = "pyserver._native")]
pub struct PyHashRing {
    ring: HashRing,
    /// One Python string per node, by rank (the order of `ring.nodes()`).
    names: Vec<Py<PyString>>,
}

impl PyHashRing {
    /// `owners()` over the `len` items of a list or tuple, read with `item`.
    ///
    /// # Safety
    /// `seq` must be a live list or tuple of at least `len` items, and `item`
    /// must return a borrowed pointer to item `i`. Nothing here runs Python
    /// code, so the sequence cannot change while it is read.
    unsafe fn owners_of_items<'py>(
        &self,
        py: Python<'py>,
        seq: *mut ffi::PyObject,
        len: ffi::Py_ssize_t,
        item: impl Fn(*mut ffi::PyObject, ffi::Py_ssize_t) -> *mut ffi::PyObject,
    ) -> PyResult<Bound<'py, PyList>> {
        let read = |i| read_u64(Borrowed::from_ptr(py, item(seq, i)), "user id");
        if self.ring.is_empty() {
            for i in 0..len {
                read(i)?;
            }
            return Err(empty_ring());
        }
        // Slots stay NULL until set; dropping the list early (on a bad id) is safe.
        let out = Bound::from_owned_ptr_or_err(py, ffi::PyList_New(len))?;
        for i in 0..len {
            let rank = self.ring.owner_of_nonempty(read(i)?);
            let name = self.names[rank].as_ptr();
            ffi::Py_INCREF(name);
            ffi::PyList_SET_ITEM(out.as_ptr(), i, name);
        }
        Ok(out.cast_into_unchecked())
    }
}

#[pymethods]
impl PyHashRing {
    #[new]
    #[pyo3(signature = (tokens_per_node = TokensPerNode(DEFAULT_TOKENS_PER_NODE)))]
    fn new(tokens_per_node: TokensPerNode) -> PyResult<Self> {
        let ring = HashRing::new(tokens_per_node.0)
            .map_err(|err| PyValueError::new_err(err.to_string()))?;
        Ok(PyHashRing {
            ring,
            names: Vec::new(),
        })
    }

    #[getter]
    fn tokens_per_node(&self) -> u64 {
        self.ring.tokens_per_node()
    }

    /// ValueError if the node is already on the ring or the id is empty.
    fn add_node(&mut self, node_id: NodeId<'_>) -> PyResult<()> {
        let text = node_id.0.to_str()?;
        let rank = match self.ring.add_node(text) {
            Ok(rank) => rank,
            Err(RingError::DuplicateNode(_)) => {
                return Err(PyValueError::new_err(format!(
                    "node {} is already on the ring",
                    node_id.0.repr()?
                )))
            }
            Err(err) => return Err(PyValueError::new_err(err.to_string())),
        };
        // A fresh exact str, even if the caller passed a str subclass.
        let name = PyString::new(node_id.0.py(), text).unbind();
        self.names.insert(rank, name);
        Ok(())
    }

    /// KeyError if the node is not on the ring.
    fn remove_node(&mut self, node_id: NodeId<'_>) -> PyResult<()> {
        // A str that is not valid UTF-8 (a lone surrogate) cannot be on the ring.
        let removed = match node_id.0.to_str() {
            Ok(text) => self.ring.remove_node(text).ok(),
            Err(_) => None,
        };
        match removed {
            Some(rank) => {
                self.names.remove(rank);
                Ok(())
            }
            None => Err(PyKeyError::new_err(node_id.0.unbind())),
        }
    }

    /// The node ids, sorted.
    fn nodes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.names.iter().map(|name| name.bind(py)))
    }

    fn __len__(&self) -> usize {
        self.ring.len()
    }

    fn __contains__(&self, node_id: &Bound<'_, PyAny>) -> bool {
        match node_id.cast::<PyString>() {
            Ok(text) => text.to_str().is_ok_and(|text| self.ring.contains(text)),
            Err(_) => false,
        }
    }

    /// EmptyRing if no nodes; ValueError if the id is not in 0..2**64-1; TypeError if not an int.
    fn owner(&self, py: Python<'_>, user_id: UserId) -> PyResult<Py<PyString>> {
        match self.ring.owner(user_id.0) {
            Ok(rank) => Ok(self.names[rank].clone_ref(py)),
            Err(_) => Err(empty_ring()),
        }
    }

    /// owner() of each id, in order.
    fn owners<'py>(&self, user_ids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let py = user_ids.py();
        if let Ok(list) = user_ids.cast::<PyList>() {
            // SAFETY: a live list, read within its length.
            return unsafe {
                self.owners_of_items(
                    py,
                    list.as_ptr(),
                    list.len() as ffi::Py_ssize_t,
                    |seq, i| ffi::PyList_GET_ITEM(seq, i),
                )
            };
        }
        if let Ok(tuple) = user_ids.cast::<PyTuple>() {
            // SAFETY: a live tuple, read within its length.
            return unsafe {
                self.owners_of_items(
                    py,
                    tuple.as_ptr(),
                    tuple.len() as ffi::Py_ssize_t,
                    |seq, i| ffi::PyTuple_GET_ITEM(seq, i),
                )
            };
        }
        // Any other iterable: read every id first (iteration may run Python code).
        let ids = user_ids
            .try_iter()?
            .map(|item| read_u64(item?.as_borrowed(), "user id"))
            .collect::<PyResult<Vec<u64>>>()?;
        if self.ring.is_empty() {
            return Err(empty_ring());
        }
        PyList::new(
            py,
            ids.into_iter()
                .map(|id| self.names[self.ring.owner_of_nonempty(id)].bind(py)),
        )
    }

    /// The first k distinct nodes clockwise from the user's position (fewer if the ring has fewer).
    fn successors<'py>(
        &self,
        py: Python<'py>,
        user_id: UserId,
        k: SuccessorCount,
    ) -> PyResult<Bound<'py, PyList>> {
        let ranks = self
            .ring
            .successors(user_id.0, k.0)
            .map_err(|_| empty_ring())?;
        PyList::new(py, ranks.into_iter().map(|rank| self.names[rank].bind(py)))
    }

    /// Each node's fraction of the 2**64 key space; the fractions sum to 1.0.
    fn shares<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let shares = PyDict::new(py);
        for (name, share) in self.names.iter().zip(self.ring.shares()) {
            shares.set_item(name.bind(py), share)?;
        }
        Ok(shares)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHashRing>()?;
    m.add_function(wrap_pyfunction!(key_position, m)?)?;
    m.add_function(wrap_pyfunction!(token_position, m)?)?;
    Ok(())
}
