//! Finds the pickles inside the files that carry them (torch zip checkpoints, .npz, .npy object
//! arrays, joblib files plain or compressed) and scans each one statically, running nothing.

use crate::callsite::global_matches;
use crate::hash::Digest;
use crate::scan::{Progress, Report, ScanError, Scanner, JOBLIB_ARRAY_WRAPPER};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

const NPY_MAGIC: &[u8] = b"\x93NUMPY";
/// The first pickle of torch's legacy (pre-1.6, non-zip) format: the magic number 0x1950a86a20f9469cfc6c.
const TORCH_LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.";
/// The legacy format's pickles: magic number, protocol version, system info, the object, storage keys.
const TORCH_LEGACY_PICKLES: usize = 5;

/// One pickle found in a file: `name` is the archive member, or empty for the file itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub report: Report,
    /// Imports only the `pickle.load` reading of a joblib stream makes, that it cannot name: its
    /// array bytes read as opcodes (joblib.load never reads them so).
    pub misread_unresolved: Vec<String>,
}

impl Part {
    /// The globals no `allow` pattern matches, then the imports no static scan can name.
    pub fn outside(&self, allow: &[String]) -> Vec<String> {
        let globals = self
            .report
            .globals
            .iter()
            .filter(|(m, n)| !allow.iter().any(|p| global_matches(p, m, n)));
        globals
            .map(|(m, n)| format!("{m}.{n}"))
            .chain(self.report.unresolved.iter().cloned())
            .collect()
    }
}

/// What a file is, and every pickle in it (none for a numeric .npy/.npz).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub format: &'static str,
    pub parts: Vec<Part>,
    /// Bytes the format's own loader reads as raw data, not as pickles (legacy torch storages).
    pub raw_data: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerError {
    /// A pickle (named by its member, or empty for the file itself) is broken.
    Pickle { part: String, error: ScanError },
    /// The container around the pickles is broken or unsupported.
    Format { part: String, problem: String },
}

impl fmt::Display for ContainerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (part, problem) = match self {
            ContainerError::Pickle { part, error } => (part, error.to_string()),
            ContainerError::Format { part, problem } => (part, problem.clone()),
        };
        if part.is_empty() {
            f.write_str(&problem)
        } else {
            write!(f, "{part}: {problem}")
        }
    }
}

impl std::error::Error for ContainerError {}

fn format_error(part: &str, problem: impl Into<String>) -> ContainerError {
    ContainerError::Format {
        part: part.to_string(),
        problem: problem.into(),
    }
}

/// The compression joblib used, told by the magic bytes its compressors write.
fn joblib_codec(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0x78, second, ..] if (0x78u16 * 256 + *second as u16).is_multiple_of(31) => Some("zlib"),
        [0x1f, 0x8b, ..] => Some("gzip"),
        [b'B', b'Z', b'h', level, ..] if level.is_ascii_digit() => Some("bz2"),
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Some("xz"),
        [0x5d, 0x00, 0x00, ..] => Some("lzma"),
        _ => None,
    }
}

fn decompress(codec: &'static str, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let result = match codec {
        "zlib" => flate2::read::ZlibDecoder::new(bytes)
            .read_to_end(&mut out)
            .map(drop)
            .map_err(|e| e.to_string()),
        "gzip" => flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map(drop)
            .map_err(|e| e.to_string()),
        "bz2" => bzip2::read::MultiBzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map(drop)
            .map_err(|e| e.to_string()),
        "xz" => {
            lzma_rs::xz_decompress(&mut Cursor::new(bytes), &mut out).map_err(|e| e.to_string())
        }
        _ => lzma_rs::lzma_decompress(&mut Cursor::new(bytes), &mut out).map_err(|e| e.to_string()),
    };
    result
        .map(|()| out)
        .map_err(|e| format!("{codec} stream cannot be decompressed: {e}"))
}

fn finish(scanner: &mut Scanner, bytes: &[u8]) -> Result<Report, ScanError> {
    match scanner.feed(bytes)? {
        Progress::Done(report) => Ok(report),
        Progress::NeedMore(_) => Err(scanner.truncation(bytes)),
    }
}

/// Adds the globals of `other` that `report` lacks; returns the unresolved imports only `other` has.
fn absorb(report: &mut Report, other: &Report) -> Vec<String> {
    for global in &other.globals {
        if !report.globals.contains(global) {
            report.globals.push(global.clone());
        }
    }
    other
        .unresolved
        .iter()
        .filter(|import| !report.unresolved.contains(import))
        .cloned()
        .collect()
}

/// Scans one pickle into `contents` (what it found, also when it fails) and returns where it
/// ends. A stream joblib may load, and that imports joblib's NumpyArrayWrapper, is read both as
/// `joblib.load` reads it (array bytes after each wrapper) and as `pickle.load` does, up to where
/// that fails; the globals of both readings are reported. Without the wrapper they are the same.
fn scan_pickle(
    contents: &mut Contents,
    part: &str,
    bytes: &[u8],
    maybe_joblib: bool,
) -> Result<usize, ContainerError> {
    let broken = |error| ContainerError::Pickle {
        part: part.to_string(),
        error,
    };
    let mut plain = Scanner::default();
    let plain_result = finish(&mut plain, bytes);
    let plain_report = match &plain_result {
        Ok(report) => report.clone(),
        Err(_) => plain.partial_report().clone(),
    };
    let (module, name) = JOBLIB_ARRAY_WRAPPER;
    let has_wrapper = plain_report
        .globals
        .iter()
        .any(|(m, n)| m == module && n == name);
    if !(maybe_joblib && has_wrapper) {
        contents.parts.push(Part {
            name: part.to_string(),
            report: plain_report,
            misread_unresolved: Vec::new(),
        });
        return plain_result.map(|report| report.end).map_err(broken);
    }
    let mut joblib = Scanner::for_joblib();
    let joblib_result = finish(&mut joblib, bytes);
    let mut report = match &joblib_result {
        Ok(report) => report.clone(),
        Err(_) => joblib.partial_report().clone(),
    };
    let misread_unresolved = absorb(&mut report, &plain_report);
    contents.parts.push(Part {
        name: part.to_string(),
        report,
        misread_unresolved,
    });
    joblib_result.map(|report| report.end).map_err(broken)
}

/// The name of the pickle that starts at `offset` of `within` (empty: the file itself).
fn nth_pickle(within: &str, offset: usize) -> String {
    let at = format!("pickle at offset {offset}");
    if within.is_empty() {
        at
    } else {
        format!("{within}, {at}")
    }
}

/// Every pickle in `bytes`, one after the other to the last byte: bytes after a STOP are read
/// by the next `pickle.load` of the same file, so they are scanned too, and bytes that are not
/// a pickle are an error, never skipped.
fn scan_pickles(
    contents: &mut Contents,
    name: &str,
    bytes: &[u8],
    maybe_joblib: bool,
) -> Result<(), ContainerError> {
    let mut at = scan_pickle(contents, name, bytes, maybe_joblib)?;
    while at < bytes.len() {
        at += scan_pickle(contents, &nth_pickle(name, at), &bytes[at..], maybe_joblib)?;
    }
    Ok(())
}

/// The pickle of an object array in a .npy (nothing for numeric arrays).
fn scan_npy(contents: &mut Contents, part: &str, bytes: &[u8]) -> Result<(), ContainerError> {
    let bad = |problem: &str| format_error(part, format!("bad .npy header: {problem}"));
    let major = *bytes
        .get(NPY_MAGIC.len())
        .ok_or_else(|| bad("truncated before the version"))?;
    let (len_at, len_width) = match major {
        1 => (8, 2),
        2 | 3 => (8, 4),
        other => return Err(bad(&format!("unknown version {other}"))),
    };
    let len_bytes = bytes
        .get(len_at..len_at + len_width)
        .ok_or_else(|| bad("truncated before the header length"))?;
    let header_len = len_bytes
        .iter()
        .rev()
        .fold(0usize, |acc, &b| (acc << 8) | b as usize);
    let data_at = len_at + len_width + header_len;
    let header = bytes
        .get(len_at + len_width..data_at)
        .ok_or_else(|| bad("truncated inside the header"))?;
    let header = String::from_utf8_lossy(header);
    if !header.contains("'descr'") {
        return Err(bad("no 'descr' key"));
    }
    if !header.contains("'|O'") {
        return Ok(());
    }
    let name = if part.is_empty() {
        format!("object array at offset {data_at}")
    } else {
        format!("{part} (object array at offset {data_at})")
    };
    scan_pickles(contents, &name, &bytes[data_at..], false)
}

/// A zip archive: every `.pkl` member (torch) and `.npy` member (numpy) is read and scanned;
/// the other members (torch's tensor records) are data, skipped without reading them.
fn scan_zip<R: Read + Seek>(contents: &mut Contents, reader: R) -> Result<(), ContainerError> {
    let mut archive = zip::ZipArchive::new(reader)
        .map_err(|e| format_error("", format!("not a readable zip archive: {e}")))?;
    contents.format = "zip";
    for index in 0..archive.len() {
        // names come from the central directory: a skipped member's own header is never read
        let name = archive
            .name_for_index(index)
            .unwrap_or_default()
            .to_string();
        // torch finds its records case-insensitively (miniz): `data.PKL` is its pickle too
        let lower = name.to_ascii_lowercase();
        let is_pickle = lower.ends_with(".pkl");
        if !is_pickle && !lower.ends_with(".npy") {
            continue;
        }
        let mut member = archive
            .by_index(index)
            .map_err(|e| format_error("", format!("zip member {index}: {e}")))?;
        let mut data = Vec::new();
        member
            .read_to_end(&mut data)
            .map_err(|e| format_error(&name, format!("cannot read the zip member: {e}")))?;
        if is_pickle {
            contents.format = "torch zip";
            scan_pickles(contents, &name, &data, false)?;
        } else {
            contents.format = if contents.format == "zip" {
                "npz"
            } else {
                contents.format
            };
            scan_npy(contents, &name, &data)?;
        }
    }
    Ok(())
}

/// torch's legacy format: five pickles, then each storage's raw bytes, which torch.load reads
/// itself (they are never unpickled).
fn scan_torch_legacy(contents: &mut Contents, bytes: &[u8]) -> Result<(), ContainerError> {
    contents.format = "torch legacy";
    let mut at = 0;
    for _ in 0..TORCH_LEGACY_PICKLES {
        let name = if at == 0 {
            String::new()
        } else {
            nth_pickle("", at)
        };
        if at >= bytes.len() {
            let error = ScanError::Truncated {
                offset: at,
                opcode: "an opcode (no STOP)",
                needed: 1,
            };
            return Err(ContainerError::Pickle { part: name, error });
        }
        at += scan_pickle(contents, &name, &bytes[at..], false)?;
    }
    contents.raw_data = bytes.len() - at;
    Ok(())
}

/// The format told by the first bytes of a file.
fn sniff(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        "zip"
    } else if bytes.starts_with(NPY_MAGIC) {
        "npy"
    } else if bytes.starts_with(TORCH_LEGACY_MAGIC) {
        "torch legacy"
    } else {
        match joblib_codec(bytes) {
            Some("zlib") => "joblib zlib",
            Some("gzip") => "joblib gzip",
            Some("bz2") => "joblib bz2",
            Some("xz") => "joblib xz",
            Some(_) => "joblib lzma",
            None => "pickle",
        }
    }
}

/// What a scan found in a file, also when it stopped at an error: the parts read so far (the
/// last one partial) and the error. A file with an error was not read completely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub contents: Contents,
    pub error: Option<ContainerError>,
}

/// Scans every pickle in `bytes`, whatever carries it, keeping what it found before an error.
pub fn scan_all(bytes: &[u8]) -> Scanned {
    let mut contents = Contents {
        format: sniff(bytes),
        parts: Vec::new(),
        raw_data: 0,
    };
    let result = match contents.format {
        "zip" => scan_zip(&mut contents, Cursor::new(bytes)),
        "npy" => scan_npy(&mut contents, "", bytes),
        "torch legacy" => scan_torch_legacy(&mut contents, bytes),
        "pickle" => scan_pickles(&mut contents, "", bytes, true),
        _ => {
            let codec =
                joblib_codec(bytes).expect("sniff names a joblib format only for a joblib codec");
            match decompress(codec, bytes) {
                Ok(inner) => scan_pickles(
                    &mut contents,
                    &format!("{codec}-decompressed stream"),
                    &inner,
                    true,
                ),
                Err(problem) => Err(format_error("", problem)),
            }
        }
    };
    let mut error = result.err();
    if matches!(contents.format, "pickle" | "torch legacy") && ends_in_zip(bytes) {
        let mut zip = Contents {
            format: "zip",
            parts: Vec::new(),
            raw_data: 0,
        };
        let zip_error = scan_zip(&mut zip, Cursor::new(bytes)).err();
        contents.format = if contents.format == "pickle" {
            "pickle + zip polyglot"
        } else {
            "torch legacy + zip polyglot"
        };
        contents
            .parts
            .extend(zip.parts.into_iter().map(|part| Part {
                name: format!("zip reading: {}", part.name),
                ..part
            }));
        error = error.or(zip_error);
    }
    Scanned { contents, error }
}

/// Zip readers (torch.load, numpy.load) find an archive from its end: a file that starts as a
/// pickle but ends in a readable zip archive is read both ways, and both readings are scanned.
fn ends_in_zip(bytes: &[u8]) -> bool {
    const EOCD_REACH: usize = 22 + 65_535; // the end record and the longest archive comment
    let tail = &bytes[bytes.len().saturating_sub(EOCD_REACH)..];
    tail.windows(4).any(|w| w == b"PK\x05\x06") && zip::ZipArchive::new(Cursor::new(bytes)).is_ok()
}

/// A file scanned where it lies: its sha256, size, and what the scan found.
pub struct ScannedFile {
    pub sha256: Digest,
    pub size: u64,
    pub scanned: Scanned,
}

/// Scans the file at `path`. A zip archive (torch checkpoint, .npz) is hashed as a stream and
/// read through its central directory: only its pickle and .npy members are read, so tensor
/// records cost their hashing and nothing more, and memory stays the size of the pickles.
/// Other formats are read whole.
pub fn scan_path(path: &Path) -> io::Result<ScannedFile> {
    let mut file = File::open(path)?;
    let mut head = [0u8; 4];
    let head_len = file.read(&mut head)?;
    if sniff(&head[..head_len]) != "zip" {
        file.seek(SeekFrom::Start(0))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        return Ok(ScannedFile {
            sha256: Digest::of(&bytes),
            size: bytes.len() as u64,
            scanned: scan_all(&bytes),
        });
    }
    let size = file.metadata()?.len();
    file.seek(SeekFrom::Start(0))?;
    let sha256 = Digest::of_reader(&mut file)?;
    let mut contents = Contents {
        format: "zip",
        parts: Vec::new(),
        raw_data: 0,
    };
    let error = scan_zip(&mut contents, BufReader::new(file)).err();
    Ok(ScannedFile {
        sha256,
        size,
        scanned: Scanned { contents, error },
    })
}

/// Scans every pickle in `bytes`, whatever carries it; an error loses what was found before it.
pub fn scan_contents(bytes: &[u8]) -> Result<Contents, ContainerError> {
    let scanned = scan_all(bytes);
    match scanned.error {
        None => Ok(scanned.contents),
        Some(error) => Err(error),
    }
}

/// Vectors made by Python (pickle, numpy, joblib's compressors); the pytests cover real libraries.
#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    // pickle.dumps(collections.OrderedDict(), protocol=4)
    const ODICT_P4: &[u8] = b"\x80\x04\x95\x22\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94.";

    fn odict() -> Vec<(String, String)> {
        vec![("collections".to_string(), "OrderedDict".to_string())]
    }

    fn zip_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data) in members {
            writer
                .start_file(
                    *name,
                    zip::write::SimpleFileOptions::default()
                        .compression_method(zip::CompressionMethod::Stored),
                )
                .unwrap();
            writer.write_all(data).unwrap();
        }
        writer.finish().unwrap().into_inner()
    }

    fn npy(descr: &str, data: &[u8]) -> Vec<u8> {
        let header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (1,), }}\n");
        let mut out = NPY_MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn plain_pickle() {
        let contents = scan_contents(ODICT_P4).unwrap();
        assert_eq!(contents.format, "pickle");
        assert_eq!(contents.parts[0].report.globals, odict());
    }

    #[test]
    fn allowlist_uses_manifest_globs() {
        let part = &scan_contents(ODICT_P4).unwrap().parts[0];
        assert_eq!(part.outside(&[]), ["collections.OrderedDict"]);
        assert!(part.outside(&["collections.*".into()]).is_empty());
        let ext = &scan_contents(b"\x80\x02\x82\x01)R.").unwrap().parts[0];
        assert_eq!(
            ext.outside(&["*".into()]).len(),
            1,
            "unresolved imports are never allowed"
        );
    }

    #[test]
    fn torch_zip_scans_every_pkl_member() {
        let file = zip_of(&[
            ("archive/data.pkl", ODICT_P4),
            ("archive/version", b"3\n"),
            ("archive/data/0", b"\xff\xff"),
            ("archive/extra.pkl", b"\x80\x02K\x01."),
        ]);
        let contents = scan_contents(&file).unwrap();
        assert_eq!(contents.format, "torch zip");
        let names: Vec<&str> = contents.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["archive/data.pkl", "archive/extra.pkl"]);
        assert_eq!(contents.parts[0].report.globals, odict());
        // red team 6, T2: torch reads `archive/data.PKL` as its pickle (case-insensitive lookup)
        let upper = scan_contents(&zip_of(&[("archive/data.PKL", ODICT_P4)])).unwrap();
        assert_eq!(upper.format, "torch zip");
        assert_eq!(upper.parts[0].report.globals, odict());
        let broken = zip_of(&[("archive/data.pkl", &ODICT_P4[..20])]);
        let err = scan_contents(&broken).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("archive/data.pkl: truncated pickle: input ends inside"),
            "{err}"
        );
    }

    #[test]
    fn npy_and_npz_object_arrays() {
        let object = npy("|O", ODICT_P4);
        let contents = scan_contents(&object).unwrap();
        assert_eq!(
            (contents.format, contents.parts[0].report.globals.clone()),
            ("npy", odict())
        );
        assert!(scan_contents(&npy("<f8", &[0u8; 8]))
            .unwrap()
            .parts
            .is_empty());
        let npz = zip_of(&[("a.npy", &npy("<f8", &[0u8; 8])), ("b.npy", &object)]);
        let contents = scan_contents(&npz).unwrap();
        assert_eq!(contents.format, "npz");
        assert_eq!(contents.parts.len(), 1);
        assert!(contents.parts[0]
            .name
            .starts_with("b.npy (object array at offset"));
        let err = scan_contents(&object[..12]).unwrap_err();
        assert!(
            err.to_string()
                .contains("bad .npy header: truncated inside the header"),
            "{err}"
        );
    }

    #[test]
    fn joblib_codecs() {
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(ODICT_P4).unwrap();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(ODICT_P4).unwrap();
        let mut bz2 = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        bz2.write_all(ODICT_P4).unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut Cursor::new(ODICT_P4), &mut xz).unwrap();
        let mut lzma = Vec::new();
        lzma_rs::lzma_compress(&mut Cursor::new(ODICT_P4), &mut lzma).unwrap();
        for (file, format) in [
            (zlib.finish().unwrap(), "joblib zlib"),
            (gzip.finish().unwrap(), "joblib gzip"),
            (bz2.finish().unwrap(), "joblib bz2"),
            (xz, "joblib xz"),
            (lzma, "joblib lzma"),
        ] {
            let contents = scan_contents(&file).unwrap();
            assert_eq!(
                (contents.format, contents.parts[0].report.globals.clone()),
                (format, odict())
            );
            let err = scan_contents(&file[..file.len() / 2]).unwrap_err();
            assert!(
                err.to_string().contains("cannot be decompressed")
                    || err.to_string().contains("truncated"),
                "{format}: {err}"
            );
        }
    }

    #[test]
    fn joblib_array_data_is_refused_not_misread() {
        let wrapper = b"\x80\x04\x8c\x13joblib.numpy_pickle\x8c\x11NumpyArrayWrapper\x93)\x81}b\x00\x01\x02\xff";
        let err = scan_contents(wrapper).unwrap_err();
        assert!(err.to_string().contains("NumpyArrayWrapper"), "{err}");
    }

    #[test]
    fn joblib_array_bytes_that_are_opcodes_to_pickle_load_are_reported() {
        let mut file = b"\x80\x04\x8c\x13joblib.numpy_pickle\x8c\x11NumpyArrayWrapper\x93)\x81}(\x8c\x05shapeK\x08\x85".to_vec();
        file.extend_from_slice(
            b"\x8c\x05dtype\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02u1\x89\x88\x87Rub",
        );
        file.extend_from_slice(b"cos\nsys\n.");
        let names: Vec<String> = scan_contents(&file).unwrap().parts[0]
            .report
            .globals
            .iter()
            .map(|(m, n)| format!("{m}.{n}"))
            .collect();
        assert_eq!(
            names,
            [
                "joblib.numpy_pickle.NumpyArrayWrapper",
                "numpy.dtype",
                "os.sys"
            ]
        );
    }

    #[test]
    fn every_pickle_to_the_end_of_the_file_is_scanned() {
        let mut two = ODICT_P4.to_vec();
        two.extend_from_slice(b"cos\nsystem\n.");
        let contents = scan_contents(&two).unwrap();
        let names: Vec<&str> = contents.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["", "pickle at offset 45"]);
        assert_eq!(
            contents.parts[1].report.globals,
            vec![("os".to_string(), "system".to_string())]
        );
        // bytes after a STOP that are not a pickle: an error, and what came before is kept
        let mut junk = b"cos\nsystem\n.".to_vec();
        junk.extend_from_slice(b"\x00\x00");
        let scanned = scan_all(&junk);
        let error = scanned.error.unwrap().to_string();
        assert_eq!(
            error,
            "pickle at offset 12: not a pickle: unknown opcode 0x00 at offset 0"
        );
        assert_eq!(
            scanned.contents.parts[0].report.globals,
            vec![("os".to_string(), "system".to_string())]
        );
    }

    #[test]
    fn torch_legacy_format_is_five_pickles_then_storage_bytes() {
        // torch.save({"w": torch.zeros(2)}, f, _use_new_zipfile_serialization=False), shortened
        let mut file = TORCH_LEGACY_MAGIC.to_vec();
        file.extend_from_slice(b"\x80\x02M\xe9\x03.\x80\x02}q\x00.");
        file.extend_from_slice(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00.\x80\x02]q\x00X\x01\x00\x00\x000q\x01a.");
        file.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe]);
        let contents = scan_contents(&file).unwrap();
        assert_eq!(
            (contents.format, contents.parts.len(), contents.raw_data),
            ("torch legacy", 5, 10)
        );
        assert_eq!(
            contents.parts[3].report.globals,
            vec![("torch._utils".to_string(), "_rebuild_tensor_v2".to_string())]
        );
        let err = scan_contents(&file[..TORCH_LEGACY_MAGIC.len() + 6]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn a_pickle_that_ends_in_a_zip_is_read_both_ways() {
        let mut polyglot = b"cos\nsystem\n.".to_vec();
        polyglot.extend(zip_of(&[("archive/data.pkl", ODICT_P4)]));
        let scanned = scan_all(&polyglot);
        assert_eq!(scanned.contents.format, "pickle + zip polyglot");
        let names: Vec<&str> = scanned
            .contents
            .parts
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["", "pickle at offset 12", "zip reading: archive/data.pkl"]
        );
        assert_eq!(scanned.contents.parts[2].report.globals, odict());
        assert!(
            scanned.error.is_some(),
            "the zip bytes after the pickle's STOP are no pickle"
        );
        // a pickle that merely holds the end-of-archive signature is no polyglot
        let mut odd = b"\x80\x03C\x04PK\x05\x06".to_vec();
        odd.extend_from_slice(b"0.");
        assert_eq!(scan_all(&odd).contents.format, "pickle");
    }

    #[test]
    fn files_scan_as_their_bytes_do() {
        let dir = std::env::temp_dir().join(format!("picklegate-container-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let checkpoint = zip_of(&[
            ("archive/data.pkl", ODICT_P4),
            ("archive/data/0", &[0xffu8; 4096]),
        ]);
        for (name, bytes) in [
            ("model.pt", checkpoint),
            ("plain.pkl", ODICT_P4.to_vec()),
            ("broken.pt", zip_of(&[("archive/data.pkl", &ODICT_P4[..9])])),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, &bytes).unwrap();
            let file = scan_path(&path).unwrap();
            assert_eq!(
                (file.sha256, file.size),
                (Digest::of(&bytes), bytes.len() as u64),
                "{name}"
            );
            assert_eq!(file.scanned, scan_all(&bytes), "{name}");
        }
        assert!(scan_path(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_prefix_of_every_container_errors_without_panic() {
        let files = [
            ODICT_P4.to_vec(),
            zip_of(&[("archive/data.pkl", ODICT_P4)]),
            npy("|O", ODICT_P4),
        ];
        for file in &files {
            for cut in 0..file.len() {
                assert!(
                    scan_contents(&file[..cut]).is_err(),
                    "prefix {cut} of a {}-byte file scanned clean",
                    file.len()
                );
            }
        }
        assert!(matches!(
            scan_contents(b"\xffgarbage"),
            Err(ContainerError::Pickle {
                error: ScanError::UnknownOpcode { offset: 0, .. },
                ..
            })
        ));
    }
}
