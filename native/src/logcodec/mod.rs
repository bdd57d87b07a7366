//! The log-record codec of docs/log-format.md, version 1, as plain Rust.
//!
//! Owns the byte layout of a per-user log record: the entry model (`Entry`,
//! `Change` and the enumerations), encoding it to bytes and decoding bytes back
//! with every check of the format, in the documented order, each failure a
//! precise `DecodeError` with its byte offset. No PyO3 types here: the `python`
//! submodule converts entry dicts to and from this model.
//!
//! Decoded strings borrow from the input, so decoding allocates only the
//! participants list.

pub mod python;

use std::fmt;

/// The format version this codec reads and writes.
pub const VERSION: u8 = 1;
/// Version, action, fields length, seq and ts.
pub const HEADER_LEN: usize = 22;
/// The CRC32C trailer.
pub const CRC_LEN: usize = 4;
/// A record with no fields: the least a reader must have before looking inside.
pub const MIN_RECORD_LEN: usize = HEADER_LEN + CRC_LEN;
/// The largest fields length `B` a record may declare (16 MiB).
pub const MAX_FIELDS_LEN: usize = 16 * 1024 * 1024;

/// What an entry records; the code is its byte in the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Action {
    MessageAdded = 1,
    MarkedRead = 2,
    MarkedUnread = 3,
    Moved = 4,
    MessageDeleted = 5,
    ThreadDeleted = 6,
    SenderBlocked = 7,
    SenderUnblocked = 8,
    FolderSeen = 9,
    OutboundSettled = 10,
    SmsSet = 11,
}

impl Action {
    /// Every action, in code order.
    pub const ALL: [Action; 11] = [
        Action::MessageAdded,
        Action::MarkedRead,
        Action::MarkedUnread,
        Action::Moved,
        Action::MessageDeleted,
        Action::ThreadDeleted,
        Action::SenderBlocked,
        Action::SenderUnblocked,
        Action::FolderSeen,
        Action::OutboundSettled,
        Action::SmsSet,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Action> {
        Action::ALL.get(usize::from(code).wrapping_sub(1)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::MessageAdded => "message_added",
            Action::MarkedRead => "marked_read",
            Action::MarkedUnread => "marked_unread",
            Action::Moved => "moved",
            Action::MessageDeleted => "message_deleted",
            Action::ThreadDeleted => "thread_deleted",
            Action::SenderBlocked => "sender_blocked",
            Action::SenderUnblocked => "sender_unblocked",
            Action::FolderSeen => "folder_seen",
            Action::OutboundSettled => "outbound_settled",
            Action::SmsSet => "sms_set",
        }
    }

    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The names of the action's own fields, in record order (after seq, ts, action).
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            Action::MessageAdded => &[
                "message_id",
                "thread_id",
                "sender",
                "participants",
                "channel",
                "folder",
                "unread",
                "subject",
                "snippet",
                "body_ref",
                "key",
            ],
            Action::MarkedRead | Action::MarkedUnread | Action::MessageDeleted => {
                &["thread_id", "message_id"]
            }
            Action::Moved => &["thread_id", "folder"],
            Action::ThreadDeleted => &["thread_id"],
            Action::SenderBlocked | Action::SenderUnblocked => &["sender"],
            Action::FolderSeen => &["folder"],
            Action::OutboundSettled => &["message_id", "address", "outcome", "detail"],
            Action::SmsSet => &["phone", "mode"],
        }
    }
}

/// The channel a message came by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    Chat = 1,
    Email = 2,
    Sms = 3,
    Web = 4,
}

impl Channel {
    pub const ALL: [Channel; 4] = [Channel::Chat, Channel::Email, Channel::Sms, Channel::Web];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Channel> {
        Channel::ALL.get(usize::from(code).wrapping_sub(1)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Chat => "chat",
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Web => "web",
        }
    }

    pub fn from_name(name: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// The folder a thread lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Folder {
    Inbox = 1,
    Other = 2,
    Archived = 3,
    Sent = 4,
    Spam = 5,
}

impl Folder {
    pub const ALL: [Folder; 5] = [
        Folder::Inbox,
        Folder::Other,
        Folder::Archived,
        Folder::Sent,
        Folder::Spam,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<Folder> {
        Folder::ALL.get(usize::from(code).wrapping_sub(1)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Folder::Inbox => "inbox",
            Folder::Other => "other",
            Folder::Archived => "archived",
            Folder::Sent => "sent",
            Folder::Spam => "spam",
        }
    }

    pub fn from_name(name: &str) -> Option<Folder> {
        Folder::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// One log entry: its sequence number, its time and what it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub seq: u64,
    /// Microseconds since the Unix epoch.
    pub ts: u64,
    pub change: Change<'a>,
}

/// The action of an entry with its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    MessageAdded(MessageAdded<'a>),
    /// An empty `message_id` means every message of the thread.
    MarkedRead {
        thread_id: &'a str,
        message_id: &'a str,
    },
    /// An empty `message_id` means every message of the thread.
    MarkedUnread {
        thread_id: &'a str,
        message_id: &'a str,
    },
    Moved {
        thread_id: &'a str,
        folder: Folder,
    },
    MessageDeleted {
        thread_id: &'a str,
        message_id: &'a str,
    },
    ThreadDeleted {
        thread_id: &'a str,
    },
    SenderBlocked {
        sender: u64,
    },
    SenderUnblocked {
        sender: u64,
    },
    /// The user looked at the folder: its unseen count drops to 0.
    FolderSeen {
        folder: Folder,
    },
    /// An outgoing mail's copy to one outside address is settled: relayed ("sent") or
    /// given up ("failed", `detail` says why).
    OutboundSettled {
        message_id: &'a str,
        address: &'a str,
        outcome: &'a str,
        detail: &'a str,
    },
    /// The user's phone for texts and which messages go to it ("off", "all", "inbox").
    SmsSet { phone: &'a str, mode: &'a str },
}

/// The fields of a `message_added` entry, in record order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageAdded<'a> {
    pub message_id: &'a str,
    pub thread_id: &'a str,
    pub sender: u64,
    pub participants: Vec<u64>,
    pub channel: Channel,
    pub folder: Folder,
    pub unread: bool,
    pub subject: &'a str,
    pub snippet: &'a str,
    /// Names the body in the `m` family or the blob store.
    pub body_ref: &'a str,
    /// The client's idempotency key, `""` if none.
    pub key: &'a str,
}

impl Change<'_> {
    pub fn action(&self) -> Action {
        match self {
            Change::MessageAdded(_) => Action::MessageAdded,
            Change::MarkedRead { .. } => Action::MarkedRead,
            Change::MarkedUnread { .. } => Action::MarkedUnread,
            Change::Moved { .. } => Action::Moved,
            Change::MessageDeleted { .. } => Action::MessageDeleted,
            Change::ThreadDeleted { .. } => Action::ThreadDeleted,
            Change::SenderBlocked { .. } => Action::SenderBlocked,
            Change::SenderUnblocked { .. } => Action::SenderUnblocked,
            Change::FolderSeen { .. } => Action::FolderSeen,
            Change::OutboundSettled { .. } => Action::OutboundSettled,
            Change::SmsSet { .. } => Action::SmsSet,
        }
    }

    /// Feeds the fields, in record order, to `sink` (which measures or writes them).
    fn visit_fields<S: FieldSink>(&self, sink: &mut S) {
        match self {
            Change::MessageAdded(m) => {
                sink.str(m.message_id);
                sink.str(m.thread_id);
                sink.u64(m.sender);
                sink.u64_list(&m.participants);
                sink.byte(m.channel.code());
                sink.byte(m.folder.code());
                sink.byte(u8::from(m.unread));
                sink.str(m.subject);
                sink.str(m.snippet);
                sink.str(m.body_ref);
                sink.str(m.key);
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
                sink.str(thread_id);
                sink.str(message_id);
            }
            Change::Moved { thread_id, folder } => {
                sink.str(thread_id);
                sink.byte(folder.code());
            }
            Change::ThreadDeleted { thread_id } => sink.str(thread_id),
            Change::SenderBlocked { sender } | Change::SenderUnblocked { sender } => {
                sink.u64(*sender)
            }
            Change::FolderSeen { folder } => sink.byte(folder.code()),
            Change::OutboundSettled {
                message_id,
                address,
                outcome,
                detail,
            } => {
                sink.str(message_id);
                sink.str(address);
                sink.str(outcome);
                sink.str(detail);
            }
            Change::SmsSet { phone, mode } => {
                sink.str(phone);
                sink.str(mode);
            }
        }
    }
}

// ---- encoding ----

/// Why an entry cannot be encoded (the model makes every other mistake unrepresentable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The fields would take more than `MAX_FIELDS_LEN` bytes.
    FieldsTooLong { len: usize },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::FieldsTooLong { len } => write!(
                f,
                "the entry needs {len} bytes of fields, over the {MAX_FIELDS_LEN}-byte limit"
            ),
        }
    }
}

impl std::error::Error for EncodeError {}

/// The two passes over an entry's fields: measuring, then writing.
trait FieldSink {
    fn byte(&mut self, value: u8);
    fn u64(&mut self, value: u64);
    fn str(&mut self, value: &str);
    fn u64_list(&mut self, values: &[u64]);
}

struct Measure(usize);

impl FieldSink for Measure {
    fn byte(&mut self, _: u8) {
        self.0 += 1;
    }
    fn u64(&mut self, _: u64) {
        self.0 += 8;
    }
    fn str(&mut self, value: &str) {
        self.0 = self.0.saturating_add(4).saturating_add(value.len());
    }
    fn u64_list(&mut self, values: &[u64]) {
        self.0 = self
            .0
            .saturating_add(4)
            .saturating_add(values.len().saturating_mul(8));
    }
}

/// Writes into a slice already sized by `Measure`.
struct Write<'b> {
    out: &'b mut [u8],
    pos: usize,
}

impl Write<'_> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.out[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }
}

impl FieldSink for Write<'_> {
    #[inline]
    fn byte(&mut self, value: u8) {
        self.put(&[value]);
    }
    #[inline]
    fn u64(&mut self, value: u64) {
        self.put(&value.to_le_bytes());
    }
    #[inline]
    fn str(&mut self, value: &str) {
        // Fits: the total was checked against MAX_FIELDS_LEN.
        self.put(&(value.len() as u32).to_le_bytes());
        self.put(value.as_bytes());
    }
    #[inline]
    fn u64_list(&mut self, values: &[u64]) {
        self.put(&(values.len() as u32).to_le_bytes());
        for value in values {
            self.put(&value.to_le_bytes());
        }
    }
}

/// The length `B` of the entry's fields.
pub fn fields_len(entry: &Entry<'_>) -> usize {
    let mut measure = Measure(0);
    entry.change.visit_fields(&mut measure);
    measure.0
}

/// The whole record's length, or why the entry cannot be encoded.
pub fn record_len(entry: &Entry<'_>) -> Result<usize, EncodeError> {
    let len = fields_len(entry);
    if len > MAX_FIELDS_LEN {
        return Err(EncodeError::FieldsTooLong { len });
    }
    Ok(MIN_RECORD_LEN + len)
}

/// Writes the record into `out`, which must be exactly `record_len(entry)` bytes.
///
/// Lets the caller encode straight into memory it owns (a Python `bytes`).
pub fn write_record(entry: &Entry<'_>, out: &mut [u8]) -> Result<(), EncodeError> {
    let len = record_len(entry)?;
    assert_eq!(
        out.len(),
        len,
        "write_record needs exactly record_len bytes"
    );
    let fields = len - MIN_RECORD_LEN;
    let mut w = Write { out, pos: 0 };
    w.put(&[VERSION, entry.change.action().code()]);
    w.put(&(fields as u32).to_le_bytes());
    w.put(&entry.seq.to_le_bytes());
    w.put(&entry.ts.to_le_bytes());
    entry.change.visit_fields(&mut w);
    let crc = crc32c::crc32c(&w.out[..w.pos]);
    w.put(&crc.to_le_bytes());
    debug_assert_eq!(w.pos, len);
    Ok(())
}

/// Appends the entry's record to `out`; `out` is unchanged on error.
pub fn encode_into(entry: &Entry<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let len = record_len(entry)?;
    let start = out.len();
    out.resize(start + len, 0);
    write_record(entry, &mut out[start..])
}

// The whole-value forms below are the core's API for Rust callers and tests;
// the Python edge streams with `encode_into`, `write_record` and `Records`.

/// The entry as one record.
#[allow(dead_code)]
pub fn encode(entry: &Entry<'_>) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(entry, &mut out)?;
    Ok(out)
}

/// The entries as a batch: their records back to back.
#[allow(dead_code)]
pub fn encode_batch(entries: &[Entry<'_>]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    for entry in entries {
        encode_into(entry, &mut out)?;
    }
    Ok(out)
}

// ---- decoding ----

/// Why bytes are not a valid record: the failed check and where, as byte offsets into the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Check 1: fewer than `MIN_RECORD_LEN` bytes remain at `offset`.
    TruncatedHeader { offset: usize, available: usize },
    /// Check 2: the version byte at `offset` is not `VERSION`.
    UnsupportedVersion { offset: usize, version: u8 },
    /// Check 3: the fields length at `offset` is over `MAX_FIELDS_LEN`.
    CorruptLength { offset: usize, fields_len: u32 },
    /// Check 4: the record starting at `offset` needs more bytes than remain.
    TruncatedRecord {
        offset: usize,
        needed: usize,
        available: usize,
    },
    /// Check 5: the CRC32C at `offset` does not match the bytes before it.
    ChecksumMismatch {
        offset: usize,
        stored: u32,
        computed: u32,
    },
    /// Check 6: the action code at `offset` is unknown.
    UnknownAction { offset: usize, code: u8 },
    /// Check 7: the field starting at `offset` (or the unused bytes) is corrupt.
    CorruptFields {
        offset: usize,
        problem: FieldProblem,
    },
    /// Check 8: bytes follow the record, from `offset`.
    TrailingBytes { offset: usize, count: usize },
}

/// What is wrong with a record's fields (check 7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldProblem {
    /// A u64, or the u32 prefix of a str or list, runs past the fields.
    Short {
        field: &'static str,
        needed: usize,
        available: usize,
    },
    /// A str's declared byte length runs past the fields.
    LengthPastEnd {
        field: &'static str,
        declared: u32,
        available: usize,
    },
    /// A list's declared count runs past the fields.
    CountPastEnd {
        field: &'static str,
        count: u32,
        available: usize,
    },
    BadUtf8 {
        field: &'static str,
    },
    BadBool {
        field: &'static str,
        byte: u8,
    },
    /// A channel or folder code out of its table.
    UnknownCode {
        field: &'static str,
        code: u8,
    },
    /// Bytes left over after the last field.
    Unused {
        count: usize,
    },
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldProblem::Short {
                field,
                needed,
                available,
            } => write!(f, "field '{field}' needs {needed} bytes, {available} left"),
            FieldProblem::LengthPastEnd {
                field,
                declared,
                available,
            } => write!(
                f,
                "field '{field}' declares {declared} bytes, {available} left"
            ),
            FieldProblem::CountPastEnd {
                field,
                count,
                available,
            } => write!(
                f,
                "field '{field}' declares {count} items, {available} bytes left"
            ),
            FieldProblem::BadUtf8 { field } => write!(f, "field '{field}' is not valid UTF-8"),
            FieldProblem::BadBool { field, byte } => {
                write!(f, "field '{field}' has byte {byte}, not a bool")
            }
            FieldProblem::UnknownCode { field, code } => {
                write!(f, "field '{field}' has unknown code {code}")
            }
            FieldProblem::Unused { count } => write!(f, "{count} bytes follow the last field"),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TruncatedHeader { offset, available } => write!(
                f,
                "truncated at byte {offset}: {available} bytes left, a record needs at least {MIN_RECORD_LEN}"
            ),
            DecodeError::UnsupportedVersion { offset, version } => {
                write!(f, "unsupported version at byte {offset}: {version}")
            }
            DecodeError::CorruptLength { offset, fields_len } => write!(
                f,
                "corrupt length at byte {offset}: {fields_len} bytes of fields, over the {MAX_FIELDS_LEN}-byte limit"
            ),
            DecodeError::TruncatedRecord {
                offset,
                needed,
                available,
            } => write!(
                f,
                "truncated at byte {offset}: {available} bytes left, the record needs {needed}"
            ),
            DecodeError::ChecksumMismatch {
                offset,
                stored,
                computed,
            } => write!(
                f,
                "checksum mismatch at byte {offset}: stored {stored:#010x}, computed {computed:#010x}"
            ),
            DecodeError::UnknownAction { offset, code } => {
                write!(f, "unknown action at byte {offset}: {code}")
            }
            DecodeError::CorruptFields { offset, problem } => {
                write!(f, "corrupt fields at byte {offset}: {problem}")
            }
            DecodeError::TrailingBytes { offset, count } => write!(
                f,
                "trailing bytes at byte {offset}: {count} bytes after the record"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

#[inline]
fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

#[inline]
fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Reads fields from `data[pos..end]`; offsets in errors are positions in `data`.
struct FieldReader<'a> {
    data: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> FieldReader<'a> {
    fn corrupt(&self, offset: usize, problem: FieldProblem) -> DecodeError {
        DecodeError::CorruptFields { offset, problem }
    }

    #[inline]
    fn left(&self) -> usize {
        self.end - self.pos
    }

    /// The next `n` bytes (from a fixed-size field), or a `Short` error.
    #[inline]
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.left() < n {
            let problem = FieldProblem::Short {
                field,
                needed: n,
                available: self.left(),
            };
            return Err(self.corrupt(self.pos, problem));
        }
        let bytes = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    #[inline]
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(le_u64(self.take(field, 8)?, 0))
    }

    #[inline]
    fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let start = self.pos;
        let declared = le_u32(self.take(field, 4)?, 0);
        if declared as usize > self.left() {
            let problem = FieldProblem::LengthPastEnd {
                field,
                declared,
                available: self.left(),
            };
            return Err(self.corrupt(start, problem));
        }
        let bytes = &self.data[self.pos..self.pos + declared as usize];
        let text = std::str::from_utf8(bytes)
            .map_err(|_| self.corrupt(start, FieldProblem::BadUtf8 { field }))?;
        self.pos += declared as usize;
        Ok(text)
    }

    fn u64_list(&mut self, field: &'static str) -> Result<Vec<u64>, DecodeError> {
        let start = self.pos;
        let count = le_u32(self.take(field, 4)?, 0);
        // In u64, so a hostile count cannot overflow; checked before allocating.
        if u64::from(count) * 8 > self.left() as u64 {
            let problem = FieldProblem::CountPastEnd {
                field,
                count,
                available: self.left(),
            };
            return Err(self.corrupt(start, problem));
        }
        let bytes = &self.data[self.pos..self.pos + count as usize * 8];
        self.pos += bytes.len();
        Ok(bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect())
    }

    #[inline]
    fn byte(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(field, 1)?[0])
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        let at = self.pos;
        match self.byte(field)? {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(self.corrupt(at, FieldProblem::BadBool { field, byte })),
        }
    }

    fn channel(&mut self, field: &'static str) -> Result<Channel, DecodeError> {
        let at = self.pos;
        let code = self.byte(field)?;
        Channel::from_code(code)
            .ok_or_else(|| self.corrupt(at, FieldProblem::UnknownCode { field, code }))
    }

    fn folder(&mut self, field: &'static str) -> Result<Folder, DecodeError> {
        let at = self.pos;
        let code = self.byte(field)?;
        Folder::from_code(code)
            .ok_or_else(|| self.corrupt(at, FieldProblem::UnknownCode { field, code }))
    }

    fn change(&mut self, action: Action) -> Result<Change<'a>, DecodeError> {
        Ok(match action {
            Action::MessageAdded => Change::MessageAdded(MessageAdded {
                message_id: self.str("message_id")?,
                thread_id: self.str("thread_id")?,
                sender: self.u64("sender")?,
                participants: self.u64_list("participants")?,
                channel: self.channel("channel")?,
                folder: self.folder("folder")?,
                unread: self.bool("unread")?,
                subject: self.str("subject")?,
                snippet: self.str("snippet")?,
                body_ref: self.str("body_ref")?,
                key: self.str("key")?,
            }),
            Action::MarkedRead => Change::MarkedRead {
                thread_id: self.str("thread_id")?,
                message_id: self.str("message_id")?,
            },
            Action::MarkedUnread => Change::MarkedUnread {
                thread_id: self.str("thread_id")?,
                message_id: self.str("message_id")?,
            },
            Action::Moved => Change::Moved {
                thread_id: self.str("thread_id")?,
                folder: self.folder("folder")?,
            },
            Action::MessageDeleted => Change::MessageDeleted {
                thread_id: self.str("thread_id")?,
                message_id: self.str("message_id")?,
            },
            Action::ThreadDeleted => Change::ThreadDeleted {
                thread_id: self.str("thread_id")?,
            },
            Action::SenderBlocked => Change::SenderBlocked {
                sender: self.u64("sender")?,
            },
            Action::SenderUnblocked => Change::SenderUnblocked {
                sender: self.u64("sender")?,
            },
            Action::FolderSeen => Change::FolderSeen {
                folder: self.folder("folder")?,
            },
            Action::OutboundSettled => Change::OutboundSettled {
                message_id: self.str("message_id")?,
                address: self.str("address")?,
                outcome: self.str("outcome")?,
                detail: self.str("detail")?,
            },
            Action::SmsSet => Change::SmsSet {
                phone: self.str("phone")?,
                mode: self.str("mode")?,
            },
        })
    }
}

/// Decodes the record starting at `data[offset..]`, running checks 1 to 7.
///
/// Returns the entry and the offset just past the record. Error offsets are
/// positions in `data`, so a batch's errors point into the whole batch.
pub fn decode_at(data: &[u8], offset: usize) -> Result<(Entry<'_>, usize), DecodeError> {
    let available = data.len().saturating_sub(offset);
    if available < MIN_RECORD_LEN {
        return Err(DecodeError::TruncatedHeader { offset, available });
    }
    let version = data[offset];
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion { offset, version });
    }
    let fields_len = le_u32(data, offset + 2);
    if fields_len as usize > MAX_FIELDS_LEN {
        return Err(DecodeError::CorruptLength {
            offset: offset + 2,
            fields_len,
        });
    }
    let needed = MIN_RECORD_LEN + fields_len as usize;
    if available < needed {
        return Err(DecodeError::TruncatedRecord {
            offset,
            needed,
            available,
        });
    }
    let crc_at = offset + HEADER_LEN + fields_len as usize;
    let stored = le_u32(data, crc_at);
    let computed = crc32c::crc32c(&data[offset..crc_at]);
    if stored != computed {
        return Err(DecodeError::ChecksumMismatch {
            offset: crc_at,
            stored,
            computed,
        });
    }
    let code = data[offset + 1];
    let action = Action::from_code(code).ok_or(DecodeError::UnknownAction {
        offset: offset + 1,
        code,
    })?;
    let mut reader = FieldReader {
        data,
        pos: offset + HEADER_LEN,
        end: crc_at,
    };
    let change = reader.change(action)?;
    if reader.pos != crc_at {
        let problem = FieldProblem::Unused {
            count: crc_at - reader.pos,
        };
        return Err(reader.corrupt(reader.pos, problem));
    }
    let entry = Entry {
        seq: le_u64(data, offset + 6),
        ts: le_u64(data, offset + 14),
        change,
    };
    Ok((entry, crc_at + CRC_LEN))
}

/// Decodes exactly one record: checks 1 to 8.
pub fn decode(data: &[u8]) -> Result<Entry<'_>, DecodeError> {
    let (entry, end) = decode_at(data, 0)?;
    if end != data.len() {
        return Err(DecodeError::TrailingBytes {
            offset: end,
            count: data.len() - end,
        });
    }
    Ok(entry)
}

/// The records of a batch, in order; stops at the first bad one.
pub struct Records<'a> {
    data: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Records<'a> {
    pub fn new(data: &'a [u8]) -> Records<'a> {
        Records {
            data,
            pos: 0,
            failed: false,
        }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Entry<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos == self.data.len() {
            return None;
        }
        match decode_at(self.data, self.pos) {
            Ok((entry, end)) => {
                self.pos = end;
                Some(Ok(entry))
            }
            Err(err) => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
}

/// Decodes a batch; the empty batch is zero bytes.
#[allow(dead_code)]
pub fn decode_batch(data: &[u8]) -> Result<Vec<Entry<'_>>, DecodeError> {
    Records::new(data).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message_added() -> Entry<'static> {
        Entry {
            seq: 42,
            ts: 1_764_211_200_000_000,
            change: Change::MessageAdded(MessageAdded {
                message_id: "m-1",
                thread_id: "t-1",
                sender: 7,
                participants: vec![7, 8, 9],
                channel: Channel::Email,
                folder: Folder::Inbox,
                unread: true,
                subject: "Hello",
                snippet: "Hi there, ünïcödé ✓",
                body_ref: "m:1",
                key: "<abc@example.com>",
            }),
        }
    }

    fn thread_deleted() -> Entry<'static> {
        Entry {
            seq: 1,
            ts: 2,
            change: Change::ThreadDeleted { thread_id: "t" },
        }
    }

    /// Rewrites the CRC of the record at the start of `bytes` so it is valid again.
    fn fix_crc(bytes: &mut [u8]) {
        let b = le_u32(bytes, 2) as usize;
        let crc = crc32c::crc32c(&bytes[..HEADER_LEN + b]);
        bytes[HEADER_LEN + b..HEADER_LEN + b + 4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn the_doc_example_is_byte_exact() {
        let bytes = encode(&thread_deleted()).unwrap();
        let mut expected = vec![1u8, 6, 5, 0, 0, 0];
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(&2u64.to_le_bytes());
        expected.extend_from_slice(&[1, 0, 0, 0, b't']);
        let crc = crc32c::crc32c(&expected);
        expected.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(bytes, expected);
        assert_eq!(bytes.len(), 31);
    }

    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn message_added_round_trips() {
        let entry = message_added();
        let bytes = encode(&entry).unwrap();
        assert_eq!(bytes.len(), record_len(&entry).unwrap());
        assert_eq!(decode(&bytes).unwrap(), entry);
    }

    #[test]
    fn codes_and_names_round_trip() {
        for (i, a) in Action::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(a.code()), i + 1);
            assert_eq!(Action::from_code(a.code()), Some(a));
            assert_eq!(Action::from_name(a.name()), Some(a));
        }
        for c in Channel::ALL {
            assert_eq!(Channel::from_code(c.code()), Some(c));
            assert_eq!(Channel::from_name(c.name()), Some(c));
        }
        for f in Folder::ALL {
            assert_eq!(Folder::from_code(f.code()), Some(f));
            assert_eq!(Folder::from_name(f.name()), Some(f));
        }
        assert_eq!(Action::from_code(0), None);
        assert_eq!(Action::from_code(12), None);
        assert_eq!(Channel::from_code(5), None);
        assert_eq!(Folder::from_code(0), None);
        assert_eq!(Folder::from_name("Inbox"), None);
    }

    #[test]
    fn truncation_at_every_length_is_an_error() {
        let bytes = encode(&message_added()).unwrap();
        for len in 0..bytes.len() {
            let err = decode(&bytes[..len]).unwrap_err();
            if len < MIN_RECORD_LEN {
                assert_eq!(
                    err,
                    DecodeError::TruncatedHeader {
                        offset: 0,
                        available: len
                    }
                );
            } else {
                assert!(matches!(err, DecodeError::TruncatedRecord { .. }), "{err}");
            }
        }
    }

    #[test]
    fn checks_run_in_the_documented_order() {
        let good = encode(&thread_deleted()).unwrap();

        let mut bad = good.clone();
        bad[0] = 2;
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::UnsupportedVersion {
                offset: 0,
                version: 2
            }
        );

        // An oversized length wins over the (also wrong) checksum and the short input.
        let mut bad = good.clone();
        bad[2..6].copy_from_slice(&(MAX_FIELDS_LEN as u32 + 1).to_le_bytes());
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::CorruptLength {
                offset: 2,
                fields_len: MAX_FIELDS_LEN as u32 + 1
            }
        );

        // A hostile length that points past the end.
        let mut bad = good.clone();
        bad[2..6].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::TruncatedRecord {
                offset: 0,
                needed: 1026,
                available: 31
            }
        );

        let mut bad = good.clone();
        bad[22] ^= 0x80;
        assert!(matches!(
            decode(&bad).unwrap_err(),
            DecodeError::ChecksumMismatch { offset: 27, .. }
        ));

        let mut bad = good.clone();
        bad[1] = 12;
        fix_crc(&mut bad);
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::UnknownAction { offset: 1, code: 12 }
        );

        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::TrailingBytes {
                offset: 31,
                count: 1
            }
        );
    }

    #[test]
    fn corrupt_fields_are_reported_at_the_field() {
        // thread_deleted whose string says 5 bytes but only 1 is there.
        let mut bad = encode(&thread_deleted()).unwrap();
        bad[22..26].copy_from_slice(&5u32.to_le_bytes());
        fix_crc(&mut bad);
        let err = decode(&bad).unwrap_err();
        assert_eq!(
            err,
            DecodeError::CorruptFields {
                offset: 22,
                problem: FieldProblem::LengthPastEnd {
                    field: "thread_id",
                    declared: 5,
                    available: 1
                }
            }
        );
        assert_eq!(
            err.to_string(),
            "corrupt fields at byte 22: field 'thread_id' declares 5 bytes, 1 left"
        );

        // Invalid UTF-8 (a lone continuation byte).
        let mut bad = encode(&thread_deleted()).unwrap();
        bad[26] = 0x80;
        fix_crc(&mut bad);
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::CorruptFields {
                offset: 22,
                problem: FieldProblem::BadUtf8 { field: "thread_id" }
            }
        );

        // A string shorter than declared leaves unused bytes.
        let mut bad = encode(&thread_deleted()).unwrap();
        bad[22..26].copy_from_slice(&0u32.to_le_bytes());
        fix_crc(&mut bad);
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::CorruptFields {
                offset: 26,
                problem: FieldProblem::Unused { count: 1 }
            }
        );
    }

    #[test]
    fn bad_enums_bools_and_huge_counts_are_corrupt() {
        let entry = message_added();
        let good = encode(&entry).unwrap();
        // message_id (4+3), thread_id (4+3), sender (8): participants at 22 + 22.
        let participants = HEADER_LEN + 22;
        let channel = participants + 4 + 24;
        let (folder, unread) = (channel + 1, channel + 2);

        let mut bad = good.clone();
        bad[participants..participants + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        fix_crc(&mut bad);
        assert!(matches!(
            decode(&bad).unwrap_err(),
            DecodeError::CorruptFields { offset, problem: FieldProblem::CountPastEnd { count: u32::MAX, .. } }
                if offset == participants
        ));

        for (at, field, value) in [(channel, "channel", 0u8), (folder, "folder", 6)] {
            let mut bad = good.clone();
            bad[at] = value;
            fix_crc(&mut bad);
            assert_eq!(
                decode(&bad).unwrap_err(),
                DecodeError::CorruptFields {
                    offset: at,
                    problem: FieldProblem::UnknownCode { field, code: value }
                }
            );
        }

        let mut bad = good.clone();
        bad[unread] = 2;
        fix_crc(&mut bad);
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::CorruptFields {
                offset: unread,
                problem: FieldProblem::BadBool {
                    field: "unread",
                    byte: 2
                }
            }
        );
    }

    #[test]
    fn a_record_short_of_its_fixed_fields_is_corrupt() {
        // sender_blocked with B = 3: the u64 does not fit.
        let mut bad = vec![1u8, 7, 3, 0, 0, 0];
        bad.extend_from_slice(&[0; 16]);
        bad.extend_from_slice(&[1, 2, 3, 0, 0, 0, 0]);
        fix_crc(&mut bad);
        assert_eq!(
            decode(&bad).unwrap_err(),
            DecodeError::CorruptFields {
                offset: 22,
                problem: FieldProblem::Short {
                    field: "sender",
                    needed: 8,
                    available: 3
                }
            }
        );
    }

    #[test]
    fn encode_refuses_fields_over_the_limit_and_accepts_the_limit() {
        let at_limit = "x".repeat(MAX_FIELDS_LEN - 4);
        let entry = Entry {
            seq: 0,
            ts: 0,
            change: Change::ThreadDeleted {
                thread_id: &at_limit,
            },
        };
        let bytes = encode(&entry).unwrap();
        assert_eq!(decode(&bytes).unwrap(), entry);

        let over = "x".repeat(MAX_FIELDS_LEN - 3);
        let entry = Entry {
            seq: 0,
            ts: 0,
            change: Change::ThreadDeleted { thread_id: &over },
        };
        assert_eq!(
            encode(&entry).unwrap_err(),
            EncodeError::FieldsTooLong {
                len: MAX_FIELDS_LEN + 1
            }
        );
        let mut out = vec![9];
        assert!(encode_into(&entry, &mut out).is_err());
        assert_eq!(out, vec![9]);
    }

    #[test]
    fn batches_hold_records_back_to_back() {
        let entries = vec![message_added(), thread_deleted(), message_added()];
        let bytes = encode_batch(&entries).unwrap();
        assert_eq!(decode_batch(&bytes).unwrap(), entries);
        assert_eq!(decode_batch(&[]).unwrap(), vec![]);
        // A batch error points into the batch, not into the record.
        let first = encode(&message_added()).unwrap().len();
        let err = decode_batch(&bytes[..first + 10]).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TruncatedHeader {
                offset: first,
                available: 10
            }
        );
        // decode takes one record only.
        assert!(matches!(
            decode(&bytes).unwrap_err(),
            DecodeError::TrailingBytes { offset, .. } if offset == first
        ));
    }

    // ---- properties ----

    /// An entry's data with owned strings, so a strategy can build it.
    #[derive(Clone, Debug)]
    struct Owned {
        seq: u64,
        ts: u64,
        action: Action,
        strs: Vec<String>,
        sender: u64,
        participants: Vec<u64>,
        channel: Channel,
        folder: Folder,
        unread: bool,
    }

    impl Owned {
        fn entry(&self) -> Entry<'_> {
            let s = |i: usize| self.strs[i].as_str();
            let change = match self.action {
                Action::MessageAdded => Change::MessageAdded(MessageAdded {
                    message_id: s(0),
                    thread_id: s(1),
                    sender: self.sender,
                    participants: self.participants.clone(),
                    channel: self.channel,
                    folder: self.folder,
                    unread: self.unread,
                    subject: s(2),
                    snippet: s(3),
                    body_ref: s(4),
                    key: s(5),
                }),
                Action::MarkedRead => Change::MarkedRead {
                    thread_id: s(0),
                    message_id: s(1),
                },
                Action::MarkedUnread => Change::MarkedUnread {
                    thread_id: s(0),
                    message_id: s(1),
                },
                Action::Moved => Change::Moved {
                    thread_id: s(0),
                    folder: self.folder,
                },
                Action::MessageDeleted => Change::MessageDeleted {
                    thread_id: s(0),
                    message_id: s(1),
                },
                Action::ThreadDeleted => Change::ThreadDeleted { thread_id: s(0) },
                Action::SenderBlocked => Change::SenderBlocked {
                    sender: self.sender,
                },
                Action::SenderUnblocked => Change::SenderUnblocked {
                    sender: self.sender,
                },
                Action::FolderSeen => Change::FolderSeen {
                    folder: self.folder,
                },
                Action::OutboundSettled => Change::OutboundSettled {
                    message_id: s(0),
                    address: s(1),
                    outcome: s(2),
                    detail: s(3),
                },
                Action::SmsSet => Change::SmsSet {
                    phone: s(0),
                    mode: s(1),
                },
            };
            Entry {
                seq: self.seq,
                ts: self.ts,
                change,
            }
        }
    }

    fn owned() -> impl Strategy<Value = Owned> {
        (
            any::<u64>(),
            any::<u64>(),
            prop::sample::select(Action::ALL.to_vec()),
            prop::collection::vec(".{0,40}", 6),
            any::<u64>(),
            prop::collection::vec(any::<u64>(), 0..6),
            prop::sample::select(Channel::ALL.to_vec()),
            prop::sample::select(Folder::ALL.to_vec()),
            any::<bool>(),
        )
            .prop_map(
                |(seq, ts, action, strs, sender, participants, channel, folder, unread)| Owned {
                    seq,
                    ts,
                    action,
                    strs,
                    sender,
                    participants,
                    channel,
                    folder,
                    unread,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&data);
            let _ = decode_batch(&data);
        }

        #[test]
        fn random_bytes_behind_a_valid_header_never_panic(
            action in 0u8..10,
            fields in prop::collection::vec(any::<u8>(), 0..120),
        ) {
            // A valid CRC gets random fields past check 5, into the field parser.
            let mut data = vec![VERSION, action];
            data.extend_from_slice(&(fields.len() as u32).to_le_bytes());
            data.extend_from_slice(&[0; 16]);
            data.extend_from_slice(&fields);
            data.extend_from_slice(&[0; 4]);
            fix_crc(&mut data);
            if let Err(err) = decode(&data) {
                prop_assert!(
                    matches!(err, DecodeError::UnknownAction { .. } | DecodeError::CorruptFields { .. }),
                    "{}", err
                );
            }
        }

        #[test]
        fn encode_then_decode_round_trips(owned in owned()) {
            let entry = owned.entry();
            let bytes = encode(&entry).unwrap();
            prop_assert_eq!(bytes.len(), MIN_RECORD_LEN + fields_len(&entry));
            prop_assert_eq!(decode(&bytes).unwrap(), entry);
        }

        #[test]
        fn batches_round_trip(owned in prop::collection::vec(owned(), 0..5)) {
            let entries: Vec<Entry<'_>> = owned.iter().map(Owned::entry).collect();
            let bytes = encode_batch(&entries).unwrap();
            prop_assert_eq!(decode_batch(&bytes).unwrap(), entries);
        }

        #[test]
        fn single_byte_corruption_is_always_detected(
            owned in owned(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut bytes = encode(&owned.entry()).unwrap();
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
            prop_assert!(decode(&bytes).is_err());
        }
    }
}
