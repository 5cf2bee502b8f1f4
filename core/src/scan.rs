//! Static pickle opcode scanning, protocols 0-5, with no code executed: protocol, the globals a
//! pickle would import, risky opcodes, where it ends, and precise errors for broken input.

use crate::policy::Global;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Strings longer than this are not kept: no module or attribute name is that long.
const MAX_TRACKED_STRING: usize = 4096;

/// What a scan found in one pickle stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The protocol from PROTO, or 0/1 for streams without it.
    pub protocol: u8,
    /// Every `(module, name)` the stream imports, in first-seen order, without repeats.
    pub globals: Vec<Global>,
    /// Imports whose target cannot be known without running code (EXT codes, computed names).
    pub unresolved: Vec<String>,
    /// Opcodes that call or build objects, with their counts.
    pub risky_opcodes: BTreeMap<&'static str, usize>,
    /// Offset just past STOP.
    pub end: usize,
    /// Bytes left after STOP (another pickle appended, or a container's payload).
    pub trailing: usize,
}

impl Report {
    /// The globals, for a `[[trust]]` rule to check: an import the scan cannot name (an EXT code,
    /// which copyreg's cache resolves with no `find_class` event; a computed name) is an error.
    pub fn nameable_globals(&self) -> Result<Vec<Global>, String> {
        match self.unresolved.first() {
            None => Ok(self.globals.clone()),
            Some(first) => Err(format!("{first} cannot be checked against the rule's globals")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    /// The input ends inside the opcode at `offset`; at least `needed` more bytes are required.
    Truncated { offset: usize, opcode: &'static str, needed: usize },
    UnknownOpcode { offset: usize, byte: u8 },
    Malformed { offset: usize, opcode: &'static str, problem: String },
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::Truncated { offset, opcode, .. } => {
                write!(f, "truncated pickle: input ends inside {opcode} at offset {offset}")
            }
            ScanError::UnknownOpcode { offset, byte } => {
                write!(f, "not a pickle: unknown opcode 0x{byte:02x} at offset {offset}")
            }
            ScanError::Malformed { offset, opcode, problem } => {
                write!(f, "malformed pickle: {opcode} at offset {offset}: {problem}")
            }
        }
    }
}

impl std::error::Error for ScanError {}

/// How much more input a streaming scan needs before it can go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// At least this many bytes.
    Bytes(usize),
    /// The rest of a text line (protocol 0 arguments end with a newline).
    Line,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Done(Report),
    NeedMore(Need),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Str(String),
    Other,
}

/// A resumable scanner: feed it the input seen so far, and it continues where it stopped.
#[derive(Debug, Default)]
pub struct Scanner {
    pos: usize,
    stack: Vec<Item>,
    marks: Vec<usize>,
    memo: HashMap<u64, Item>,
    frame_end: usize,
    saw_binary: bool,
    proto: Option<u8>,
    report: Report,
}

/// Scans one complete pickle from the start of `bytes`.
pub fn scan(bytes: &[u8]) -> Result<Report, ScanError> {
    let mut scanner = Scanner::default();
    match scanner.feed(bytes)? {
        Progress::Done(report) => Ok(report),
        Progress::NeedMore(_) => Err(scanner.truncation(bytes)),
    }
}

enum Arg<'a> {
    Bytes(&'a [u8]),
    Missing(Need),
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Arg<'a> {
        match self.at.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let bytes = &self.buf[self.at..end];
                self.at = end;
                Arg::Bytes(bytes)
            }
            _ => Arg::Missing(Need::Bytes(n.saturating_sub(self.buf.len() - self.at).max(1))),
        }
    }

    fn line(&mut self) -> Arg<'a> {
        match self.buf[self.at..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let bytes = &self.buf[self.at..self.at + i];
                self.at += i + 1;
                Arg::Bytes(bytes)
            }
            None => Arg::Missing(Need::Line),
        }
    }
}

fn le_uint(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64)
}

fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'(' => "MARK", b'.' => "STOP", b'0' => "POP", b'1' => "POP_MARK", b'2' => "DUP",
        b'F' => "FLOAT", b'I' => "INT", b'J' => "BININT", b'K' => "BININT1", b'L' => "LONG",
        b'M' => "BININT2", b'N' => "NONE", b'P' => "PERSID", b'Q' => "BINPERSID", b'R' => "REDUCE",
        b'S' => "STRING", b'T' => "BINSTRING", b'U' => "SHORT_BINSTRING", b'V' => "UNICODE",
        b'X' => "BINUNICODE", b'a' => "APPEND", b'b' => "BUILD", b'c' => "GLOBAL", b'd' => "DICT",
        b'}' => "EMPTY_DICT", b'e' => "APPENDS", b'g' => "GET", b'h' => "BINGET", b'i' => "INST",
        b'j' => "LONG_BINGET", b'l' => "LIST", b']' => "EMPTY_LIST", b'o' => "OBJ", b'p' => "PUT",
        b'q' => "BINPUT", b'r' => "LONG_BINPUT", b's' => "SETITEM", b't' => "TUPLE",
        b')' => "EMPTY_TUPLE", b'u' => "SETITEMS", b'G' => "BINFLOAT",
        0x80 => "PROTO", 0x81 => "NEWOBJ", 0x82 => "EXT1", 0x83 => "EXT2", 0x84 => "EXT4",
        0x85 => "TUPLE1", 0x86 => "TUPLE2", 0x87 => "TUPLE3", 0x88 => "NEWTRUE", 0x89 => "NEWFALSE",
        0x8a => "LONG1", 0x8b => "LONG4", b'B' => "BINBYTES", b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE", 0x8d => "BINUNICODE8", 0x8e => "BINBYTES8", 0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS", 0x91 => "FROZENSET", 0x92 => "NEWOBJ_EX", 0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE", 0x95 => "FRAME", 0x96 => "BYTEARRAY8", 0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

fn is_risky(name: &str) -> bool {
    matches!(
        name,
        "GLOBAL" | "STACK_GLOBAL" | "INST" | "OBJ" | "REDUCE" | "BUILD" | "NEWOBJ" | "NEWOBJ_EX"
            | "EXT1" | "EXT2" | "EXT4" | "PERSID" | "BINPERSID"
    )
}

/// A text string argument as Python 3 would see it, when that is knowable without escapes.
fn plain_text(bytes: &[u8]) -> Item {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\\') && s.len() <= MAX_TRACKED_STRING => Item::Str(s.to_string()),
        _ => Item::Other,
    }
}

/// Protocol 0 `STRING` arguments are Python literals: `'os'` or `"os"`.
fn quoted_text(bytes: &[u8]) -> Option<Item> {
    let quote = *bytes.first()?;
    if bytes.len() < 2 || !matches!(quote, b'\'' | b'"') || bytes[bytes.len() - 1] != quote {
        return None;
    }
    Some(plain_text(&bytes[1..bytes.len() - 1]))
}

impl Scanner {
    /// Continues scanning `buf` (all input so far, from the start of the pickle).
    pub fn feed(&mut self, buf: &[u8]) -> Result<Progress, ScanError> {
        loop {
            let start = self.pos;
            let Some(&op) = buf.get(start) else {
                return Ok(Progress::NeedMore(self.hint(buf, Need::Bytes(1))));
            };
            let name = opcode_name(op).ok_or(ScanError::UnknownOpcode { offset: start, byte: op })?;
            let mut cur = Cursor { buf, at: start + 1 };
            match self.step(op, name, &mut cur, start)? {
                Some(need) => return Ok(Progress::NeedMore(self.hint(buf, need))),
                None => self.pos = cur.at,
            }
            if is_risky(name) {
                *self.report.risky_opcodes.entry(name).or_default() += 1;
            }
            if op == b'.' {
                let mut report = std::mem::take(&mut self.report);
                report.protocol = self.proto.unwrap_or(self.saw_binary as u8);
                report.end = self.pos;
                report.trailing = buf.len() - self.pos;
                return Ok(Progress::Done(report));
            }
        }
    }

    /// The error for input that ended before STOP.
    pub fn truncation(&self, buf: &[u8]) -> ScanError {
        let opcode = buf.get(self.pos).and_then(|&b| opcode_name(b)).unwrap_or("an opcode (no STOP)");
        let needed = match self.hint(buf, Need::Bytes(1)) {
            Need::Bytes(n) => n,
            Need::Line => 1,
        };
        ScanError::Truncated { offset: self.pos, opcode, needed }
    }

    /// Inside a frame, ask for the whole rest of the frame at once.
    fn hint(&self, buf: &[u8], need: Need) -> Need {
        let rest_of_frame = self.frame_end.saturating_sub(buf.len());
        match need {
            Need::Bytes(n) => Need::Bytes(n.max(rest_of_frame)),
            Need::Line if rest_of_frame > 0 => Need::Bytes(rest_of_frame),
            Need::Line => Need::Line,
        }
    }

    fn malformed(offset: usize, opcode: &'static str, problem: impl Into<String>) -> ScanError {
        ScanError::Malformed { offset, opcode, problem: problem.into() }
    }

    fn pop(&mut self, n: usize, offset: usize, opcode: &'static str) -> Result<Vec<Item>, ScanError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + n {
            return Err(Self::malformed(offset, opcode, "stack underflow"));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_mark(&mut self, offset: usize, opcode: &'static str) -> Result<Vec<Item>, ScanError> {
        let mark = self.marks.pop().ok_or_else(|| Self::malformed(offset, opcode, "no MARK on the stack"))?;
        Ok(self.stack.split_off(mark))
    }

    fn top(&self, offset: usize, opcode: &'static str) -> Result<Item, ScanError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match self.stack.last() {
            Some(item) if self.stack.len() > floor => Ok(item.clone()),
            _ => Err(Self::malformed(offset, opcode, "stack underflow")),
        }
    }

    fn add_global(&mut self, module: String, name: String) {
        let global = (module, name);
        if !self.report.globals.contains(&global) {
            self.report.globals.push(global);
        }
    }

    fn text_line(bytes: &[u8], offset: usize, opcode: &'static str) -> Result<String, ScanError> {
        String::from_utf8(bytes.to_vec()).map_err(|_| Self::malformed(offset, opcode, "argument is not UTF-8"))
    }

    fn memo_index(bytes: &[u8], offset: usize, opcode: &'static str) -> Result<u64, ScanError> {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| Self::malformed(offset, opcode, "memo index is not a decimal number"))
    }

    /// Applies one opcode. Returns what is missing when the input ends inside it.
    fn step(&mut self, op: u8, name: &'static str, cur: &mut Cursor<'_>, at: usize) -> Result<Option<Need>, ScanError> {
        macro_rules! arg {
            ($e:expr) => {
                match $e {
                    Arg::Bytes(b) => b,
                    Arg::Missing(need) => return Ok(Some(need)),
                }
            };
        }
        if op >= 0x80 || matches!(op, b'J' | b'K' | b'M' | b'T' | b'U' | b'X' | b'G' | b'B' | b'C' | b'h' | b'j' | b'q' | b'r' | b'Q' | b'}' | b']' | b')' | b'e' | b'u' | b'o') {
            self.saw_binary = true;
        }
        match op {
            b'(' => self.marks.push(self.stack.len()),
            b'.' => {
                self.pop(1, at, name)?;
            }
            b'0' => {
                if self.stack.len() > self.marks.last().copied().unwrap_or(0) {
                    self.stack.pop();
                } else {
                    self.pop_mark(at, name)?;
                }
            }
            b'1' => {
                self.pop_mark(at, name)?;
            }
            b'2' => {
                let top = self.top(at, name)?;
                self.stack.push(top);
            }
            b'F' | b'I' | b'L' => {
                arg!(cur.line());
                self.stack.push(Item::Other);
            }
            b'J' => { arg!(cur.take(4)); self.stack.push(Item::Other); }
            b'K' => { arg!(cur.take(1)); self.stack.push(Item::Other); }
            b'M' => { arg!(cur.take(2)); self.stack.push(Item::Other); }
            b'G' => { arg!(cur.take(8)); self.stack.push(Item::Other); }
            0x8a | 0x8b => {
                let width = if op == 0x8a { 1 } else { 4 };
                let len = le_uint(arg!(cur.take(width))) as usize;
                arg!(cur.take(len));
                self.stack.push(Item::Other);
            }
            b'N' | 0x88 | 0x89 | b'}' | b']' | b')' | 0x8f | 0x97 => self.stack.push(Item::Other),
            b'S' => {
                let text = arg!(cur.line());
                let item = quoted_text(text).ok_or_else(|| Self::malformed(at, name, "STRING argument is not quoted"))?;
                self.stack.push(item);
            }
            b'V' => {
                let text = arg!(cur.line());
                self.stack.push(plain_text(text));
            }
            b'T' | b'U' | b'X' | 0x8c | 0x8d | b'B' | b'C' | 0x8e | 0x96 => {
                let width = match op {
                    b'U' | 0x8c | b'C' => 1,
                    b'T' | b'X' | b'B' => 4,
                    _ => 8,
                };
                let len = le_uint(arg!(cur.take(width)));
                if op == b'T' && len > i32::MAX as u64 {
                    return Err(Self::malformed(at, name, "negative length"));
                }
                let len = usize::try_from(len).map_err(|_| Self::malformed(at, name, "length does not fit in memory"))?;
                let data = arg!(cur.take(len));
                let is_text = matches!(op, b'T' | b'U' | b'X' | 0x8c | 0x8d);
                self.stack.push(if is_text { plain_text(data) } else { Item::Other });
            }
            0x98 => {
                self.top(at, name)?;
            }
            b'a' => {
                self.pop(1, at, name)?;
                self.top(at, name)?;
            }
            b'e' | b'u' | 0x90 => {
                self.pop_mark(at, name)?;
                self.top(at, name)?;
            }
            b'l' | b't' | b'd' | 0x91 => {
                self.pop_mark(at, name)?;
                self.stack.push(Item::Other);
            }
            0x85 | 0x86 | 0x87 => {
                self.pop((op - 0x84) as usize, at, name)?;
                self.stack.push(Item::Other);
            }
            b's' => {
                self.pop(2, at, name)?;
                self.top(at, name)?;
            }
            b'g' | b'h' | b'j' => {
                let index = match op {
                    b'g' => Self::memo_index(arg!(cur.line()), at, name)?,
                    b'h' => le_uint(arg!(cur.take(1))),
                    _ => le_uint(arg!(cur.take(4))),
                };
                let item = self.memo.get(&index).cloned().ok_or_else(|| {
                    Self::malformed(at, name, format!("memo key {index} was never stored"))
                })?;
                self.stack.push(item);
            }
            b'p' | b'q' | b'r' | 0x94 => {
                let index = match op {
                    b'p' => Self::memo_index(arg!(cur.line()), at, name)?,
                    b'q' => le_uint(arg!(cur.take(1))),
                    b'r' => le_uint(arg!(cur.take(4))),
                    _ => self.memo.len() as u64,
                };
                let top = self.top(at, name)?;
                self.memo.insert(index, top);
            }
            b'c' | b'i' => {
                let module = Self::text_line(arg!(cur.line()), at, name)?;
                let attr = Self::text_line(arg!(cur.line()), at, name)?;
                self.add_global(module, attr);
                if op == b'i' {
                    self.pop_mark(at, name)?;
                }
                self.stack.push(Item::Other);
            }
            0x93 => {
                let operands = self.pop(2, at, name)?;
                match (&operands[0], &operands[1]) {
                    (Item::Str(module), Item::Str(attr)) => self.add_global(module.clone(), attr.clone()),
                    _ => self.report.unresolved.push(format!("STACK_GLOBAL at offset {at} with names computed at load time")),
                }
                self.stack.push(Item::Other);
            }
            0x82 | 0x83 | 0x84 => {
                let width = match op { 0x82 => 1, 0x83 => 2, _ => 4 };
                let code = le_uint(arg!(cur.take(width)));
                self.report.unresolved.push(format!("{name} extension code {code} at offset {at} (copyreg registry)"));
                self.stack.push(Item::Other);
            }
            b'P' => {
                arg!(cur.line());
                self.stack.push(Item::Other);
            }
            b'Q' => {
                self.pop(1, at, name)?;
                self.stack.push(Item::Other);
            }
            b'R' | b'b' | 0x81 => {
                self.pop(2, at, name)?;
                self.stack.push(Item::Other);
            }
            0x92 => {
                self.pop(3, at, name)?;
                self.stack.push(Item::Other);
            }
            b'o' => {
                let items = self.pop_mark(at, name)?;
                if items.is_empty() {
                    return Err(Self::malformed(at, name, "OBJ needs a class after MARK"));
                }
                self.stack.push(Item::Other);
            }
            0x80 => {
                let version = arg!(cur.take(1))[0];
                if version > 5 {
                    return Err(Self::malformed(at, name, format!("unsupported protocol {version}")));
                }
                self.proto = Some(version);
            }
            0x95 => {
                let len = le_uint(arg!(cur.take(8)));
                self.frame_end = usize::try_from(len).ok().and_then(|l| cur.at.checked_add(l)).ok_or_else(|| {
                    Self::malformed(at, name, "frame length does not fit in memory")
                })?;
            }
            _ => return Err(ScanError::UnknownOpcode { offset: at, byte: op }),
        }
        Ok(None)
    }
}

/// Python's `pickle` builds the test vectors below; `scan` must agree with what it imports.
#[cfg(test)]
mod tests {
    use super::*;

    // pickle.dumps({"a": [1, 2]}, protocol=2)
    const DICT_P2: &[u8] = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01]q\x02(K\x01K\x02es.";
    // pickle.dumps(collections.OrderedDict(), protocol=4)
    const ODICT_P4: &[u8] = b"\x80\x04\x95\x22\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94.";
    // a protocol 0 reduce of os.system('touch CANARY')
    const SYSTEM_P0: &[u8] = b"cposix\nsystem\n(S'touch CANARY'\ntR.";

    #[test]
    fn plain_containers_have_no_globals() {
        let r = scan(DICT_P2).unwrap();
        assert_eq!(r.protocol, 2);
        assert!(r.globals.is_empty() && r.unresolved.is_empty() && r.risky_opcodes.is_empty());
        assert_eq!((r.end, r.trailing), (DICT_P2.len(), 0));
    }

    #[test]
    fn stack_global_with_memoized_names() {
        let r = scan(ODICT_P4).unwrap();
        assert_eq!(r.protocol, 4);
        assert_eq!(r.globals, vec![("collections".to_string(), "OrderedDict".to_string())]);
        assert_eq!(r.risky_opcodes.get("REDUCE"), Some(&1));
    }

    #[test]
    fn protocol_zero_reduce() {
        let r = scan(SYSTEM_P0).unwrap();
        assert_eq!(r.protocol, 0);
        assert_eq!(r.globals, vec![("posix".to_string(), "system".to_string())]);
    }

    #[test]
    fn memo_get_feeds_stack_global() {
        // module and name stored in the memo, fetched back with BINGET before STACK_GLOBAL
        let p = b"\x80\x04\x8c\x02osq\x00\x8c\x06systemq\x010h\x00h\x01\x93)R.";
        let r = scan(p).unwrap();
        assert_eq!(r.globals, vec![("os".to_string(), "system".to_string())]);
    }

    #[test]
    fn computed_names_and_ext_codes_are_unresolved() {
        let computed = b"\x80\x04N\x8c\x06system\x93.";
        assert_eq!(scan(computed).unwrap().unresolved.len(), 1);
        let ext = b"\x80\x02\x82\x01)R.";
        assert!(scan(ext).unwrap().unresolved[0].contains("EXT1 extension code 1"));
        // A trust rule may not take them on faith: a cached EXT code resolves with no audit event.
        let err = scan(ext).unwrap().nameable_globals().unwrap_err();
        assert!(err.contains("EXT1 extension code 1") && err.contains("cannot be checked"), "{err}");
        assert!(scan(computed).unwrap().nameable_globals().is_err());
        assert_eq!(scan(ODICT_P4).unwrap().nameable_globals().unwrap().len(), 1);
    }

    #[test]
    fn appended_bytes_are_trailing() {
        let mut data = DICT_P2.to_vec();
        data.extend_from_slice(SYSTEM_P0);
        let r = scan(&data).unwrap();
        assert_eq!((r.end, r.trailing), (DICT_P2.len(), SYSTEM_P0.len()));
        assert!(r.globals.is_empty());
    }

    #[test]
    fn every_prefix_is_a_truncation_never_a_panic() {
        for input in [DICT_P2, ODICT_P4, SYSTEM_P0] {
            for cut in 0..input.len() {
                match scan(&input[..cut]) {
                    Err(ScanError::Truncated { offset, needed, .. }) => assert!(offset <= cut && needed >= 1),
                    other => panic!("prefix of {cut} bytes: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn garbage_is_named() {
        assert_eq!(scan(b"\xff\x00"), Err(ScanError::UnknownOpcode { offset: 0, byte: 0xff }));
        let err = scan(b"\x80\x02h\x05.").unwrap_err();
        assert!(err.to_string().contains("BINGET at offset 2"), "{err}");
        let err = scan(b"t.").unwrap_err();
        assert!(err.to_string().contains("no MARK"), "{err}");
        let err = scan(b"\x80\x09.").unwrap_err();
        assert!(err.to_string().contains("unsupported protocol 9"), "{err}");
    }

    #[test]
    fn streaming_asks_for_exactly_what_is_missing() {
        let mut scanner = Scanner::default();
        assert_eq!(scanner.feed(&ODICT_P4[..3]).unwrap(), Progress::NeedMore(Need::Bytes(8)));
        // After the FRAME header the scanner asks for the whole frame.
        assert_eq!(scanner.feed(&ODICT_P4[..11]).unwrap(), Progress::NeedMore(Need::Bytes(34)));
        assert!(matches!(scanner.feed(ODICT_P4).unwrap(), Progress::Done(_)));
        let mut text = Scanner::default();
        assert_eq!(text.feed(b"cposix\nsys").unwrap(), Progress::NeedMore(Need::Line));
    }
}
