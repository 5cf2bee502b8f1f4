//! The manifest: the frozen list of pickles a deployment may load (`[[allow]]`), the transports
//! it trusts by globals (`[[trust]]`), and extra loader modules, parsed from TOML version 1.

use crate::callsite::{callsite_matches, global_matches};
use crate::compiled::{self, CompiledAllow};
use crate::hash::Digest;
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use toml::Spanned;

pub const SUPPORTED_VERSION: i64 = 1;

/// Manifests bigger than this are parsed piece by piece.
const PIECE_BYTES: usize = 1 << 20;
/// At most this many threads read the pieces of a big manifest.
const MAX_THREADS: usize = 4;

/// One reviewed pickle, allowed at the callsites its pattern matches.
#[derive(Debug, Clone, PartialEq)]
pub struct AllowEntry {
    pub sha256: Digest,
    pub callsite: String,
    pub note: Option<String>,
    /// `None` when the entry has no `globals` key: the reviewed bytes may resolve any global.
    /// `Some(patterns)`: only those; `globals = []` admits no global at all.
    pub globals: Option<Vec<String>>,
    pub line: usize,
}

impl AllowEntry {
    pub fn permits_global(&self, module: &str, name: &str) -> bool {
        match &self.globals {
            None => true,
            Some(patterns) => patterns.iter().any(|p| global_matches(p, module, name)),
        }
    }
}

/// A transport whose pickles change on every call: trusted by callsite, bounded by globals.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustRule {
    pub callsite: String,
    pub globals: Vec<String>,
    pub line: usize,
}

impl TrustRule {
    pub fn permits_global(&self, module: &str, name: &str) -> bool {
        self.globals.iter().any(|p| global_matches(p, module, name))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Manifest {
    /// The TOML file the rules come from (also for a compiled manifest: the TOML it was
    /// compiled from and verified against), named in messages with each rule's line.
    pub source: String,
    pub trust: Vec<TrustRule>,
    pub loaders: Vec<String>,
    allow: AllowTable,
    /// The distinct `[[allow]]` callsites with a `*`.
    callsite_patterns: Vec<String>,
}

/// The `[[allow]]` entries: parsed from TOML, or a compiled index (`crate::compiled`), which is
/// looked up where it lies instead of being turned into a million values at install.
#[derive(Debug, Clone)]
enum AllowTable {
    Parsed(ParsedAllow),
    Compiled(Arc<CompiledAllow>),
}

impl Default for AllowTable {
    fn default() -> Self {
        AllowTable::Parsed(ParsedAllow::default())
    }
}

#[derive(Debug, Clone, Default)]
struct ParsedAllow {
    entries: Vec<AllowEntry>,
    /// The first `[[allow]]` entry of each sha256; `next_same[i]` is the next entry with entry
    /// `i`'s sha256, or `NO_ENTRY`. No allocation per entry, so a million entries index fast.
    by_sha256: HashMap<Digest, usize, BuildDigestHasher>,
    next_same: Vec<usize>,
    /// The `[[allow]]` callsites without a `*`.
    exact_callsites: HashSet<String>,
}

/// The `[[allow]]` entries of one sha256, in manifest order, with their manifest-order index.
pub struct EntriesFor<'a> {
    manifest: &'a Manifest,
    next: Next,
}

enum Next {
    Parsed(usize),
    Compiled(Range<usize>),
}

impl<'a> Iterator for EntriesFor<'a> {
    type Item = (usize, Cow<'a, AllowEntry>);

    fn next(&mut self) -> Option<Self::Item> {
        match (&mut self.next, &self.manifest.allow) {
            (Next::Parsed(i), AllowTable::Parsed(p)) if *i != NO_ENTRY => {
                let here = *i;
                *i = p.next_same[here];
                Some((here, Cow::Borrowed(&p.entries[here])))
            }
            (Next::Compiled(positions), AllowTable::Compiled(c)) => positions
                .next()
                .map(|at| (c.index_at(at), Cow::Owned(c.entry_at(at)))),
            _ => None,
        }
    }
}

const NO_ENTRY: usize = usize::MAX;

/// Digests are uniformly distributed already: their first 8 bytes are the table's hash. (The
/// keys are the operator's manifest; a looked-up digest only walks the entries of its own value.)
#[derive(Debug, Clone, Default)]
struct BuildDigestHasher;

#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::BuildHasher for BuildDigestHasher {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

impl std::hash::Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A manifest that cannot be used. Every variant names the file; parse errors name line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    Unreadable {
        file: String,
        reason: String,
    },
    Invalid {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A compiled manifest that is stale, damaged, truncated or of another format version.
    Compiled {
        file: String,
        reason: String,
    },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::Unreadable { file, reason } => {
                write!(f, "{file}: cannot read the pickle manifest: {reason}")
            }
            ManifestError::Invalid {
                file,
                line,
                column,
                message,
            } => {
                write!(f, "{file}:{line}:{column}: {message}")
            }
            ManifestError::Compiled { file, reason } => {
                write!(f, "{file}: refused the compiled manifest: {reason}")
            }
        }
    }
}

impl std::error::Error for ManifestError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    version: Option<Spanned<i64>>,
    #[serde(default)]
    allow: Vec<Spanned<RawAllow>>,
    #[serde(default)]
    trust: Vec<Spanned<RawTrust>>,
    #[serde(default)]
    loaders: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    sha256: Spanned<String>,
    callsite: Spanned<String>,
    note: Option<String>,
    globals: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    callsite: Spanned<String>,
    globals: Spanned<Vec<Spanned<String>>>,
}

/// Counts lines forward from the last offset asked about: entries are located in text order, so
/// a million of them cost one pass over the text (not a rescan from the top for each).
#[derive(Default)]
struct LineCursor {
    at: std::cell::Cell<(usize, usize)>, // (byte offset, 0-based line of that offset)
}

impl LineCursor {
    /// 1-based line of a byte offset of `text`.
    fn line(&self, text: &str, offset: usize) -> usize {
        let (from, line) = match self.at.get() {
            (at, line) if at <= offset => (at, line),
            _ => (0, 0),
        };
        let line = line
            + text.as_bytes()[from..offset]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
        self.at.set((offset, line));
        line + 1
    }
}

struct Located<'a> {
    file: &'a str,
    text: &'a str,
    lines: &'a LineCursor,
    /// Where the TOML that produced the spans starts in `text` (a piece of a big manifest).
    base: usize,
}

impl Located<'_> {
    /// Byte offset to 1-based (line, column), counting columns in characters.
    fn line_column(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.lines.line(self.text, offset);
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        (line, self.text[line_start..offset].chars().count() + 1)
    }

    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ManifestError {
        let (line, column) = self.line_column(self.base + span.start);
        ManifestError::Invalid {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    fn line_of(&self, span: &Range<usize>) -> usize {
        self.lines
            .line(self.text, (self.base + span.start).min(self.text.len()))
    }

    fn allow_entry(&self, entry: &Spanned<RawAllow>) -> Result<AllowEntry, ManifestError> {
        let line = self.line_of(&entry.span());
        let entry = entry.get_ref();
        let sha256 = Digest::parse(entry.sha256.get_ref().trim()).map_err(|e| {
            self.error(
                entry.sha256.span(),
                format!("bad sha256 {:?}: {e}", entry.sha256.get_ref()),
            )
        })?;
        Ok(AllowEntry {
            sha256,
            callsite: self.pattern(&entry.callsite, "callsite")?,
            note: entry.note.clone(),
            globals: entry
                .globals
                .as_ref()
                .map(|g| self.global_patterns(g))
                .transpose()?,
            line,
        })
    }

    fn trust_rule(&self, rule: &Spanned<RawTrust>) -> Result<TrustRule, ManifestError> {
        let line = self.line_of(&rule.span());
        let rule = rule.get_ref();
        if rule.globals.get_ref().is_empty() {
            return Err(self.error(
                rule.globals.span(),
                "a [[trust]] rule needs at least one global pattern; it bounds what the transport may resolve",
            ));
        }
        Ok(TrustRule {
            callsite: self.pattern(&rule.callsite, "callsite")?,
            globals: self.global_patterns(rule.globals.get_ref())?,
            line,
        })
    }

    fn pattern(&self, value: &Spanned<String>, what: &str) -> Result<String, ManifestError> {
        let text = value.get_ref().trim();
        if text.is_empty() {
            return Err(self.error(value.span(), format!("{what} must not be empty")));
        }
        if text.chars().any(char::is_whitespace) {
            return Err(self.error(
                value.span(),
                format!("{what} {text:?} contains whitespace; expected `module:qualname` or `module.name`, with `*` globs"),
            ));
        }
        Ok(text.to_string())
    }

    fn global_patterns(&self, values: &[Spanned<String>]) -> Result<Vec<String>, ManifestError> {
        values
            .iter()
            .map(|g| self.pattern(g, "a global pattern"))
            .collect()
    }
}

impl Manifest {
    /// Reads and validates the manifest at `path`: TOML, or a compiled manifest (told by its
    /// first bytes), which is used only while the TOML it was compiled from is unchanged.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let file = path.display().to_string();
        let unreadable = |e: std::io::Error| ManifestError::Unreadable {
            file: file.clone(),
            reason: e.to_string(),
        };
        let mut reader = std::fs::File::open(path).map_err(unreadable)?;
        let mut bytes = Vec::new();
        (&mut reader)
            .take(compiled::MAGIC.len() as u64)
            .read_to_end(&mut bytes)
            .map_err(unreadable)?;
        if bytes == compiled::MAGIC {
            let opened = compiled::open(path, reader)?;
            return Ok(Manifest {
                source: opened.toml.display().to_string(),
                trust: opened.trust,
                loaders: opened.loaders,
                allow: AllowTable::Compiled(Arc::new(opened.allow)),
                callsite_patterns: opened.callsite_patterns,
            });
        }
        reader.read_to_end(&mut bytes).map_err(unreadable)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            unreadable(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "stream did not contain valid UTF-8",
            ))
        })?;
        Self::parse(&text, &file)
    }

    /// Parses manifest text; `file` is only used to name the source in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ManifestError> {
        let lines = LineCursor::default();
        match Self::parse_in_pieces(text, file, &lines) {
            Some(manifest) => Ok(manifest),
            None => Self::parse_whole(text, file, &lines),
        }
    }

    /// The one parse of the whole document: the reference behaviour, and every error message.
    fn parse_whole(text: &str, file: &str, lines: &LineCursor) -> Result<Self, ManifestError> {
        let at = Located {
            file,
            text,
            lines,
            base: 0,
        };
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            at.error(span, e.message().trim().to_string())
        })?;

        match &raw.version {
            None => {
                return Err(at.error(0..0, format!(
                    "missing `version = {SUPPORTED_VERSION}` at the top of the manifest"
                )))
            }
            Some(v) if *v.get_ref() != SUPPORTED_VERSION => {
                return Err(at.error(v.span(), format!(
                    "unknown manifest version {}; this picklegate reads version {SUPPORTED_VERSION}",
                    v.get_ref()
                )))
            }
            Some(_) => {}
        }

        let mut manifest = Manifest {
            source: file.to_string(),
            ..Default::default()
        };
        let allow = raw
            .allow
            .iter()
            .map(|entry| at.allow_entry(entry))
            .collect::<Result<_, _>>()?;
        manifest.trust = raw
            .trust
            .iter()
            .map(|rule| at.trust_rule(rule))
            .collect::<Result<_, _>>()?;
        for loader in &raw.loaders {
            manifest
                .loaders
                .push(at.pattern(loader, "a loader module")?);
        }
        manifest.index(allow);
        Ok(manifest)
    }

    /// A big manifest, parsed as pieces of about `PIECE_BYTES` cut before lines that are exactly
    /// `[[allow]]` or `[[trust]]`. The head (before the first cut) goes through the toml crate's
    /// serde path; each piece goes through toml_parser's lexer and event parser straight into
    /// entries (`PieceReader`), with no document tree: the tree of a million entries costs
    /// gigabytes and most of the time. The result is the whole parse's (spans are shifted back
    /// into the whole text). `None` sends the text to `parse_whole`: any error (so messages are
    /// the whole parse's), anything but the plain shape of the manifest, multi-line strings (a
    /// cut could fall inside one), or a head that defines `allow`/`trust` itself.
    fn parse_in_pieces(text: &str, file: &str, lines: &LineCursor) -> Option<Self> {
        if text.len() <= PIECE_BYTES || text.contains("\"\"\"") || text.contains("'''") {
            return None;
        }
        // (byte offset, 0-based line) of each cut.
        let mut cuts: Vec<(usize, usize)> = Vec::new();
        let mut start = 0;
        for (number, line) in text.split_inclusive('\n').enumerate() {
            let here = start;
            start += line.len();
            if !line.starts_with('[') || cuts.last().is_some_and(|&(c, _)| here < c + PIECE_BYTES) {
                continue;
            }
            let line = line.trim_end_matches('\n').trim_end_matches('\r');
            if line == "[[allow]]" || line == "[[trust]]" {
                cuts.push((here, number));
            }
        }
        let (head_end, _) = *cuts.first()?;
        cuts.push((text.len(), 0));
        let head: RawManifest = toml::from_str(&text[..head_end]).ok()?;
        if head.version.as_ref().map(|v| *v.get_ref()) != Some(SUPPORTED_VERSION)
            || !head.allow.is_empty()
            || !head.trust.is_empty()
        {
            return None;
        }
        // The pieces are independent: contiguous runs of them are read on the available cores.
        let pieces: Vec<&[(usize, usize)]> = cuts.windows(2).collect();
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_THREADS);
        let run = pieces.len().div_ceil(workers);
        let read_run = |run: &[&[(usize, usize)]]| -> Option<Rules> {
            let mut part = Rules::default();
            for piece in run {
                let ((from, line), (to, _)) = (piece[0], piece[1]);
                let lines = LineCursor {
                    at: std::cell::Cell::new((from, line)),
                };
                let at = Located {
                    file,
                    text,
                    lines: &lines,
                    base: from,
                };
                PieceReader::read(&text[from..to], &at, &mut part)?;
            }
            Some(part)
        };
        let parts: Vec<Option<Rules>> = std::thread::scope(|scope| {
            let handles: Vec<_> = pieces
                .chunks(run)
                .map(|r| scope.spawn(move || read_run(r)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().ok().flatten())
                .collect()
        });
        let mut manifest = Manifest {
            source: file.to_string(),
            ..Default::default()
        };
        let mut allow = Vec::new();
        for part in parts {
            let part = part?;
            allow.extend(part.allow);
            manifest.trust.extend(part.trust);
        }
        let at = Located {
            file,
            text,
            lines,
            base: 0,
        };
        for loader in &head.loaders {
            manifest
                .loaders
                .push(at.pattern(loader, "a loader module").ok()?);
        }
        manifest.index(allow);
        Some(manifest)
    }

    /// A manifest with no rules: `enforce` with it denies every load.
    pub fn empty(source: &str) -> Self {
        Manifest {
            source: source.to_string(),
            ..Default::default()
        }
    }

    fn index(&mut self, entries: Vec<AllowEntry>) {
        let n = entries.len();
        let mut parsed = ParsedAllow {
            by_sha256: HashMap::with_capacity_and_hasher(n, Default::default()),
            next_same: vec![NO_ENTRY; n],
            ..Default::default()
        };
        for i in (0..n).rev() {
            if let Some(later) = parsed.by_sha256.insert(entries[i].sha256, i) {
                parsed.next_same[i] = later;
            }
        }
        self.callsite_patterns.clear();
        for entry in &entries {
            if !entry.callsite.contains('*') {
                if !parsed.exact_callsites.contains(&entry.callsite) {
                    parsed.exact_callsites.insert(entry.callsite.clone());
                }
            } else if !self.callsite_patterns.contains(&entry.callsite) {
                self.callsite_patterns.push(entry.callsite.clone());
            }
        }
        parsed.entries = entries;
        self.allow = AllowTable::Parsed(parsed);
    }

    /// Whether any bytes at all could be allowed at `callsite`: an `[[allow]]` entry or a
    /// `[[trust]]` rule names it. When none does, a load there is refused without reading it.
    pub fn admits_anything_at(&self, callsite: &str) -> bool {
        let exact = match &self.allow {
            AllowTable::Parsed(p) => p.exact_callsites.contains(callsite),
            AllowTable::Compiled(c) => c.has_exact_callsite(callsite),
        };
        exact
            || self
                .callsite_patterns
                .iter()
                .any(|p| callsite_matches(p, callsite))
            || self.trust_for(callsite).is_some()
    }

    /// The `[[allow]]` entries for these bytes, in manifest order, with their index.
    pub fn entries_for(&self, sha256: &Digest) -> EntriesFor<'_> {
        let next = match &self.allow {
            AllowTable::Parsed(p) => {
                Next::Parsed(p.by_sha256.get(sha256).copied().unwrap_or(NO_ENTRY))
            }
            AllowTable::Compiled(c) => Next::Compiled(c.positions_of(sha256)),
        };
        EntriesFor {
            manifest: self,
            next,
        }
    }

    /// The `[[allow]]` entry with this manifest-order index.
    pub fn allow_entry(&self, index: usize) -> Option<Cow<'_, AllowEntry>> {
        match &self.allow {
            AllowTable::Parsed(p) => p.entries.get(index).map(Cow::Borrowed),
            AllowTable::Compiled(c) => c
                .position_of_index(index)
                .map(|at| Cow::Owned(c.entry_at(at))),
        }
    }

    /// Every `[[allow]]` entry, in manifest order.
    pub fn allow_entries(&self) -> impl Iterator<Item = Cow<'_, AllowEntry>> {
        (0..self.allow_len()).filter_map(move |i| self.allow_entry(i))
    }

    pub fn allow_len(&self) -> usize {
        match &self.allow {
            AllowTable::Parsed(p) => p.entries.len(),
            AllowTable::Compiled(c) => c.len(),
        }
    }

    /// True when this manifest was read from a compiled index.
    pub fn is_compiled(&self) -> bool {
        matches!(self.allow, AllowTable::Compiled(_))
    }

    /// The distinct `[[allow]]` callsites that contain a `*`.
    pub fn callsite_patterns(&self) -> &[String] {
        &self.callsite_patterns
    }

    /// The first `[[trust]]` rule whose callsite pattern matches.
    pub fn trust_for(&self, callsite: &str) -> Option<(usize, &TrustRule)> {
        self.trust
            .iter()
            .enumerate()
            .find(|(_, r)| callsite_matches(&r.callsite, callsite))
    }
}

/// The rules of some pieces of a big manifest, appended to the whole in order.
#[derive(Default)]
struct Rules {
    allow: Vec<AllowEntry>,
    trust: Vec<TrustRule>,
}

/// Reads one piece of a big manifest (`Manifest::parse_in_pieces`) from toml_parser's events:
/// `[[allow]]`/`[[trust]]` headers, each followed by `key = "string"` or `key = ["string", ...]`
/// lines. Anything else (another table, dotted keys, inline tables, other value types, a
/// repeated or unknown key, a missing required key, any TOML error) gives up, and the whole
/// document is parsed by the toml crate instead, which then reports the error.
struct PieceReader<'a> {
    text: &'a str,
    gave_up: bool,
    header: Option<(Span, Option<Kind>)>,
    key: Option<Field>,
    fields: Fields,
    array: Option<(usize, Vec<Spanned<String>>)>,
    done: Vec<(Span, Kind, Fields)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Allow,
    Trust,
}

#[derive(Clone, Copy, PartialEq)]
enum Field {
    Sha256,
    Callsite,
    Note,
    Globals,
}

#[derive(Default)]
struct Fields {
    sha256: Option<Spanned<String>>,
    callsite: Option<Spanned<String>>,
    note: Option<String>,
    globals: Option<Spanned<Vec<Spanned<String>>>>,
}

use toml_parser::decoder::Encoding;
use toml_parser::parser::{EventReceiver, ValidateWhitespace};
use toml_parser::{ErrorSink, ParseError, Raw, Source, Span};

impl<'a> PieceReader<'a> {
    fn read(text: &'a str, at: &Located<'_>, manifest: &mut Rules) -> Option<()> {
        let source = Source::new(text);
        let tokens = source.lex().into_vec();
        let mut reader = PieceReader {
            text,
            gave_up: false,
            header: None,
            key: None,
            fields: Fields::default(),
            array: None,
            done: Vec::new(),
        };
        let mut failed: Option<ParseError> = None;
        toml_parser::parser::parse_document(
            &tokens,
            &mut ValidateWhitespace::new(&mut reader, source),
            &mut failed,
        );
        reader.finish_table();
        if reader.gave_up || failed.is_some() {
            return None;
        }
        for (header, kind, fields) in reader.done {
            let span = header.start()..header.end();
            match kind {
                Kind::Allow => {
                    let raw = RawAllow {
                        sha256: fields.sha256?,
                        callsite: fields.callsite?,
                        note: fields.note,
                        globals: fields.globals.map(Spanned::into_inner),
                    };
                    manifest
                        .allow
                        .push(at.allow_entry(&Spanned::new(span, raw)).ok()?);
                }
                Kind::Trust => {
                    if fields.sha256.is_some() || fields.note.is_some() {
                        return None;
                    }
                    let raw = RawTrust {
                        callsite: fields.callsite?,
                        globals: fields.globals?,
                    };
                    manifest
                        .trust
                        .push(at.trust_rule(&Spanned::new(span, raw)).ok()?);
                }
            }
        }
        Some(())
    }

    fn decode(&self, span: Span, encoding: Option<Encoding>, key: bool) -> Option<String> {
        let raw = Raw::new_unchecked(&self.text[span.start()..span.end()], encoding, span);
        let mut out: std::borrow::Cow<'a, str> = std::borrow::Cow::Borrowed("");
        let mut failed: Option<ParseError> = None;
        if key {
            raw.decode_key(&mut out, &mut failed);
        } else if !matches!(
            raw.decode_scalar(&mut out, &mut failed),
            toml_parser::decoder::ScalarKind::String
        ) {
            return None;
        }
        failed.is_none().then(|| out.into_owned())
    }

    fn finish_table(&mut self) {
        if let Some((span, Some(kind))) = self.header.take() {
            self.done
                .push((span, kind, std::mem::take(&mut self.fields)));
        }
    }

    fn give_up(&mut self) {
        self.gave_up = true;
    }
}

impl EventReceiver for PieceReader<'_> {
    fn array_table_open(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        if self.key.is_some() || self.array.is_some() {
            return self.give_up();
        }
        self.finish_table();
        self.header = Some((span, None));
    }

    fn array_table_close(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        if !matches!(self.header, Some((_, Some(_)))) {
            self.give_up();
        }
    }

    fn std_table_open(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.give_up();
    }

    fn inline_table_open(&mut self, _span: Span, _error: &mut dyn ErrorSink) -> bool {
        self.give_up();
        false
    }

    fn key_sep(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.give_up();
    }

    fn simple_key(&mut self, span: Span, encoding: Option<Encoding>, _error: &mut dyn ErrorSink) {
        let Some(name) = self.decode(span, encoding, true) else {
            return self.give_up();
        };
        match &mut self.header {
            Some((_, kind @ None)) => {
                *kind = match name.as_str() {
                    "allow" => Some(Kind::Allow),
                    "trust" => Some(Kind::Trust),
                    _ => return self.give_up(),
                }
            }
            Some((_, Some(_))) if self.key.is_none() && self.array.is_none() => {
                let f = &self.fields;
                self.key = match name.as_str() {
                    "sha256" if f.sha256.is_none() => Some(Field::Sha256),
                    "callsite" if f.callsite.is_none() => Some(Field::Callsite),
                    "note" if f.note.is_none() => Some(Field::Note),
                    "globals" if f.globals.is_none() => Some(Field::Globals),
                    _ => return self.give_up(),
                }
            }
            _ => self.give_up(),
        }
    }

    fn scalar(&mut self, span: Span, encoding: Option<Encoding>, _error: &mut dyn ErrorSink) {
        if !matches!(
            encoding,
            Some(Encoding::BasicString | Encoding::LiteralString)
        ) {
            return self.give_up();
        }
        let Some(value) = self.decode(span, encoding, false) else {
            return self.give_up();
        };
        let value = Spanned::new(span.start()..span.end(), value);
        match (self.key, &mut self.array) {
            (Some(Field::Globals), Some((_, items))) => items.push(value),
            (Some(Field::Sha256), None) => self.fields.sha256 = Some(value),
            (Some(Field::Callsite), None) => self.fields.callsite = Some(value),
            (Some(Field::Note), None) => self.fields.note = Some(value.into_inner()),
            _ => return self.give_up(),
        }
        if self.array.is_none() {
            self.key = None;
        }
    }

    fn array_open(&mut self, span: Span, _error: &mut dyn ErrorSink) -> bool {
        if self.key != Some(Field::Globals) || self.array.is_some() {
            self.give_up();
            return false;
        }
        self.array = Some((span.start(), Vec::new()));
        true
    }

    fn array_close(&mut self, span: Span, _error: &mut dyn ErrorSink) {
        match self.array.take() {
            Some((start, items)) => {
                self.fields.globals = Some(Spanned::new(start..span.end(), items));
                self.key = None;
            }
            None => self.give_up(),
        }
    }

    fn error(&mut self, _span: Span, _error: &mut dyn ErrorSink) {
        self.give_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn invalid(text: &str) -> (usize, usize, String) {
        match Manifest::parse(text, "m.toml") {
            Err(ManifestError::Invalid {
                file,
                line,
                column,
                message,
            }) => {
                assert_eq!(file, "m.toml");
                (line, column, message)
            }
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_spec_example() {
        let text = format!(
            "version = 1\n\n[[allow]]\nsha256 = \"{SHA}\"\ncallsite = \"myapp.serving:load_model\"\nnote = \"resnet\"\nglobals = [\"collections.OrderedDict\"]\n\n[[trust]]\ncallsite = \"multiprocessing.*\"\nglobals = [\"multiprocessing.pool.*\"]\n\nloaders = []\n"
        );
        // `loaders` after a table header belongs to that table: the spec places it at the top.
        let text = text.replace("\nloaders = []\n", "\n");
        let m = Manifest::parse(&format!("loaders = [\"myorg.io\"]\n{text}"), "m.toml").unwrap();
        assert_eq!(m.allow_len(), 1);
        let entry = m.allow_entry(0).unwrap();
        assert_eq!(entry.line, 4);
        assert_eq!(entry.note.as_deref(), Some("resnet"));
        assert_eq!(m.trust[0].line, 10);
        assert_eq!(m.loaders, vec!["myorg.io".to_string()]);
        let digest = Digest::parse(SHA).unwrap();
        assert_eq!(m.entries_for(&digest).count(), 1);
        assert_eq!(m.entries_for(&Digest::of(b"other")).count(), 0);
        assert!(m
            .trust_for("multiprocessing.connection:Connection.recv")
            .is_some());
        assert!(m.trust_for("myapp:main").is_none());
    }

    #[test]
    fn unknown_key_is_located() {
        let (line, column, message) = invalid(&format!(
            "version = 1\n[[allow]]\nsha256 = \"{SHA}\"\ncallsite = \"a:b\"\nnotes = \"x\"\n"
        ));
        assert_eq!((line, column), (5, 1));
        assert!(message.contains("unknown field `notes`"), "{message}");
    }

    #[test]
    fn bad_hex_is_located() {
        let bad = "g".repeat(64);
        let (line, column, message) = invalid(&format!(
            "version = 1\n[[allow]]\nsha256 = \"{bad}\"\ncallsite = \"a:b\"\n"
        ));
        assert_eq!((line, column), (3, 10));
        assert!(message.contains("hex"), "{message}");
    }

    #[test]
    fn wrong_length_is_located() {
        let (line, _, message) =
            invalid("version = 1\n[[allow]]\nsha256 = \"abcd\"\ncallsite = \"a:b\"\n");
        assert_eq!(line, 3);
        assert!(message.contains("found 4 characters"), "{message}");
    }

    #[test]
    fn unknown_and_missing_version() {
        let (line, column, message) = invalid("version = 2\n");
        assert_eq!((line, column), (1, 11));
        assert!(message.contains("unknown manifest version 2"), "{message}");
        let (_, _, message) = invalid("loaders = []\n");
        assert!(message.contains("missing `version = 1`"), "{message}");
    }

    #[test]
    fn toml_syntax_error_is_located() {
        let (line, _, _) = invalid("version = 1\n[[allow]\n");
        assert_eq!(line, 2);
    }

    #[test]
    fn missing_callsite_and_wrong_type() {
        let (line, _, message) = invalid(&format!("version = 1\n[[allow]]\nsha256 = \"{SHA}\"\n"));
        assert_eq!(line, 2);
        assert!(message.contains("callsite"), "{message}");
        let (line, _, message) =
            invalid("version = 1\n[[trust]]\ncallsite = \"a.*\"\nglobals = \"x\"\n");
        assert_eq!(line, 4);
        assert!(
            message.contains("sequence") || message.contains("array"),
            "{message}"
        );
    }

    #[test]
    fn trust_needs_globals() {
        let (line, column, message) =
            invalid("version = 1\n[[trust]]\ncallsite = \"a.*\"\nglobals = []\n");
        assert_eq!((line, column), (4, 11));
        assert!(message.contains("at least one global"), "{message}");
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let err = Manifest::load(Path::new("/nonexistent/pickles.toml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/pickles.toml: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn errors_deep_in_a_long_manifest_are_located() {
        let mut text = String::from("version = 1\n");
        for i in 0..500u32 {
            let sha = Digest::of(&i.to_le_bytes());
            text.push_str(&format!(
                "[[allow]]\nsha256 = \"{sha}\"\ncallsite = \"app:f{i}\"\n"
            ));
        }
        text.push_str("[[allow]]\nsha256 = \"abcd\"\ncallsite = \"é:x\"\n");
        let (line, column, _) = invalid(&text);
        assert_eq!((line, column), (1 + 500 * 3 + 2, 10));
        let text = "ab\n\u{e9} x\n";
        let lines = LineCursor::default();
        let at = Located {
            file: "m.toml",
            text,
            lines: &lines,
            base: 0,
        };
        assert_eq!(at.line_column(text.find('x').unwrap()), (2, 3)); // columns count characters
        assert_eq!(at.line_column(text.len()), (3, 1));
    }

    #[test]
    fn big_manifest_in_pieces_equals_the_whole_parse() {
        let mut text = String::from("version = 1\nloaders = [\"myorg.io\"]\n");
        for i in 0..12_000u32 {
            let sha = Digest::of(&(i % 11_000).to_le_bytes()); // entries 11000.. repeat earlier digests
            text.push_str(&format!(
                "[[allow]]\nsha256 = \"{sha}\"\ncallsite = \"app:f{i}\"\nnote = \"n{i}\"\n"
            ));
            if i == 6_000 {
                text.push_str("[[trust]]\ncallsite = \"multiprocessing.*\"\nglobals = [\"a.*\"]\n");
            }
        }
        assert!(text.len() > PIECE_BYTES);
        let pieces = Manifest::parse_in_pieces(&text, "big.toml", &LineCursor::default())
            .expect("parsed in pieces");
        let whole = Manifest::parse_whole(&text, "big.toml", &LineCursor::default()).unwrap();
        assert_eq!((pieces.allow_len(), pieces.trust.len()), (12_000, 1));
        assert!(pieces.allow_entries().eq(whole.allow_entries()));
        assert_eq!(
            (&pieces.trust, &pieces.loaders),
            (&whole.trust, &whole.loaders)
        );
        let twice: Vec<usize> = pieces
            .entries_for(&Digest::of(&5u32.to_le_bytes()))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(twice, vec![5, 11_005]);
        // An error far down is reported exactly as the whole parse reports it.
        text.push_str("[[allow]]\nsha256 = \"abcd\"\ncallsite = \"a:b\"\n");
        assert_eq!(
            Manifest::parse(&text, "big.toml").unwrap_err(),
            Manifest::parse_whole(&text, "big.toml", &LineCursor::default()).unwrap_err()
        );
    }

    #[test]
    fn knows_which_callsites_could_admit_anything() {
        let text = format!(
            "version = 1\n[[allow]]\nsha256 = \"{SHA}\"\ncallsite = \"app.serve:load\"\n[[allow]]\nsha256 = \"{SHA}\"\ncallsite = \"app.jobs:*\"\n[[trust]]\ncallsite = \"multiprocessing.*\"\nglobals = [\"x.y\"]\n"
        );
        let m = Manifest::parse(&text, "m.toml").unwrap();
        assert!(m.admits_anything_at("app.serve:load"));
        assert!(m.admits_anything_at("app.jobs:nightly"));
        assert!(m.admits_anything_at("multiprocessing.connection:Connection.recv"));
        assert!(!m.admits_anything_at("app.serve:load_other"));
        assert!(!Manifest::empty("none").admits_anything_at("app.serve:load"));
    }

    #[test]
    fn lookup_by_sha_is_indexed() {
        let mut text = String::from("version = 1\n");
        for i in 0..2000u32 {
            let sha = Digest::of(&i.to_le_bytes());
            text.push_str(&format!(
                "[[allow]]\nsha256 = \"{sha}\"\ncallsite = \"app:f{i}\"\n"
            ));
        }
        let m = Manifest::parse(&text, "big.toml").unwrap();
        let (i, e) = m
            .entries_for(&Digest::of(&1234u32.to_le_bytes()))
            .next()
            .unwrap();
        assert_eq!((i, e.callsite.as_str()), (1234, "app:f1234"));
    }
}
