//! The compiled manifest (`picklegate compile`): a binary index of a TOML manifest that installs
//! without parsing, bound to the TOML's own sha256 so that a stale or damaged index is refused.
//!
//! Layout (little-endian): a header (magic, format version, the TOML's sha256, the body's sha256,
//! the body's length), then the body: eight u32 counts, a JSON head (the TOML's path, `[[trust]]`
//! rules, loaders, callsite patterns), the `[[allow]]` records sorted by sha256 with a directory
//! of their leading bits, the records' manifest order, the exact callsites sorted by hash with a
//! directory, the globals lists, and one string table. Every lookup is a directory slot and a
//! short scan, whatever the size. The whole file is read into private memory and checked before
//! use: the rules that decide are the bytes that were verified, and a later rewrite of the file
//! changes nothing in a running process.

use crate::hash::{Digest, Hasher};
use crate::manifest::{AllowEntry, Manifest, ManifestError, TrustRule};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The first bytes of a compiled manifest: never the start of a UTF-8 TOML file.
pub const MAGIC: [u8; 8] = *b"\x89PGIDX\r\n";
/// Bumped on any change of the layout; an index of another version is refused, never guessed at.
pub const FORMAT_VERSION: u32 = 1;

const HEADER_LEN: usize = 8 + 4 + 4 + 32 + 32 + 8;
const COUNTS_LEN: usize = 8 * 4;
const ALLOW_RECORD: usize = 64;
const CALLSITE_RECORD: usize = 16;
const GLOBAL_REF: usize = 8;
/// A string length of `ABSENT` means "no such key" (`note`, `globals`).
const ABSENT: u32 = u32::MAX;
/// Directories have at most 2^24 slots (64 MiB of u32), whatever the entry count.
const MAX_BITS: u32 = 24;

/// What the index keeps besides the tables: small, so it is plain JSON.
#[derive(Serialize, Deserialize)]
struct Head {
    /// The TOML this was compiled from: a file name beside the index, or an absolute path.
    toml: String,
    trust: Vec<HeadTrust>,
    loaders: Vec<String>,
    callsite_patterns: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct HeadTrust {
    callsite: String,
    globals: Vec<String>,
    line: usize,
}

/// The `[[allow]]` entries of a compiled manifest, checked and held in private memory.
#[derive(Clone)]
pub struct CompiledAllow {
    tables: Vec<u8>,
    strings: String,
    allow_count: usize,
    allow_bits: u32,
    callsite_count: usize,
    callsite_bits: u32,
    allow_at: usize,
    allow_dir_at: usize,
    order_at: usize,
    callsite_at: usize,
    callsite_dir_at: usize,
    globals_at: usize,
    globals_count: usize,
}

impl std::fmt::Debug for CompiledAllow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CompiledAllow({} entries)", self.allow_count)
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// FNV-1a: a stable hash of a callsite, the same on every build (the key of the callsite table).
fn callsite_hash(callsite: &str) -> u64 {
    callsite.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn sha_key(sha: &[u8]) -> u64 {
    u64::from_be_bytes(sha[..8].try_into().expect("8 bytes"))
}

/// Directory bits for `count` keys: about one key per slot.
fn bits_for(count: usize) -> u32 {
    (usize::BITS - count.max(1).saturating_sub(1).leading_zeros()).min(MAX_BITS)
}

fn slot(key: u64, bits: u32) -> usize {
    if bits == 0 {
        0
    } else {
        (key >> (64 - bits)) as usize
    }
}

/// `dir[k]` = the first of the sorted `keys` whose slot is `k` or more; `2^bits + 1` entries.
fn directory(keys: impl Iterator<Item = u64>, count: usize, bits: u32, out: &mut Vec<u8>) {
    let slots = 1usize << bits;
    let mut next_slot = 0;
    for (i, key) in keys.enumerate() {
        let s = slot(key, bits);
        while next_slot <= s {
            out.extend_from_slice(&(i as u32).to_le_bytes());
            next_slot += 1;
        }
    }
    while next_slot <= slots {
        out.extend_from_slice(&(count as u32).to_le_bytes());
        next_slot += 1;
    }
}

fn invalid(file: &Path, reason: impl Into<String>) -> ManifestError {
    ManifestError::Compiled {
        file: file.display().to_string(),
        reason: reason.into(),
    }
}

impl CompiledAllow {
    fn dir_range(&self, at: usize, bits: u32, key: u64) -> Range<usize> {
        let s = slot(key, bits);
        u32_at(&self.tables, at + 4 * s) as usize..u32_at(&self.tables, at + 4 * (s + 1)) as usize
    }

    fn str_at(&self, at: usize) -> Option<&str> {
        let len = u32_at(&self.tables, at + 4);
        if len == ABSENT {
            return None;
        }
        let from = u32_at(&self.tables, at) as usize;
        Some(&self.strings[from..from + len as usize])
    }

    fn record(&self, position: usize) -> usize {
        self.allow_at + position * ALLOW_RECORD
    }

    /// Positions (in sha256 order) of the records of these bytes, in manifest order.
    pub fn positions_of(&self, sha256: &Digest) -> Range<usize> {
        let bucket = self.dir_range(self.allow_dir_at, self.allow_bits, sha_key(&sha256.0));
        let sha_of = |p: usize| &self.tables[self.record(p)..self.record(p) + 32];
        let (mut low, mut high) = (bucket.start, bucket.end);
        while low < high {
            let middle = low + (high - low) / 2;
            if sha_of(middle) < &sha256.0[..] {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        let end = low
            + (low..bucket.end)
                .take_while(|&p| sha_of(p) == &sha256.0[..])
                .count();
        low..end
    }

    /// The manifest-order index of the record at `position`.
    pub fn index_at(&self, position: usize) -> usize {
        u32_at(&self.tables, self.record(position) + 32) as usize
    }

    /// The record at `position`, as the TOML parse gives it.
    pub fn entry_at(&self, position: usize) -> AllowEntry {
        let at = self.record(position);
        let mut sha = [0u8; 32];
        sha.copy_from_slice(&self.tables[at..at + 32]);
        let globals = (u32_at(&self.tables, at + 60) != ABSENT).then(|| {
            let first = u32_at(&self.tables, at + 56) as usize;
            let count = u32_at(&self.tables, at + 60) as usize;
            (first..first + count)
                .map(|g| {
                    self.str_at(self.globals_at + g * GLOBAL_REF)
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        });
        AllowEntry {
            sha256: Digest(sha),
            line: u32_at(&self.tables, at + 36) as usize,
            callsite: self.str_at(at + 40).unwrap_or_default().to_string(),
            note: self.str_at(at + 48).map(str::to_string),
            globals,
        }
    }

    /// The position of the entry with manifest-order index `index`.
    pub fn position_of_index(&self, index: usize) -> Option<usize> {
        (index < self.allow_count).then(|| u32_at(&self.tables, self.order_at + 4 * index) as usize)
    }

    pub fn len(&self) -> usize {
        self.allow_count
    }

    pub fn is_empty(&self) -> bool {
        self.allow_count == 0
    }

    /// Whether an `[[allow]]` entry names exactly this callsite (no `*`).
    pub fn has_exact_callsite(&self, callsite: &str) -> bool {
        let hash = callsite_hash(callsite);
        self.dir_range(self.callsite_dir_at, self.callsite_bits, hash)
            .map(|p| self.callsite_at + p * CALLSITE_RECORD)
            .any(|at| u64_at(&self.tables, at) == hash && self.str_at(at + 8) == Some(callsite))
    }
}

/// Appends `text` to the string table (a repeated string is stored once) and returns its ref.
struct Strings {
    text: String,
    seen: std::collections::HashMap<String, u32>,
}

impl Strings {
    fn add(&mut self, s: &str, out: &mut Vec<u8>) -> Result<(), String> {
        let from = match self.seen.get(s) {
            Some(&from) => from,
            None => {
                let from = u32::try_from(self.text.len())
                    .ok()
                    .filter(|f| f.checked_add(s.len() as u32).is_some())
                    .ok_or("the manifest's strings exceed 4 GiB, the compiled format's limit")?;
                self.text.push_str(s);
                self.seen.insert(s.to_string(), from);
                from
            }
        };
        out.extend_from_slice(&from.to_le_bytes());
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        Ok(())
    }
}

fn absent(out: &mut Vec<u8>) {
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&ABSENT.to_le_bytes());
}

/// The compiled form of `manifest`, parsed from TOML bytes whose sha256 is `toml_sha256`;
/// `toml` is how the index names that file (a name beside the index, or an absolute path).
pub fn compile(manifest: &Manifest, toml_sha256: &Digest, toml: &str) -> Result<Vec<u8>, String> {
    let entries: Vec<AllowEntry> = manifest.allow_entries().map(|e| e.into_owned()).collect();
    let count = entries.len();
    if count >= ABSENT as usize {
        return Err("more than 4 billion [[allow]] entries".into());
    }
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by(|&a, &b| (entries[a].sha256, a).cmp(&(entries[b].sha256, b)));

    let mut strings = Strings {
        text: String::new(),
        seen: Default::default(),
    };
    let mut records = Vec::with_capacity(count * ALLOW_RECORD);
    let mut global_refs = Vec::new();
    let mut global_count = 0usize;
    for &i in &order {
        let e = &entries[i];
        records.extend_from_slice(&e.sha256.0);
        records.extend_from_slice(&(i as u32).to_le_bytes());
        let line = u32::try_from(e.line).map_err(|_| format!("line {} is too far", e.line))?;
        records.extend_from_slice(&line.to_le_bytes());
        strings.add(&e.callsite, &mut records)?;
        match &e.note {
            Some(note) => strings.add(note, &mut records)?,
            None => absent(&mut records),
        }
        match &e.globals {
            Some(patterns) => {
                records.extend_from_slice(&(global_count as u32).to_le_bytes());
                records.extend_from_slice(&(patterns.len() as u32).to_le_bytes());
                for p in patterns {
                    strings.add(p, &mut global_refs)?;
                }
                global_count += patterns.len();
            }
            None => absent(&mut records),
        }
    }
    let allow_bits = bits_for(count);
    let mut allow_dir = Vec::new();
    directory(
        order.iter().map(|&i| sha_key(&entries[i].sha256.0)),
        count,
        allow_bits,
        &mut allow_dir,
    );
    let mut by_index = vec![0u32; count];
    for (position, &i) in order.iter().enumerate() {
        by_index[i] = position as u32;
    }

    let mut exact: Vec<(u64, &str)> = entries
        .iter()
        .filter(|e| !e.callsite.contains('*'))
        .map(|e| (callsite_hash(&e.callsite), e.callsite.as_str()))
        .collect();
    exact.sort_unstable();
    exact.dedup();
    let callsite_bits = bits_for(exact.len());
    let mut callsites = Vec::with_capacity(exact.len() * CALLSITE_RECORD);
    for (hash, callsite) in &exact {
        callsites.extend_from_slice(&hash.to_le_bytes());
        strings.add(callsite, &mut callsites)?;
    }
    let mut callsite_dir = Vec::new();
    directory(
        exact.iter().map(|&(h, _)| h),
        exact.len(),
        callsite_bits,
        &mut callsite_dir,
    );

    let head = serde_json::to_vec(&Head {
        toml: toml.to_string(),
        trust: manifest
            .trust
            .iter()
            .map(|r| HeadTrust {
                callsite: r.callsite.clone(),
                globals: r.globals.clone(),
                line: r.line,
            })
            .collect(),
        loaders: manifest.loaders.clone(),
        callsite_patterns: manifest.callsite_patterns().to_vec(),
    })
    .map_err(|e| e.to_string())?;

    let mut body = Vec::new();
    for n in [
        count,
        allow_bits as usize,
        exact.len(),
        callsite_bits as usize,
        global_count,
        head.len(),
        strings.text.len(),
        0,
    ] {
        let n = u32::try_from(n).map_err(|_| "a table exceeds the compiled format's limit")?;
        body.extend_from_slice(&n.to_le_bytes());
    }
    body.extend_from_slice(&head);
    body.extend_from_slice(&records);
    body.extend_from_slice(&allow_dir);
    for position in by_index {
        body.extend_from_slice(&position.to_le_bytes());
    }
    body.extend_from_slice(&callsites);
    body.extend_from_slice(&callsite_dir);
    body.extend_from_slice(&global_refs);
    body.extend_from_slice(strings.text.as_bytes());

    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&toml_sha256.0);
    out.extend_from_slice(&Digest::of(&body).0);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// What `compile_file` wrote.
#[derive(Debug)]
pub struct CompileSummary {
    pub entries: usize,
    pub bytes: usize,
    pub toml_sha256: Digest,
}

/// `picklegate compile`: parses the TOML at `toml` (the exact bytes it hashes) and writes the
/// index to `out` (through a temporary file renamed into place, so no reader sees half of it).
pub fn compile_file(toml: &Path, out: &Path) -> Result<CompileSummary, ManifestError> {
    let file = toml.display().to_string();
    let unreadable = |reason: String| ManifestError::Unreadable {
        file: file.clone(),
        reason,
    };
    let bytes = std::fs::read(toml).map_err(|e| unreadable(e.to_string()))?;
    if bytes.starts_with(&MAGIC) {
        return Err(invalid(
            toml,
            "this is a compiled manifest already; compile the TOML it was made from",
        ));
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| unreadable(e.to_string()))?;
    let manifest = Manifest::parse(text, &file)?;
    let toml_sha256 = Digest::of(&bytes);
    let written = compile(&manifest, &toml_sha256, &toml_reference(toml, out)?)
        .map_err(|reason| invalid(out, reason))?;
    let out_error = |e: std::io::Error| invalid(out, format!("cannot write the index: {e}"));
    let name = out
        .file_name()
        .ok_or_else(|| invalid(out, "not a file name"))?;
    let temporary = out.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&temporary, &written).map_err(out_error)?;
    std::fs::rename(&temporary, out).map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        out_error(e)
    })?;
    Ok(CompileSummary {
        entries: manifest.allow_len(),
        bytes: written.len(),
        toml_sha256,
    })
}

/// How the index at `out` names the TOML at `toml`: its file name when both are in one
/// directory (the pair can be moved together), else its absolute path. The file's own name is
/// kept, not what a symlink resolves to: the index follows the name the operator edits.
fn toml_reference(toml: &Path, out: &Path) -> Result<String, ManifestError> {
    let unreadable = |e: std::io::Error| ManifestError::Unreadable {
        file: toml.display().to_string(),
        reason: e.to_string(),
    };
    let dir_of = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let toml_dir = std::fs::canonicalize(dir_of(toml)).map_err(unreadable)?;
    let name = toml
        .file_name()
        .ok_or_else(|| invalid(toml, "not a file name"))?;
    let same_dir = std::fs::canonicalize(dir_of(out)).is_ok_and(|d| d == toml_dir);
    let reference = if same_dir {
        PathBuf::from(name)
    } else {
        toml_dir.join(name)
    };
    reference
        .to_str()
        .map(str::to_string)
        .ok_or_else(|| invalid(toml, "the path is not UTF-8"))
}

/// Reads the manifest at `path` as an install does and, when it is a compiled index, also parses
/// the TOML it was compiled from and checks that the index holds exactly its rules: an install
/// checks that the index is intact and its TOML unchanged, not that its entries are that TOML's
/// (that would be the parse the index saves). `picklegate verify` runs this.
pub fn load_and_audit(path: &Path) -> Result<Manifest, ManifestError> {
    let manifest = Manifest::load(path)?;
    if !manifest.is_compiled() {
        return Ok(manifest);
    }
    let toml = Manifest::load(Path::new(&manifest.source))?;
    let same = manifest.allow_entries().eq(toml.allow_entries())
        && manifest.trust == toml.trust
        && manifest.loaders == toml.loaders
        && manifest.callsite_patterns() == toml.callsite_patterns();
    if !same {
        return Err(invalid(path, format!(
            "its rules are not those of {}, although it names that file and its sha256: it was not written by `picklegate compile`; compile again and protect the index as you protect the TOML",
            manifest.source
        )));
    }
    Ok(manifest)
}

/// The parts of a manifest a compiled index holds.
pub struct Opened {
    pub toml: PathBuf,
    pub allow: CompiledAllow,
    pub trust: Vec<TrustRule>,
    pub loaders: Vec<String>,
    pub callsite_patterns: Vec<String>,
}

/// The most `open` reserves on an index's word before reading its bytes.
const PRESIZE_LIMIT: usize = 1 << 24;

/// Reads the index at `path` whose first 8 bytes (`MAGIC`) were already read from `file`, checks
/// it whole (format version, length, body sha256, every table bound) and checks that the TOML it
/// was compiled from still has the sha256 it had then. Any failure is an error naming the file.
pub fn open(path: &Path, mut file: impl Read) -> Result<Opened, ManifestError> {
    let mut header = [0u8; HEADER_LEN - 8];
    let truncated = |what: &str| {
        invalid(
            path,
            format!("the compiled manifest is truncated ({what}); run `picklegate compile` again"),
        )
    };
    file.read_exact(&mut header)
        .map_err(|_| truncated("no complete header"))?;
    let version = u32_at(&header, 0);
    if version != FORMAT_VERSION {
        return Err(invalid(path, format!(
            "compiled manifest format {version}; this picklegate reads format {FORMAT_VERSION}: run `picklegate compile` again"
        )));
    }
    let toml_sha256 = Digest(header[8..40].try_into().expect("32 bytes"));
    let body_sha256 = Digest(header[40..72].try_into().expect("32 bytes"));
    let body_len = usize::try_from(u64_at(&header, 72)).map_err(|_| truncated("length"))?;
    let mut counts = [0u8; COUNTS_LEN];
    file.read_exact(&mut counts)
        .map_err(|_| truncated("no counts"))?;
    let count = |i: usize| u32_at(&counts, 4 * i) as usize;
    let (allow_count, allow_bits, callsite_count, callsite_bits) =
        (count(0), count(1) as u32, count(2), count(3) as u32);
    let (globals_count, head_len, strings_len) = (count(4), count(5), count(6));
    if allow_bits > MAX_BITS || callsite_bits > MAX_BITS {
        return Err(invalid(path, "corrupt compiled manifest (directory size)"));
    }
    let tables_len = [
        head_len,
        allow_count * ALLOW_RECORD,
        4 * ((1usize << allow_bits) + 1),
        4 * allow_count,
        callsite_count * CALLSITE_RECORD,
        4 * ((1usize << callsite_bits) + 1),
        globals_count * GLOBAL_REF,
    ]
    .iter()
    .sum::<usize>();
    if COUNTS_LEN + tables_len + strings_len != body_len {
        return Err(invalid(
            path,
            "corrupt compiled manifest (its tables do not add up to its length)",
        ));
    }
    // Read as the bytes come, reserving at most PRESIZE_LIMIT from the counts: an index that claims
    // huge tables in a short file is refused as truncated, not met with an allocation that may abort.
    let mut tables = Vec::with_capacity(tables_len.min(PRESIZE_LIMIT));
    file.by_ref()
        .take(tables_len as u64)
        .read_to_end(&mut tables)
        .map_err(|e| invalid(path, e.to_string()))?;
    if tables.len() < tables_len {
        return Err(truncated("tables cut short"));
    }
    let mut strings = Vec::with_capacity(strings_len.min(PRESIZE_LIMIT));
    file.by_ref()
        .take(strings_len as u64 + 1)
        .read_to_end(&mut strings)
        .map_err(|e| invalid(path, e.to_string()))?;
    if strings.len() < strings_len {
        return Err(truncated("strings cut short"));
    }
    if strings.len() > strings_len {
        return Err(invalid(
            path,
            "corrupt compiled manifest (bytes after its end)",
        ));
    }
    let mut hasher = Hasher::default();
    hasher.update(&counts);
    hasher.update(&tables);
    hasher.update(&strings);
    if hasher.finish() != body_sha256 {
        return Err(invalid(path, "corrupt compiled manifest (its sha256 does not match its contents); run `picklegate compile` again"));
    }
    let strings = String::from_utf8(strings)
        .map_err(|_| invalid(path, "corrupt compiled manifest (strings)"))?;
    let head: Head = serde_json::from_slice(&tables[..head_len])
        .map_err(|e| invalid(path, format!("corrupt compiled manifest (head: {e})")))?;

    let allow_at = head_len;
    let allow_dir_at = allow_at + allow_count * ALLOW_RECORD;
    let order_at = allow_dir_at + 4 * ((1usize << allow_bits) + 1);
    let callsite_at = order_at + 4 * allow_count;
    let callsite_dir_at = callsite_at + callsite_count * CALLSITE_RECORD;
    let globals_at = callsite_dir_at + 4 * ((1usize << callsite_bits) + 1);
    let allow = CompiledAllow {
        tables,
        strings,
        allow_count,
        allow_bits,
        callsite_count,
        callsite_bits,
        allow_at,
        allow_dir_at,
        order_at,
        callsite_at,
        callsite_dir_at,
        globals_at,
        globals_count,
    };
    allow
        .check_bounds()
        .map_err(|what| invalid(path, format!("corrupt compiled manifest ({what})")))?;

    let toml = match path.parent() {
        Some(dir) => dir.join(&head.toml),
        None => PathBuf::from(&head.toml),
    };
    let now = std::fs::File::open(&toml)
        .and_then(Digest::of_reader)
        .map_err(|e| invalid(path, format!(
            "cannot read {}, the manifest it was compiled from ({e}); a compiled manifest is used only beside the TOML it was compiled from",
            toml.display()
        )))?;
    if now != toml_sha256 {
        return Err(invalid(path, format!(
            "{} has changed since it was compiled (sha256 {toml_sha256} then, {now} now); run `picklegate compile {}` again",
            toml.display(),
            toml.display()
        )));
    }
    Ok(Opened {
        toml,
        allow,
        trust: head
            .trust
            .into_iter()
            .map(|t| TrustRule {
                callsite: t.callsite,
                globals: t.globals,
                line: t.line,
            })
            .collect(),
        loaders: head.loaders,
        callsite_patterns: head.callsite_patterns,
    })
}

impl CompiledAllow {
    /// Every directory, order entry and string reference points inside its table, so no lookup
    /// can read out of bounds.
    fn check_bounds(&self) -> Result<(), &'static str> {
        let string_ok = |at: usize| {
            let len = u32_at(&self.tables, at + 4);
            let from = u32_at(&self.tables, at) as usize;
            len == ABSENT
                || self
                    .strings
                    .get(from..from.saturating_add(len as usize))
                    .is_some()
        };
        let dir_ok = |at: usize, bits: u32, count: usize| {
            let mut last = 0;
            (0..=(1usize << bits)).all(|s| {
                let v = u32_at(&self.tables, at + 4 * s) as usize;
                let ok = v >= last && v <= count;
                last = v;
                ok
            }) && u32_at(&self.tables, at + 4 * (1usize << bits)) as usize == count
        };
        if !dir_ok(self.allow_dir_at, self.allow_bits, self.allow_count)
            || !dir_ok(
                self.callsite_dir_at,
                self.callsite_bits,
                self.callsite_count,
            )
        {
            return Err("directory");
        }
        for p in 0..self.allow_count {
            let at = self.record(p);
            let globals_ok = u32_at(&self.tables, at + 60) == ABSENT
                || (u32_at(&self.tables, at + 56) as usize)
                    .checked_add(u32_at(&self.tables, at + 60) as usize)
                    .is_some_and(|end| end <= self.globals_count);
            if !string_ok(at + 40)
                || u32_at(&self.tables, at + 44) == ABSENT
                || !string_ok(at + 48)
                || !globals_ok
                || self.index_at(p) >= self.allow_count
                || self.position_of_index(self.index_at(p)) != Some(p)
            {
                return Err("allow record");
            }
        }
        let callsites_ok =
            (0..self.callsite_count).all(|c| string_ok(self.callsite_at + c * CALLSITE_RECORD + 8));
        let globals_ok = (0..self.globals_count).all(|g| {
            let at = self.globals_at + g * GLOBAL_REF;
            string_ok(at) && u32_at(&self.tables, at + 4) != ABSENT
        });
        if !callsites_ok || !globals_ok {
            return Err("string reference");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own for each test (tests run on several threads).
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("picklegate-compiled-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sha(i: u32) -> Digest {
        Digest::of(&i.to_le_bytes())
    }

    /// Every shape an entry can have: notes or not, no `globals` key, `globals = []`, patterns,
    /// one sha256 at several callsites, `*` callsites, trust rules and loaders.
    fn manifest_text(n: u32) -> String {
        let mut text = String::from("version = 1\nloaders = [\"myorg.io\"]\n");
        for i in 0..n {
            text.push_str(&format!(
                "[[allow]]\nsha256 = \"{}\"\ncallsite = \"app.m{}:load_{i}\"\n",
                sha(i % (n - 3)),
                i % 7
            ));
            match i % 4 {
                0 => text.push_str(&format!("note = \"entry {i} é\"\n")),
                1 => text.push_str("globals = []\n"),
                2 => text.push_str("globals = [\"collections.OrderedDict\", \"numpy.*\"]\n"),
                _ => {}
            }
            if i == 5 {
                text.push_str(&format!(
                    "[[allow]]\nsha256 = \"{}\"\ncallsite = \"app.jobs:*\"\n[[trust]]\ncallsite = \"multiprocessing.*\"\nglobals = [\"app.tasks.*\"]\n",
                    sha(1)
                ));
            }
        }
        text
    }

    fn compiled_pair(name: &str, n: u32) -> (PathBuf, PathBuf) {
        let dir = scratch(name);
        let toml = dir.join("pickles.toml");
        std::fs::write(&toml, manifest_text(n)).unwrap();
        let idx = dir.join("pickles.toml.idx");
        let summary = compile_file(&toml, &idx).unwrap();
        assert_eq!(summary.entries, n as usize + 1);
        (toml, idx)
    }

    fn refusal(idx: &Path) -> String {
        let err = Manifest::load(idx).unwrap_err();
        assert!(matches!(err, ManifestError::Compiled { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.starts_with(&idx.display().to_string()), "{message}");
        message
    }

    #[test]
    fn compiled_manifest_answers_as_the_toml_does() {
        for n in [6, 9, 300, 5000] {
            let (toml, idx) = compiled_pair(&format!("same-{n}"), n);
            let parsed = Manifest::load(&toml).unwrap();
            let compiled = Manifest::load(&idx).unwrap();
            assert_eq!(compiled.source, toml.display().to_string());
            assert!(compiled.allow_entries().eq(parsed.allow_entries()));
            assert_eq!(
                (
                    &compiled.trust,
                    &compiled.loaders,
                    compiled.callsite_patterns()
                ),
                (&parsed.trust, &parsed.loaders, parsed.callsite_patterns())
            );
            for i in 0..n + 5 {
                let found = |m: &Manifest| -> Vec<(usize, AllowEntry)> {
                    m.entries_for(&sha(i))
                        .map(|(i, e)| (i, e.into_owned()))
                        .collect()
                };
                assert_eq!(found(&compiled), found(&parsed), "sha {i}");
                for callsite in [
                    format!("app.m{}:load_{i}", i % 7),
                    format!("app.m{}:load_{i}x", i % 7),
                    "app.jobs:nightly".to_string(),
                    "multiprocessing.pool:worker".to_string(),
                ] {
                    assert_eq!(
                        compiled.admits_anything_at(&callsite),
                        parsed.admits_anything_at(&callsite),
                        "{callsite}"
                    );
                }
            }
            assert!(compiled.admits_anything_at("app.m1:load_1"));
            assert!(!compiled.admits_anything_at("app.m1:load_2"));
            assert_eq!(compiled.allow_entry(n as usize + 1), None);
        }
    }

    #[test]
    fn an_edited_toml_makes_the_index_refused() {
        let (toml, idx) = compiled_pair("stale", 40);
        std::fs::write(&toml, manifest_text(40).replace("entry 4 ", "entry four ")).unwrap();
        let message = refusal(&idx);
        assert!(
            message.contains("has changed since it was compiled"),
            "{message}"
        );
        assert!(message.contains("picklegate compile"), "{message}");
        std::fs::remove_file(&toml).unwrap();
        let message = refusal(&idx);
        assert!(message.contains("cannot read"), "{message}");
        assert!(message.contains("pickles.toml"), "{message}");
    }

    #[test]
    fn damaged_indexes_are_refused() {
        let (_, idx) = compiled_pair("damaged", 40);
        let good = std::fs::read(&idx).unwrap();
        for cut in [
            10,
            HEADER_LEN + 3,
            HEADER_LEN + COUNTS_LEN + 5,
            good.len() - 1,
        ] {
            std::fs::write(&idx, &good[..cut]).unwrap();
            let message = refusal(&idx);
            assert!(message.contains("truncated"), "cut at {cut}: {message}");
        }
        let mut longer = good.clone();
        longer.push(b'\n');
        std::fs::write(&idx, &longer).unwrap();
        assert!(refusal(&idx).contains("bytes after its end"));
        for at in [HEADER_LEN + 1, HEADER_LEN + COUNTS_LEN + 10, good.len() - 2] {
            let mut flipped = good.clone();
            flipped[at] ^= 0x20;
            std::fs::write(&idx, &flipped).unwrap();
            let message = refusal(&idx);
            assert!(message.contains("corrupt"), "flip at {at}: {message}");
        }
        let mut other_version = good.clone();
        other_version[8] = 2;
        std::fs::write(&idx, &other_version).unwrap();
        assert!(refusal(&idx).contains("format 2; this picklegate reads format 1"));
        std::fs::write(&idx, &good).unwrap();
        assert!(Manifest::load(&idx).is_ok());
    }

    #[test]
    fn audit_finds_an_index_whose_rules_are_not_its_tomls() {
        let (toml, idx) = compiled_pair("audit", 40);
        assert!(load_and_audit(&idx).is_ok());
        assert!(load_and_audit(&toml).is_ok());
        // An index written from other rules, then given the real TOML's sha256 and name: every
        // install check passes (it is intact, its TOML unchanged); only the audit sees it.
        let text = manifest_text(40).replace("app.m3:load_3\"", "app.m3:*\"");
        let other = Manifest::parse(&text, "other.toml").unwrap();
        let toml_sha = Digest::of(&std::fs::read(&toml).unwrap());
        std::fs::write(&idx, compile(&other, &toml_sha, "pickles.toml").unwrap()).unwrap();
        assert!(Manifest::load(&idx)
            .unwrap()
            .admits_anything_at("app.m3:anything"));
        let err = load_and_audit(&idx).unwrap_err().to_string();
        assert!(err.contains("its rules are not those of"), "{err}");
    }

    #[test]
    fn index_elsewhere_names_the_toml_by_absolute_path() {
        let (toml, _) = compiled_pair("elsewhere", 10);
        let other = scratch("elsewhere-out");
        let idx = other.join("m.idx");
        compile_file(&toml, &idx).unwrap();
        let m = Manifest::load(&idx).unwrap();
        assert_eq!(Path::new(&m.source), std::fs::canonicalize(&toml).unwrap());
        // Through a symlink, the index follows the link's name (what the operator edits and
        // repoints), not the file it points to today.
        let link = other.join("current.toml");
        std::os::unix::fs::symlink(&toml, &link).unwrap();
        compile_file(&link, &idx).unwrap();
        let source = Manifest::load(&idx).unwrap().source;
        assert_eq!(Path::new(&source), idx.with_file_name("current.toml"));
        let replacement = other.join("next.toml");
        std::fs::write(&replacement, manifest_text(12)).unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&replacement, &link).unwrap();
        assert!(refusal(&idx).contains("has changed since it was compiled"));
        let err = compile_file(&idx, &other.join("again.idx")).unwrap_err();
        assert!(
            err.to_string().contains("compiled manifest already"),
            "{err}"
        );
    }

    #[test]
    fn directories_have_about_one_key_per_slot() {
        assert_eq!(
            (bits_for(0), bits_for(1), bits_for(2), bits_for(3)),
            (0, 0, 1, 2)
        );
        assert_eq!(bits_for(1_000_000), 20);
        assert_eq!(bits_for(usize::MAX), MAX_BITS);
        let mut dir = Vec::new();
        directory([0u64, 1 << 63, u64::MAX].into_iter(), 3, 2, &mut dir);
        let slots: Vec<u32> = dir
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(slots, vec![0, 1, 1, 2, 3]);
    }
}
