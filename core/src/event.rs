//! One JSON line per decision (denials; every load in `warn` and `record`), and the sinks that
//! take them: stderr or a file opened for appending, each line written in a single `write`.

use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub pid: u32,
    pub mode: &'static str,
    /// `allow`, `deny`, `warn` (refused but run) or `record`.
    pub decision: &'static str,
    pub callsite: String,
    pub sha256: Option<String>,
    pub size: Option<u64>,
    pub globals: Vec<String>,
    pub source: Option<String>,
    pub reason: Option<String>,
}

impl Event {
    pub fn to_json_line(&self) -> String {
        json_line(self)
    }
}

/// Opens `path` for appending, creating it; errors read "cannot open {what} {path}: ...".
pub fn open_for_append(path: &Path, what: &str) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open {what} {}: {e}", path.display()),
            )
        })
}

/// Writes `line` with one `write` call: with O_APPEND, lines from many threads and processes
/// never tear. `what` names the destination in errors.
pub fn write_line_once(mut out: impl Write, line: &[u8], what: &str) -> io::Result<()> {
    let written = out
        .write(line)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot append to {what}: {e}")))?;
    if written != line.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write to {what} ({written} of {} bytes)", line.len()),
        ));
    }
    Ok(())
}

/// Where events go (`PICKLEGATE_LOG=stderr|PATH`).
#[derive(Debug)]
pub enum Sink {
    Stderr,
    File { path: PathBuf, file: File },
}

impl Sink {
    pub fn parse(setting: &str) -> io::Result<Self> {
        match setting.trim() {
            "" | "stderr" => Ok(Sink::Stderr),
            path => {
                let path = PathBuf::from(path);
                let file = open_for_append(&path, "picklegate log")?;
                Ok(Sink::File { path, file })
            }
        }
    }

    /// Writes one line with one `write` call (see `write_line_once`).
    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        match self {
            Sink::Stderr => write_line_once(io::stderr().lock(), line.as_bytes(), "stderr"),
            Sink::File { path, file } => write_line_once(
                &*file,
                line.as_bytes(),
                &format!("picklegate log {}", path.display()),
            ),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Sink::Stderr => "stderr".into(),
            Sink::File { path, .. } => path.display().to_string(),
        }
    }
}

/// One value as a JSON line, newline included: what every sink and record file writes.
pub(crate) fn json_line(value: &impl Serialize) -> String {
    let mut line = serde_json::to_string(value).expect("events and records always serialize");
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_is_one_json_line() {
        let event = Event {
            time: 1.5,
            pid: 42,
            mode: "enforce",
            decision: "deny",
            callsite: "app:main".into(),
            sha256: Some("ab".into()),
            size: Some(3),
            globals: vec!["posix.system".into()],
            source: None,
            reason: Some("not listed\nsecond line".into()),
        };
        let line = event.to_json_line();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["callsite"], "app:main");
        assert_eq!(back["globals"][0], "posix.system");
    }

    #[test]
    fn file_sink_appends_whole_lines() {
        let dir = std::env::temp_dir().join(format!("picklegate-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut a = Sink::parse(path.to_str().unwrap()).unwrap();
        let mut b = Sink::parse(path.to_str().unwrap()).unwrap();
        a.write_line("{\"n\":1}\n").unwrap();
        b.write_line("{\"n\":2}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"n\":1}\n{\"n\":2}\n"
        );
        assert!(Sink::parse("/nonexistent-dir/x.log")
            .unwrap_err()
            .to_string()
            .contains("/nonexistent-dir/x.log"));
    }
}
