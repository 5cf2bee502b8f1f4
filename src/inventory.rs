//! The CLI's inventory commands over the core: `scan` (pickles inside any supported file),
//! `freeze` (record files to a manifest) and `verify` (which files a manifest lists).

use crate::errors::Result;
use parking_lot::Mutex;
use picklegate_core::callsite::global_matches;
use picklegate_core::container::{scan_path, ContainerError, Scanned};
use picklegate_core::freeze::freeze;
use picklegate_core::manifest::Manifest;
use picklegate_core::record::read_records;
use picklegate_core::risk::{classify, Risk, UNRESOLVED};
use picklegate_core::scan::ScanError;
use pyo3::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The `picklegate scan --json` schema version (README, "Scan output"); bump it on any change
/// that is not an added field.
const SCAN_SCHEMA: &str = "picklegate-scan/1";
/// Why persistent ids outside a torch file are `unknown`.
const PERSISTENT: &str =
    "the loader's persistent_load decides what each id becomes (torch's own are storages)";
/// Why an import only `pickle.load`'s reading of a joblib file makes is `unknown`, not `code`.
const MISREAD: &str = "only if this joblib file is read by pickle.load instead of joblib.load: its array bytes then read as opcodes";

fn global_entry(
    name: String,
    risk: Risk,
    why: &str,
    parts: Vec<&str>,
    allowed: bool,
) -> serde_json::Value {
    json!({"name": name, "class": risk.as_str(), "why": why, "parts": parts, "allowed": allowed})
}

/// Where a container's error is, kept apart from its message: the part (archive member, `pickle
/// at offset N`, or empty for the file itself), the offset in that pickle (null for a broken
/// container), and what is wrong there.
fn error_at(error: &ContainerError) -> serde_json::Value {
    match error {
        ContainerError::Pickle { part, error } => {
            let (ScanError::Truncated { offset, .. }
            | ScanError::UnknownOpcode { offset, .. }
            | ScanError::Malformed { offset, .. }) = error;
            json!({"part": part, "offset": offset, "problem": error.to_string()})
        }
        ContainerError::Format { part, problem } => {
            json!({"part": part, "offset": null, "problem": problem})
        }
    }
}

/// One file's review: its parts, every global with its class (worst first), and the verdict:
/// the worst class among the globals not `allow`ed, `error` when the file was not read completely
/// (unless a `code` global was already found), `none` when it holds no pickle.
fn scan_summary(path: &Path, allow: &[String]) -> serde_json::Value {
    let file = path.display().to_string();
    let (sha256, size, Scanned { contents, error }) = match scan_path(path) {
        Ok(scanned) => (scanned.sha256, scanned.size, scanned.scanned),
        Err(e) => {
            return json!({"file": file, "error": format!("{file}: {e}"), "verdict": "error", "complete": false, "globals": [], "parts": []})
        }
    };
    let mut globals: BTreeMap<(Risk, String), (&'static str, Vec<&str>, bool)> = BTreeMap::new();
    for part in &contents.parts {
        for (module, name) in &part.report.globals {
            let (risk, why) = classify(module, name);
            let allowed = allow.iter().any(|p| global_matches(p, module, name));
            let entry = globals
                .entry((risk, format!("{module}.{name}")))
                .or_insert((why, Vec::new(), allowed));
            entry.1.push(part.name.as_str());
        }
        for import in &part.report.unresolved {
            let entry = globals.entry((UNRESOLVED.0, import.clone())).or_insert((
                UNRESOLVED.1,
                Vec::new(),
                false,
            ));
            entry.1.push(part.name.as_str());
        }
        let persistent = ["PERSID", "BINPERSID"]
            .iter()
            .any(|op| part.report.risky_opcodes.contains_key(op));
        if persistent && !contents.format.starts_with("torch") {
            let entry = globals
                .entry((Risk::Unknown, "persistent ids (PERSID/BINPERSID)".into()))
                .or_insert((PERSISTENT, Vec::new(), false));
            entry.1.push(part.name.as_str());
        }
        for import in &part.misread_unresolved {
            let entry = globals.entry((Risk::Unknown, import.clone())).or_insert((
                MISREAD,
                Vec::new(),
                false,
            ));
            entry.1.push(part.name.as_str());
        }
    }
    let worst = globals
        .iter()
        .filter(|(_, (_, _, allowed))| !allowed)
        .map(|((risk, _), _)| *risk)
        .min();
    let verdict = match (worst, &error) {
        (Some(Risk::Code), _) => "code",
        (_, Some(_)) => "error",
        (Some(risk), None) => risk.as_str(),
        (None, None) if contents.parts.is_empty() => "none",
        (None, None) => "data",
    };
    let parts: Vec<_> = contents
        .parts
        .iter()
        .map(|part| {
            let names: Vec<String> = part
                .report
                .globals
                .iter()
                .map(|(m, n)| format!("{m}.{n}"))
                .collect();
            json!({
                "name": part.name,
                "protocol": part.report.protocol,
                "globals": names,
                "unresolved": part.report.unresolved,
                "risky_opcodes": part.report.risky_opcodes,
                "outside_allowlist": part.outside(allow),
            })
        })
        .collect();
    let globals: Vec<_> = globals
        .into_iter()
        .map(|((risk, name), (why, parts, allowed))| global_entry(name, risk, why, parts, allowed))
        .collect();
    json!({
        "file": file,
        "format": contents.format,
        "size": size,
        "sha256": sha256.to_hex(),
        "verdict": verdict,
        "complete": error.is_none(),
        "error_at": error.as_ref().map(error_at),
        "error": error.map(|e| format!("{file}: {e}")),
        "globals": globals,
        "parts": parts,
        "raw_data_bytes": contents.raw_data,
    })
}

/// Scans each file statically on all cores, as a JSON document `{"schema", "files": [...]}` in
/// the order given; globals matching an `allow` pattern are marked `allowed`.
#[pyfunction]
pub fn scan_files(py: Python<'_>, paths: Vec<PathBuf>, allow: Vec<String>) -> String {
    let summaries = py.detach(|| {
        let next = AtomicUsize::new(0);
        let slots: Vec<Mutex<Option<serde_json::Value>>> =
            paths.iter().map(|_| Mutex::new(None)).collect();
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(paths.len().max(1));
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = paths.get(index) else { break };
                    *slots[index].lock() = Some(scan_summary(path, &allow));
                });
            }
        });
        slots
            .into_iter()
            .map(|slot| slot.into_inner().expect("every path is scanned"))
            .collect::<Vec<_>>()
    });
    json!({"schema": SCAN_SCHEMA, "files": summaries}).to_string()
}

/// The manifest text for the record files at `records`, merged into `merge` when given.
#[pyfunction]
#[pyo3(signature = (records, merge=None))]
pub fn freeze_records(records: Vec<PathBuf>, merge: Option<PathBuf>) -> Result<String> {
    let existing = merge.map(|p| Manifest::load(&p)).transpose()?;
    let mut all = Vec::new();
    for path in &records {
        all.extend(read_records(path)?);
    }
    Ok(freeze(&all, existing.as_ref()))
}

/// The `(sha256, callsite)` of every `[[allow]]` entry; a malformed manifest is a `PolicyError`,
/// and so is a compiled index whose rules are not those of the TOML it names.
#[pyfunction]
pub fn manifest_entries(path: PathBuf) -> Result<Vec<(String, String)>> {
    let manifest = picklegate_core::compiled::load_and_audit(&path)?;
    Ok(manifest
        .allow_entries()
        .map(|e| (e.sha256.to_hex(), e.callsite.clone()))
        .collect())
}

/// `picklegate compile`: writes the compiled index of the TOML manifest at `manifest` to
/// `output`; returns (entries, bytes written, the TOML's sha256). Errors are `PolicyError`s.
#[pyfunction]
pub fn compile_manifest(
    py: Python<'_>,
    manifest: PathBuf,
    output: PathBuf,
) -> Result<(usize, usize, String)> {
    let summary = py.detach(|| picklegate_core::compiled::compile_file(&manifest, &output))?;
    Ok((summary.entries, summary.bytes, summary.toml_sha256.to_hex()))
}
