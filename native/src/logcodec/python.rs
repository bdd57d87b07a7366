//! The PyO3 edge of the log-record codec: entry dicts to `Entry` and back.
//!
//! Owns the Python side of docs/log-format.md: which keys an entry dict must
//! have, which Python types each field takes, and the exceptions raised
//! (`pyserver.errors.BadRequest` and `LogCorrupt`, or `TypeError` for a
//! non-dict entry or non-buffer data), with exactly the messages of the pure
//! twin, `pyserver.pure.logcodec`. The bytes themselves are the core's job.

use std::fmt;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyList, PyString, PyTuple, PyType};

use super::{
    record_len, write_record, Action, Change, Channel, DecodeError, Entry, Folder, MessageAdded,
    Records,
};

/// The most values an entry holds besides `action`: seq, ts and message_added's 11 fields.
const MAX_VALUES: usize = 13;

/// Interned key and enum-name strings, made once: dict lookups with them hit
/// the cached hash, and decoded dicts share them instead of new strings.
struct Names {
    seq: Py<PyString>,
    ts: Py<PyString>,
    action: Py<PyString>,
    /// The keys of each action's fields, in record order, indexed by code - 1.
    fields: Vec<Vec<Py<PyString>>>,
    /// Per action, a dict of its keys in order (values None): decoding copies it and
    /// fills the values in, which never resizes, unlike inserting 14 keys one by one.
    templates: Vec<Py<PyDict>>,
    actions: Vec<Py<PyString>>,
    channels: Vec<Py<PyString>>,
    folders: Vec<Py<PyString>>,
}

impl Names {
    fn get(py: Python<'_>) -> &Names {
        static NAMES: PyOnceLock<Names> = PyOnceLock::new();
        NAMES.get_or_init(py, || {
            let intern = |s: &str| PyString::intern(py, s).unbind();
            let template = |action: Action| {
                let dict = PyDict::new(py);
                for key in ["seq", "ts", "action"].iter().chain(action.fields()) {
                    dict.set_item(intern(key), py.None())
                        .expect("a dict of str keys takes any value");
                }
                dict.unbind()
            };
            Names {
                seq: intern("seq"),
                ts: intern("ts"),
                action: intern("action"),
                fields: Action::ALL
                    .iter()
                    .map(|a| a.fields().iter().map(|f| intern(f)).collect())
                    .collect(),
                templates: Action::ALL.iter().map(|&a| template(a)).collect(),
                actions: Action::ALL.iter().map(|a| intern(a.name())).collect(),
                channels: Channel::ALL.iter().map(|c| intern(c.name())).collect(),
                folders: Folder::ALL.iter().map(|f| intern(f.name())).collect(),
            }
        })
    }

    fn fields_of(&self, action: Action) -> &[Py<PyString>] {
        &self.fields[usize::from(action.code()) - 1]
    }
}

// ---- errors ----

static BAD_REQUEST: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static LOG_CORRUPT: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn pyserver_error(
    py: Python<'_>,
    class: &'static PyOnceLock<Py<PyType>>,
    name: &str,
    message: String,
) -> PyErr {
    match class.import(py, "pyserver.errors", name) {
        Ok(class) => PyErr::from_type(class.clone(), message),
        Err(err) => err,
    }
}

fn log_corrupt(py: Python<'_>, err: DecodeError) -> PyErr {
    pyserver_error(py, &LOG_CORRUPT, "LogCorrupt", err.to_string())
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

/// Where an encode error happened: `entry {i}: ` before the message in a batch.
#[derive(Clone, Copy)]
struct Place {
    index: Option<usize>,
}

impl Place {
    fn message(self, text: impl fmt::Display) -> String {
        match self.index {
            Some(i) => format!("entry {i}: {text}"),
            None => text.to_string(),
        }
    }

    fn bad_request(self, py: Python<'_>, text: impl fmt::Display) -> PyErr {
        pyserver_error(py, &BAD_REQUEST, "BadRequest", self.message(text))
    }

    fn type_error(self, text: impl fmt::Display) -> PyErr {
        PyTypeError::new_err(self.message(text))
    }
}

/// A field, or an item of a list field, as error messages name it.
#[derive(Clone, Copy)]
enum Label<'s> {
    Field(&'s str),
    Item(&'s str, usize),
}

impl fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Label::Field(name) => write!(f, "field '{name}'"),
            Label::Item(name, i) => write!(f, "field '{name}' item {i}"),
        }
    }
}

// ---- dict -> Entry ----

/// An entry dict's values, checked to be exactly the action's keys, in record order.
struct Held<'py> {
    action: Action,
    /// seq, ts, then the action's fields; the first `2 + fields` are `Some`.
    values: [Option<Bound<'py, PyAny>>; MAX_VALUES],
}

impl<'py> Held<'py> {
    fn take(entry: &Bound<'py, PyAny>, names: &Names, place: Place) -> PyResult<Held<'py>> {
        let py = entry.py();
        let dict = entry.cast::<PyDict>().map_err(|_| {
            place.type_error(format!(
                "a log entry must be a dict, not {}",
                type_name(entry)
            ))
        })?;
        let action = match dict.get_item(names.action.bind(py))? {
            None => return Err(place.bad_request(py, "missing field 'action'")),
            Some(value) => {
                let Ok(text) = value.cast::<PyString>() else {
                    let text = format!("field 'action' must be a str, not {}", type_name(&value));
                    return Err(place.bad_request(py, text));
                };
                // A string that is not UTF-8 (lone surrogates) cannot name an action either.
                match text.to_str().ok().and_then(Action::from_name) {
                    Some(action) => action,
                    None => {
                        let text = format!("unknown action {}", value.repr()?);
                        return Err(place.bad_request(py, text));
                    }
                }
            }
        };
        let mut values: [Option<Bound<'py, PyAny>>; MAX_VALUES] = Default::default();
        let fields = names.fields_of(action);
        let keys = [&names.seq, &names.ts].into_iter().chain(fields);
        for (slot, key) in values.iter_mut().zip(keys) {
            let key = key.bind(py);
            match dict.get_item(key)? {
                Some(value) => *slot = Some(value),
                None => return Err(place.bad_request(py, format!("missing field '{key}'"))),
            }
        }
        if dict.len() != 3 + fields.len() {
            let expected = action.fields();
            for key in dict.keys() {
                let known = key
                    .cast::<PyString>()
                    .ok()
                    .and_then(|k| k.to_str().ok())
                    .is_some_and(|k| matches!(k, "seq" | "ts" | "action") || expected.contains(&k));
                if !known {
                    let text = format!("unexpected field {}", key.repr()?);
                    return Err(place.bad_request(py, text));
                }
            }
        }
        Ok(Held { action, values })
    }

    fn value(&self, i: usize) -> &Bound<'py, PyAny> {
        self.values[i]
            .as_ref()
            .expect("take() fills every slot the action uses")
    }

    /// The typed entry, checking each value in record order.
    fn entry(&self, place: Place) -> PyResult<Entry<'_>> {
        let py = self.value(0).py();
        let names = self.action.fields();
        // The i-th field of the action, converted by `f` under its name.
        macro_rules! field {
            ($f:ident, $i:expr) => {
                $f(py, self.value(2 + $i), Label::Field(names[$i]), place)?
            };
        }
        let seq = uint(py, self.value(0), Label::Field("seq"), place)?;
        let ts = uint(py, self.value(1), Label::Field("ts"), place)?;
        let change = match self.action {
            Action::MessageAdded => Change::MessageAdded(MessageAdded {
                message_id: field!(text, 0),
                thread_id: field!(text, 1),
                sender: field!(uint, 2),
                participants: field!(uint_list, 3),
                channel: field!(channel, 4),
                folder: field!(folder, 5),
                unread: field!(boolean, 6),
                subject: field!(text, 7),
                snippet: field!(text, 8),
                body_ref: field!(text, 9),
                key: field!(text, 10),
            }),
            Action::MarkedRead => Change::MarkedRead {
                thread_id: field!(text, 0),
                message_id: field!(text, 1),
            },
            Action::MarkedUnread => Change::MarkedUnread {
                thread_id: field!(text, 0),
                message_id: field!(text, 1),
            },
            Action::Moved => Change::Moved {
                thread_id: field!(text, 0),
                folder: field!(folder, 1),
            },
            Action::MessageDeleted => Change::MessageDeleted {
                thread_id: field!(text, 0),
                message_id: field!(text, 1),
            },
            Action::ThreadDeleted => Change::ThreadDeleted {
                thread_id: field!(text, 0),
            },
            Action::SenderBlocked => Change::SenderBlocked {
                sender: field!(uint, 0),
            },
            Action::SenderUnblocked => Change::SenderUnblocked {
                sender: field!(uint, 0),
            },
            Action::FolderSeen => Change::FolderSeen {
                folder: field!(folder, 0),
            },
            Action::OutboundSettled => Change::OutboundSettled {
                message_id: field!(text, 0),
                address: field!(text, 1),
                outcome: field!(text, 2),
                detail: field!(text, 3),
            },
            Action::SmsSet => Change::SmsSet {
                phone: field!(text, 0),
                mode: field!(text, 1),
            },
        };
        Ok(Entry { seq, ts, change })
    }
}

/// An `int` (not a `bool`) in 0..2**64-1.
fn uint(py: Python<'_>, value: &Bound<'_, PyAny>, label: Label<'_>, place: Place) -> PyResult<u64> {
    let is_int = value.is_exact_instance_of::<PyInt>()
        || (value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>());
    if !is_int {
        let text = format!("{label} must be an int, not {}", type_name(value));
        return Err(place.bad_request(py, text));
    }
    // SAFETY: `value` is an int, checked above.
    let n = unsafe { int_as_u64(value.as_ptr()) };
    // An all-ones result is either u64::MAX or an error (negative or too big).
    if n == u64::MAX && PyErr::take(py).is_some() {
        return Err(place.bad_request(py, format!("{label} must be in 0..2**64-1")));
    }
    Ok(n)
}

/// An int's value as u64, or all ones with an OverflowError set.
///
/// Where C's `unsigned long` is 64 bits, PyLong_AsUnsignedLong reads the digits
/// directly; the `long long` form (and PyO3's extraction) goes through a slower
/// byte-array conversion.
///
/// # Safety
/// `int` must point to a live `int` object, with the GIL held.
unsafe fn int_as_u64(int: *mut ffi::PyObject) -> u64 {
    if std::mem::size_of::<std::os::raw::c_ulong>() == 8 {
        unsafe { ffi::PyLong_AsUnsignedLong(int) as u64 }
    } else {
        unsafe { ffi::PyLong_AsUnsignedLongLong(int) }
    }
}

fn text<'a>(
    py: Python<'_>,
    value: &'a Bound<'_, PyAny>,
    label: Label<'_>,
    place: Place,
) -> PyResult<&'a str> {
    let Ok(string) = value.cast::<PyString>() else {
        let text = format!("{label} must be a str, not {}", type_name(value));
        return Err(place.bad_request(py, text));
    };
    string
        .to_str()
        .map_err(|_| place.bad_request(py, format!("{label} is not encodable as UTF-8")))
}

fn uint_list(
    py: Python<'_>,
    value: &Bound<'_, PyAny>,
    label: Label<'_>,
    place: Place,
) -> PyResult<Vec<u64>> {
    let Label::Field(name) = label else {
        unreachable!("lists are not nested")
    };
    let convert = |items: &mut dyn Iterator<Item = Bound<'_, PyAny>>, len: usize| {
        let mut out = Vec::with_capacity(len);
        for (i, item) in items.enumerate() {
            out.push(uint(py, &item, Label::Item(name, i), place)?);
        }
        Ok(out)
    };
    if let Ok(list) = value.cast::<PyList>() {
        convert(&mut list.iter(), list.len())
    } else if let Ok(tuple) = value.cast::<PyTuple>() {
        convert(&mut tuple.iter(), tuple.len())
    } else {
        let text = format!("{label} must be a list or tuple, not {}", type_name(value));
        Err(place.bad_request(py, text))
    }
}

fn boolean(
    py: Python<'_>,
    value: &Bound<'_, PyAny>,
    label: Label<'_>,
    place: Place,
) -> PyResult<bool> {
    match value.cast::<PyBool>() {
        Ok(b) => Ok(b.is_true()),
        Err(_) => {
            let text = format!("{label} must be a bool, not {}", type_name(value));
            Err(place.bad_request(py, text))
        }
    }
}

/// A str naming an enum value; the field's name (channel, folder) names the enum in errors.
fn named<T>(
    py: Python<'_>,
    value: &Bound<'_, PyAny>,
    label: Label<'_>,
    place: Place,
    from_name: fn(&str) -> Option<T>,
) -> PyResult<T> {
    let Ok(string) = value.cast::<PyString>() else {
        let text = format!("{label} must be a str, not {}", type_name(value));
        return Err(place.bad_request(py, text));
    };
    match string.to_str().ok().and_then(from_name) {
        Some(v) => Ok(v),
        None => {
            let Label::Field(kind) = label else {
                unreachable!("enums are not list items")
            };
            Err(place.bad_request(py, format!("unknown {kind} {}", value.repr()?)))
        }
    }
}

fn channel(
    py: Python<'_>,
    value: &Bound<'_, PyAny>,
    label: Label<'_>,
    place: Place,
) -> PyResult<Channel> {
    named(py, value, label, place, Channel::from_name)
}

fn folder(
    py: Python<'_>,
    value: &Bound<'_, PyAny>,
    label: Label<'_>,
    place: Place,
) -> PyResult<Folder> {
    named(py, value, label, place, Folder::from_name)
}

/// Appends the record of one entry dict to `out`.
fn encode_into(
    entry: &Bound<'_, PyAny>,
    names: &Names,
    place: Place,
    out: &mut Vec<u8>,
) -> PyResult<()> {
    let py = entry.py();
    let held = Held::take(entry, names, place)?;
    let entry = held.entry(place)?;
    super::encode_into(&entry, out).map_err(|err| place.bad_request(py, err))
}

// ---- Entry -> dict ----

fn entry_to_dict<'py>(
    py: Python<'py>,
    names: &Names,
    entry: &Entry<'_>,
) -> PyResult<Bound<'py, PyDict>> {
    let action = entry.change.action();
    let dict = names.templates[usize::from(action.code()) - 1]
        .bind(py)
        .copy()?;
    dict.set_item(names.seq.bind(py), entry.seq)?;
    dict.set_item(names.ts.bind(py), entry.ts)?;
    dict.set_item(
        names.action.bind(py),
        names.actions[usize::from(action.code()) - 1].bind(py),
    )?;
    let keys = names.fields_of(action);
    let key = |i: usize| keys[i].bind(py);
    let text = |s: &str| PyString::new(py, s);
    let channel = |c: Channel| names.channels[usize::from(c.code()) - 1].bind(py);
    let folder = |f: Folder| names.folders[usize::from(f.code()) - 1].bind(py);
    match &entry.change {
        Change::MessageAdded(m) => {
            dict.set_item(key(0), text(m.message_id))?;
            dict.set_item(key(1), text(m.thread_id))?;
            dict.set_item(key(2), m.sender)?;
            dict.set_item(key(3), PyList::new(py, &m.participants)?)?;
            dict.set_item(key(4), channel(m.channel))?;
            dict.set_item(key(5), folder(m.folder))?;
            dict.set_item(key(6), m.unread)?;
            dict.set_item(key(7), text(m.subject))?;
            dict.set_item(key(8), text(m.snippet))?;
            dict.set_item(key(9), text(m.body_ref))?;
            dict.set_item(key(10), text(m.key))?;
        }
        Change::MarkedRead {
            thread_id,
            message_id,
        }
        | Change::MarkedUnread {
            thread_id,
            message_id,
        }
        | Change::MessageDeleted {
            thread_id,
            message_id,
        } => {
            dict.set_item(key(0), text(thread_id))?;
            dict.set_item(key(1), text(message_id))?;
        }
        Change::Moved {
            thread_id,
            folder: f,
        } => {
            dict.set_item(key(0), text(thread_id))?;
            dict.set_item(key(1), folder(*f))?;
        }
        Change::ThreadDeleted { thread_id } => dict.set_item(key(0), text(thread_id))?,
        Change::SenderBlocked { sender } | Change::SenderUnblocked { sender } => {
            dict.set_item(key(0), *sender)?
        }
        Change::FolderSeen { folder: f } => dict.set_item(key(0), folder(*f))?,
        Change::OutboundSettled {
            message_id,
            address,
            outcome,
            detail,
        } => {
            dict.set_item(key(0), text(message_id))?;
            dict.set_item(key(1), text(address))?;
            dict.set_item(key(2), text(outcome))?;
            dict.set_item(key(3), text(detail))?;
        }
        Change::SmsSet { phone, mode } => {
            dict.set_item(key(0), text(phone))?;
            dict.set_item(key(1), text(mode))?;
        }
    }
    Ok(dict)
}

/// Runs `f` on the bytes of `data`: `bytes` in place, any other C-contiguous
/// buffer (bytearray, memoryview, ...) copied first, so nothing Python does
/// while the result is built can change the bytes under the decoder.
fn with_bytes<R>(data: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> PyResult<R>) -> PyResult<R> {
    if let Ok(bytes) = data.cast::<PyBytes>() {
        return f(bytes.as_bytes());
    }
    let buffer = PyUntypedBuffer::get(data).map_err(|_| {
        PyTypeError::new_err(format!(
            "a log record must be a bytes-like object, not {}",
            type_name(data)
        ))
    })?;
    if !buffer.is_c_contiguous() {
        return Err(PyTypeError::new_err(
            "a log record must be a C-contiguous buffer",
        ));
    }
    let len = buffer.len_bytes();
    let copy = if len == 0 {
        Vec::new()
    } else {
        // SAFETY: a C-contiguous buffer is `len_bytes` readable bytes from `buf_ptr`,
        // valid while `buffer` is held; it is copied before anything else runs.
        unsafe { std::slice::from_raw_parts(buffer.buf_ptr() as *const u8, len) }.to_vec()
    };
    drop(buffer);
    f(&copy)
}

// ---- the module's functions ----

/// Encodes one entry dict as a record (docs/log-format.md).
#[pyfunction]
fn encode<'py>(py: Python<'py>, entry: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let place = Place { index: None };
    let held = Held::take(entry, Names::get(py), place)?;
    let entry = held.entry(place)?;
    let len = record_len(&entry).map_err(|err| place.bad_request(py, err))?;
    PyBytes::new_with(py, len, |out| {
        write_record(&entry, out).map_err(|err| place.bad_request(py, err))
    })
}

/// Decodes exactly one record into an entry dict.
#[pyfunction]
fn decode<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    with_bytes(data, |bytes| {
        let entry = super::decode(bytes).map_err(|err| log_corrupt(py, err))?;
        entry_to_dict(py, Names::get(py), &entry)
    })
}

/// Encodes entry dicts as a batch: their records back to back.
#[pyfunction]
fn encode_batch<'py>(
    py: Python<'py>,
    entries: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let names = Names::get(py);
    let mut out = Vec::new();
    for (i, entry) in entries.try_iter()?.enumerate() {
        encode_into(&entry?, names, Place { index: Some(i) }, &mut out)?;
    }
    Ok(PyBytes::new(py, &out))
}

/// Decodes a batch into a list of entry dicts; nothing is returned if any record is bad.
#[pyfunction]
fn decode_batch<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
    let names = Names::get(py);
    with_bytes(data, |bytes| {
        let list = PyList::empty(py);
        for entry in Records::new(bytes) {
            let entry = entry.map_err(|err| log_corrupt(py, err))?;
            list.append(entry_to_dict(py, names, &entry)?)?;
        }
        Ok(list)
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_function(wrap_pyfunction!(encode_batch, m)?)?;
    m.add_function(wrap_pyfunction!(decode_batch, m)?)?;
    Ok(())
}
