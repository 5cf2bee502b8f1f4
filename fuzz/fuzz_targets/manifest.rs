//! Fuzzes the manifest parser: any text is a manifest or an error naming a real line and column,
//! never a panic; a parsed manifest answers lookups for every entry it holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use picklegate_core::manifest::{Manifest, ManifestError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Manifest::parse(text, "fuzz.toml") {
        Ok(manifest) => {
            for entry in manifest.allow_entries() {
                assert!(manifest.entries_for(&entry.sha256).next().is_some());
            }
        }
        Err(ManifestError::Invalid { line, column, .. }) => {
            assert!(
                line >= 1 && column >= 1 && line <= text.lines().count().max(1) + 1,
                "bad position {line}:{column}"
            );
        }
        Err(error) => panic!("parsing text cannot fail to read: {error}"),
    }
});
