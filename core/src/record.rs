//! The record file of `record` mode: one JSON line per load, appended by many threads and
//! processes at once without tearing, and read back line by line (errors name file:line).

use crate::event::{json_line, open_for_append, write_line_once};
use crate::hash::Digest;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// One load seen in `record` mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub pid: u32,
    pub callsite: String,
    /// 64 hex digits.
    pub sha256: String,
    pub size: u64,
    /// `module.name` of every global the static scan found.
    pub globals: Vec<String>,
    /// The class (`code`, `unknown`, `data`: `risk::classify`) of each of `globals`, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// The scan read every pickle in the bytes to the end, so `globals` is all of them. Records
    /// written before this field existed read as incomplete.
    #[serde(default)]
    pub globals_complete: bool,
    /// The file the pickle was read from, when the load had one.
    pub source: Option<String>,
}

impl Record {
    pub fn to_json_line(&self) -> String {
        json_line(self)
    }
}

/// A record file opened for appending. Each record is one `write` on an O_APPEND descriptor, so
/// concurrent writers (threads sharing this handle, or other processes) never interleave lines.
#[derive(Debug)]
pub struct RecordFile {
    path: PathBuf,
    file: File,
}

impl RecordFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = open_for_append(path, "the picklegate record file")?;
        Ok(RecordFile {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn append(&self, record: &Record) -> io::Result<()> {
        let what = format!("the picklegate record file {}", self.path.display());
        write_line_once(&self.file, record.to_json_line().as_bytes(), &what)
    }
}

/// A record line that cannot be used, located as `file:line` (line 0: the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file, self.message),
            line => write!(f, "{}:{line}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for RecordError {}

/// Parses the text of a record file (`file` names it in errors). Blank lines are skipped.
pub fn parse_records(text: &str, file: &str) -> Result<Vec<Record>, RecordError> {
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |message: String| RecordError {
            file: file.to_string(),
            line: index + 1,
            message,
        };
        let record: Record = serde_json::from_str(line)
            .map_err(|e| error(format!("not a picklegate record line: {e}")))?;
        Digest::parse(&record.sha256)
            .map_err(|e| error(format!("bad sha256 {:?}: {e}", record.sha256)))?;
        if record.callsite.is_empty() || record.callsite.chars().any(char::is_whitespace) {
            return Err(error(format!(
                "bad callsite {:?}: expected module:qualname",
                record.callsite
            )));
        }
        if let Some(global) = record
            .globals
            .iter()
            .find(|g| !g.contains('.') || g.chars().any(char::is_whitespace))
        {
            return Err(error(format!(
                "bad global {global:?}: expected module.name"
            )));
        }
        if !record.classes.is_empty() && record.classes.len() != record.globals.len() {
            return Err(error(format!(
                "{} classes for {} globals",
                record.classes.len(),
                record.globals.len()
            )));
        }
        records.push(record);
    }
    Ok(records)
}

/// Reads and parses one record file.
pub fn read_records(path: &Path) -> Result<Vec<Record>, RecordError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| RecordError {
        file: file.clone(),
        line: 0,
        message: format!("cannot read the record file: {e}"),
    })?;
    parse_records(&text, &file)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample(callsite: &str, data: &[u8], source: Option<&str>) -> Record {
        Record {
            time: 1.0,
            pid: 7,
            callsite: callsite.into(),
            sha256: Digest::of(data).to_hex(),
            size: data.len() as u64,
            globals: vec!["collections.OrderedDict".into()],
            classes: vec!["data".into()],
            globals_complete: true,
            source: source.map(str::to_string),
        }
    }

    #[test]
    fn lines_round_trip() {
        let records = vec![
            sample("app:load", b"a", Some("/data/a.pkl")),
            sample("app:other", b"b", None),
        ];
        let text: String = records.iter().map(Record::to_json_line).collect();
        assert_eq!(text.lines().count(), 2);
        assert_eq!(parse_records(&text, "r.jsonl").unwrap(), records);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let good = sample("app:load", b"a", None).to_json_line();
        let err = parse_records(&format!("{good}\n{{\"time\": 1"), "r.jsonl").unwrap_err();
        assert_eq!((err.file.as_str(), err.line), ("r.jsonl", 3));
        assert!(
            err.to_string()
                .starts_with("r.jsonl:3: not a picklegate record line"),
            "{err}"
        );

        let bad_sha = good.replace(&Digest::of(b"a").to_hex(), "abc");
        let err = parse_records(&bad_sha, "r.jsonl").unwrap_err();
        assert!(
            err.to_string().contains("r.jsonl:1: bad sha256 \"abc\""),
            "{err}"
        );

        let bad_callsite = good.replace("app:load", "app: load");
        assert!(parse_records(&bad_callsite, "r")
            .unwrap_err()
            .message
            .contains("bad callsite"));
        let extra_field = good.replace("{\"time\"", "{\"tyme\":1,\"time\"");
        assert!(parse_records(&extra_field, "r")
            .unwrap_err()
            .message
            .contains("unknown field `tyme`"));
    }

    #[test]
    fn concurrent_appends_keep_every_line_whole() {
        let dir = std::env::temp_dir().join(format!("picklegate-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("records.jsonl");
        let _ = std::fs::remove_file(&path);
        let shared = std::sync::Arc::new(RecordFile::open(&path).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let file = shared.clone();
                let path = path.clone();
                std::thread::spawn(move || {
                    let own = RecordFile::open(&path).unwrap();
                    for i in 0..500u32 {
                        let record = sample(
                            &format!("app:t{t}"),
                            &i.to_le_bytes(),
                            Some("/x".repeat(200).as_str()),
                        );
                        if i % 2 == 0 {
                            file.append(&record)
                        } else {
                            own.append(&record)
                        }
                        .unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(read_records(&path).unwrap().len(), 4000);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_from_before_classes_read_as_incomplete() {
        let old = r#"{"time":1.0,"pid":7,"callsite":"app:load","sha256":"ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb","size":1,"globals":[],"source":null}"#;
        let [record] = parse_records(old, "r").unwrap().try_into().unwrap();
        assert!(!record.globals_complete && record.classes.is_empty());
        let mismatched = old.replace(r#""globals":[]"#, r#""globals":[],"classes":["data"]"#);
        assert!(parse_records(&mismatched, "r")
            .unwrap_err()
            .message
            .contains("1 classes for 0 globals"));
    }

    #[test]
    fn unreadable_file_is_named() {
        let err = read_records(Path::new("/nonexistent/r.jsonl")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/r.jsonl: cannot read"),
            "{err}"
        );
    }
}
