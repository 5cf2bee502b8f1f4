//! `picklegate freeze`: turns recorded loads into a version 1 manifest, one `[[allow]]` per
//! (sha256, callsite), sorted and deduplicated so the same input always gives the same bytes.
//! Each entry pins the globals its complete scan saw, each one commented with its class.

use crate::callsite::callsite_matches;
use crate::hash::Digest;
use crate::manifest::{Manifest, SUPPORTED_VERSION};
use crate::record::Record;
use crate::risk::{classify, Risk};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// What freezing merges for one (callsite, sha256).
#[derive(Default)]
struct Entry {
    note: Option<String>,
    globals: BTreeSet<String>,
    /// The class of each global the records named, as recorded.
    classes: BTreeMap<String, String>,
    /// The globals are all of them: an existing entry listed them, or a record's scan was complete.
    pinned: bool,
    sources: BTreeSet<String>,
    from_bytes: bool,
}

impl Entry {
    /// An existing note wins; otherwise where the recorded loads read the pickle from.
    fn note(&self) -> Option<String> {
        if self.note.is_some() {
            return self.note.clone();
        }
        let mut origins: Vec<&str> = self.sources.iter().map(String::as_str).collect();
        if self.from_bytes {
            origins.push("bytes in memory");
        }
        (!origins.is_empty()).then(|| {
            format!(
                "recorded from {}; review before enforcing",
                origins.join(", ")
            )
        })
    }
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// The class of a global named `module.name` without the record's split: the last dot splits.
fn class_of(global: &str) -> String {
    match global.rsplit_once('.') {
        Some(_) if global.contains('*') => "pattern".into(),
        Some((module, name)) => classify(module, name).0.as_str().into(),
        None => Risk::Unknown.as_str().into(),
    }
}

/// `globals = [...]`, one per line with its class as a comment, and a comment line that says
/// what the entry needs from a reviewer.
fn write_globals(out: &mut String, entry: &Entry) {
    if !entry.pinned {
        out.push_str("# globals not pinned: the recorded scan did not read the whole file, so any global is allowed\n");
        return;
    }
    if entry.globals.is_empty() {
        out.push_str("globals = []  # the scan found no global: plain data\n");
        return;
    }
    let classes: Vec<String> = entry
        .globals
        .iter()
        .map(|g| entry.classes.get(g).cloned().unwrap_or_else(|| class_of(g)))
        .collect();
    let count = |class: &str| classes.iter().filter(|c| c.as_str() == class).count();
    let needs_human = count("code") + count("unknown");
    let summary: Vec<String> = ["code", "unknown", "data", "pattern"]
        .iter()
        .filter(|c| count(c) > 0)
        .map(|c| format!("{} {c}", count(c)))
        .collect();
    let verdict = if needs_human > 0 {
        "needs a human"
    } else {
        "plain data"
    };
    let _ = writeln!(out, "# review: {verdict} ({})", summary.join(", "));
    out.push_str("globals = [\n");
    for (global, class) in entry.globals.iter().zip(&classes) {
        let _ = writeln!(out, "    {},  # {class}", toml_string(global));
    }
    out.push_str("]\n");
}

fn toml_list<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let items: Vec<String> = items.into_iter().map(|s| toml_string(s)).collect();
    format!("[{}]", items.join(", "))
}

/// The manifest text for `records`. With `existing`, its entries (and their notes), trust rules
/// and loaders are kept, and records it already allows are not added again.
pub fn freeze(records: &[Record], existing: Option<&Manifest>) -> String {
    let mut entries: BTreeMap<(String, Digest), Entry> = BTreeMap::new();
    for allow in existing.into_iter().flat_map(Manifest::allow_entries) {
        let entry = entries
            .entry((allow.callsite.clone(), allow.sha256))
            .or_default();
        entry.note = entry.note.take().or_else(|| allow.note.clone());
        if let Some(globals) = &allow.globals {
            entry.globals.extend(globals.iter().cloned());
            entry.pinned = true;
        }
    }
    for record in records {
        let sha = Digest::parse(&record.sha256).expect("records are validated when parsed");
        let covered = existing.is_some_and(|m| {
            m.entries_for(&sha).any(|(_, e)| {
                e.callsite != record.callsite && callsite_matches(&e.callsite, &record.callsite)
            })
        });
        if covered {
            continue;
        }
        let entry = entries.entry((record.callsite.clone(), sha)).or_default();
        entry.globals.extend(record.globals.iter().cloned());
        entry.classes.extend(
            record
                .globals
                .iter()
                .cloned()
                .zip(record.classes.iter().cloned()),
        );
        entry.pinned |= record.globals_complete;
        match &record.source {
            Some(source) => entry.sources.insert(source.clone()),
            None => std::mem::replace(&mut entry.from_bytes, true),
        };
    }

    let mut out = String::from("# Written by `picklegate freeze` from recorded loads.\n");
    let _ = writeln!(out, "version = {SUPPORTED_VERSION}");
    if let Some(manifest) = existing.filter(|m| !m.loaders.is_empty()) {
        let _ = writeln!(out, "loaders = {}", toml_list(&manifest.loaders));
    }
    for ((callsite, sha), entry) in &entries {
        let _ = write!(
            out,
            "\n[[allow]]\nsha256 = \"{sha}\"\ncallsite = {}\n",
            toml_string(callsite)
        );
        if let Some(note) = entry.note() {
            let _ = writeln!(out, "note = {}", toml_string(&note));
        }
        write_globals(&mut out, entry);
    }
    for rule in existing.map_or(&[][..], |m| &m.trust) {
        let _ = write!(
            out,
            "\n[[trust]]\ncallsite = {}\nglobals = {}\n",
            toml_string(&rule.callsite),
            toml_list(&rule.globals)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::sample;

    #[test]
    fn deduplicates_sorts_and_is_deterministic() {
        let mut second_source = sample("app:load", b"model", Some("/srv/b.pkl"));
        second_source.globals.push("numpy.dtype".into());
        let records = vec![
            sample("app:zeta", b"x", None),
            sample("app:load", b"model", Some("/srv/a.pkl")),
            second_source,
            sample("app:load", b"model", Some("/srv/a.pkl")),
        ];
        let text = freeze(&records, None);
        let mut reversed = records.clone();
        reversed.reverse();
        assert_eq!(
            text,
            freeze(&reversed, None),
            "order of records must not matter"
        );

        let manifest = Manifest::parse(&text, "frozen.toml").unwrap();
        assert_eq!(manifest.allow_len(), 2);
        let first = &manifest.allow_entry(0).unwrap();
        assert_eq!(
            (first.callsite.as_str(), first.sha256),
            ("app:load", Digest::of(b"model"))
        );
        assert_eq!(
            first.globals,
            Some(vec![
                "collections.OrderedDict".to_string(),
                "numpy.dtype".to_string()
            ])
        );
        assert!(text.contains("# review: plain data (2 data)\nglobals = [\n    \"collections.OrderedDict\",  # data\n    \"numpy.dtype\",  # data\n]\n"), "{text}");
        assert_eq!(
            first.note.as_deref(),
            Some("recorded from /srv/a.pkl, /srv/b.pkl; review before enforcing")
        );
        assert_eq!(
            manifest.allow_entry(1).unwrap().note.as_deref(),
            Some("recorded from bytes in memory; review before enforcing")
        );
    }

    #[test]
    fn merge_keeps_notes_trust_and_loaders() {
        let model = Digest::of(b"model");
        let existing = Manifest::parse(
            &format!(
                "version = 1\nloaders = [\"myorg.io\"]\n[[allow]]\nsha256 = \"{model}\"\ncallsite = \"app:load\"\nnote = \"reviewed by ana\"\n\n[[allow]]\nsha256 = \"{}\"\ncallsite = \"app.*\"\n\n[[trust]]\ncallsite = \"multiprocessing.*\"\nglobals = [\"myapp.tasks.*\"]\n",
                Digest::of(b"anywhere")
            ),
            "old.toml",
        )
        .unwrap();
        let records = vec![
            sample("app:load", b"model", Some("/srv/a.pkl")),
            sample("app.sub:f", b"anywhere", None),
            sample("app:new", b"fresh", None),
        ];
        let text = freeze(&records, Some(&existing));
        let merged = Manifest::parse(&text, "new.toml").unwrap();
        let summary: Vec<(String, Option<String>)> = merged
            .allow_entries()
            .map(|e| (e.callsite.clone(), e.note.clone()))
            .collect();
        assert_eq!(
            summary
                .iter()
                .map(|(c, n)| (c.as_str(), n.as_deref()))
                .collect::<Vec<_>>(),
            vec![
                ("app.*", None),
                ("app:load", Some("reviewed by ana")),
                (
                    "app:new",
                    Some("recorded from bytes in memory; review before enforcing")
                ),
            ]
        );
        assert_eq!(merged.loaders, vec!["myorg.io".to_string()]);
        assert_eq!(merged.trust[0].globals, vec!["myapp.tasks.*".to_string()]);
        assert_eq!(
            freeze(&records, Some(&merged)),
            text,
            "freezing again changes nothing"
        );
    }

    #[test]
    fn globals_are_pinned_only_from_a_complete_scan() {
        let mut complete_empty = sample("app:a", b"plain", None);
        complete_empty.globals.clear();
        complete_empty.classes.clear();
        let mut incomplete = sample("app:b", b"zip", None);
        incomplete.globals.clear();
        incomplete.classes.clear();
        incomplete.globals_complete = false;
        let mut payload = sample("app:c", b"evil", None);
        payload.globals = vec!["posix.system".into(), "myapp.tasks.os.system".into()];
        payload.classes = vec!["code".into(), "code".into()];
        let text = freeze(&[complete_empty, incomplete, payload], None);
        let manifest = Manifest::parse(&text, "f.toml").unwrap();
        let globals: Vec<Option<Vec<String>>> = manifest
            .allow_entries()
            .map(|e| e.globals.clone())
            .collect();
        assert_eq!(
            globals,
            vec![
                Some(vec![]),
                None,
                Some(vec!["myapp.tasks.os.system".into(), "posix.system".into()])
            ]
        );
        assert!(
            text.contains("globals = []  # the scan found no global"),
            "{text}"
        );
        assert!(text.contains("# globals not pinned"), "{text}");
        assert!(text.contains("# review: needs a human (2 code)"), "{text}");
        // `globals = []` admits nothing; no key admits anything
        assert!(!manifest
            .allow_entry(0)
            .unwrap()
            .permits_global("collections", "OrderedDict"));
        assert!(manifest
            .allow_entry(1)
            .unwrap()
            .permits_global("posix", "system"));
    }

    #[test]
    fn strings_are_escaped() {
        let record = sample("app:load", b"q", Some("/tmp/we\"ird\npath.pkl"));
        let manifest = Manifest::parse(&freeze(&[record], None), "f.toml").unwrap();
        assert!(manifest
            .allow_entry(0)
            .unwrap()
            .note
            .as_deref()
            .unwrap()
            .contains("/tmp/we\"ird\npath.pkl"));
    }
}
