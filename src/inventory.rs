//! The CLI's inventory commands over the core: `scan` (pickles inside any supported file),
//! `freeze` (record files to a manifest) and `verify` (which files a manifest lists).

use crate::errors;
use picklegate_core::container::scan_all;
use picklegate_core::freeze::freeze;
use picklegate_core::hash::Digest;
use picklegate_core::manifest::Manifest;
use picklegate_core::record::read_records;
use pyo3::prelude::*;
use serde_json::json;
use std::path::{Path, PathBuf};

fn scan_summary(path: &Path, allow: &[String]) -> Result<serde_json::Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let scanned = scan_all(&bytes);
    if let Some(error) = scanned.error {
        return Err(format!("{}: {error}", path.display()));
    }
    let contents = scanned.contents;
    let parts: Vec<_> = contents
        .parts
        .iter()
        .map(|part| {
            let globals: Vec<String> = part.report.globals.iter().map(|(m, n)| format!("{m}.{n}")).collect();
            json!({
                "name": part.name,
                "protocol": part.report.protocol,
                "globals": globals,
                "unresolved": part.report.unresolved,
                "risky_opcodes": part.report.risky_opcodes,
                "outside_allowlist": part.outside(allow),
            })
        })
        .collect();
    Ok(json!({
        "file": path.display().to_string(),
        "format": contents.format,
        "sha256": Digest::of(&bytes).to_hex(),
        "size": bytes.len(),
        "parts": parts,
    }))
}

/// Scans the file at `path` statically, as a JSON object; globals not matching any `allow`
/// pattern are listed under `outside_allowlist`. Raises `ScanError` naming the file.
#[pyfunction]
pub fn scan_file(py: Python<'_>, path: PathBuf, allow: Vec<String>) -> PyResult<String> {
    let summary = py.detach(|| scan_summary(&path, &allow));
    summary.map(|s| s.to_string()).map_err(|message| errors::scan_error_message(py, message))
}

/// The manifest text for the record files at `records`, merged into `merge` when given.
#[pyfunction]
#[pyo3(signature = (records, merge=None))]
pub fn freeze_records(py: Python<'_>, records: Vec<PathBuf>, merge: Option<PathBuf>) -> PyResult<String> {
    let existing = merge.map(|p| Manifest::load(&p)).transpose().map_err(|e| errors::manifest_error(py, &e))?;
    let mut all = Vec::new();
    for path in &records {
        all.extend(read_records(path).map_err(|e| errors::policy_error(py, e.to_string()))?);
    }
    Ok(freeze(&all, existing.as_ref()))
}

/// The `(sha256, callsite)` of every `[[allow]]` entry; a malformed manifest is a `PolicyError`.
#[pyfunction]
pub fn manifest_entries(py: Python<'_>, path: PathBuf) -> PyResult<Vec<(String, String)>> {
    let manifest = Manifest::load(&path).map_err(|e| errors::manifest_error(py, &e))?;
    Ok(manifest.allow.iter().map(|e| (e.sha256.to_hex(), e.callsite.clone())).collect())
}
