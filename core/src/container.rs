//! Finds the pickles inside the files that carry them (torch zip checkpoints, .npz, .npy object
//! arrays, joblib files plain or compressed) and scans each one statically, running nothing.

use crate::callsite::global_matches;
use crate::scan::{Progress, Report, ScanError, Scanner, JOBLIB_ARRAY_WRAPPER};
use std::fmt;
use std::io::{Cursor, Read};

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// One pickle found in a file: `name` is the archive member, or empty for the file itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub report: Report,
}

impl Part {
    /// The globals no `allow` pattern matches, then the imports no static scan can name.
    pub fn outside(&self, allow: &[String]) -> Vec<String> {
        let globals = self.report.globals.iter().filter(|(m, n)| !allow.iter().any(|p| global_matches(p, m, n)));
        globals.map(|(m, n)| format!("{m}.{n}")).chain(self.report.unresolved.iter().cloned()).collect()
    }
}

/// What a file is, and every pickle in it (none for a numeric .npy/.npz).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub format: &'static str,
    pub parts: Vec<Part>,
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
    ContainerError::Format { part: part.to_string(), problem: problem.into() }
}

/// The compression joblib used, told by the magic bytes its compressors write.
fn joblib_codec(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [0x78, second, ..] if (0x78u16 * 256 + *second as u16) % 31 == 0 => Some("zlib"),
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
        "zlib" => flate2::read::ZlibDecoder::new(bytes).read_to_end(&mut out).map(drop).map_err(|e| e.to_string()),
        "gzip" => flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out).map(drop).map_err(|e| e.to_string()),
        "bz2" => bzip2::read::MultiBzDecoder::new(bytes).read_to_end(&mut out).map(drop).map_err(|e| e.to_string()),
        "xz" => lzma_rs::xz_decompress(&mut Cursor::new(bytes), &mut out).map_err(|e| e.to_string()),
        _ => lzma_rs::lzma_decompress(&mut Cursor::new(bytes), &mut out).map_err(|e| e.to_string()),
    };
    result.map(|()| out).map_err(|e| format!("{codec} stream cannot be decompressed: {e}"))
}

fn finish(scanner: &mut Scanner, bytes: &[u8]) -> Result<Report, ScanError> {
    match scanner.feed(bytes)? {
        Progress::Done(report) => Ok(report),
        Progress::NeedMore(_) => Err(scanner.truncation(bytes)),
    }
}

/// Scans one pickle. A stream joblib may load, and that imports joblib's NumpyArrayWrapper, is
/// read both as `joblib.load` reads it (array bytes after each wrapper) and as `pickle.load` does,
/// up to where that fails; the globals of both readings are reported. Without the wrapper the two
/// readings are the same.
fn scan_pickle(part: &str, bytes: &[u8], maybe_joblib: bool) -> Result<Part, ContainerError> {
    let broken = |error| ContainerError::Pickle { part: part.to_string(), error };
    let mut plain = Scanner::default();
    let plain_result = finish(&mut plain, bytes);
    let plain_report = match &plain_result {
        Ok(report) => report,
        Err(_) => plain.partial_report(),
    };
    let (module, name) = JOBLIB_ARRAY_WRAPPER;
    let has_wrapper = plain_report.globals.iter().any(|(m, n)| m == module && n == name);
    if !(maybe_joblib && has_wrapper) {
        return plain_result.map(|report| Part { name: part.to_string(), report }).map_err(broken);
    }
    let mut report = finish(&mut Scanner::for_joblib(), bytes).map_err(broken)?;
    for global in &plain_report.globals {
        if !report.globals.contains(global) {
            report.globals.push(global.clone());
        }
    }
    for import in &plain_report.unresolved {
        if !report.unresolved.contains(import) {
            report.unresolved.push(import.clone());
        }
    }
    Ok(Part { name: part.to_string(), report })
}

/// The pickle of an object array in a .npy (none for numeric arrays).
fn scan_npy(part: &str, bytes: &[u8]) -> Result<Option<Part>, ContainerError> {
    let bad = |problem: &str| format_error(part, format!("bad .npy header: {problem}"));
    let major = *bytes.get(NPY_MAGIC.len()).ok_or_else(|| bad("truncated before the version"))?;
    let (len_at, len_width) = match major {
        1 => (8, 2),
        2 | 3 => (8, 4),
        other => return Err(bad(&format!("unknown version {other}"))),
    };
    let len_bytes = bytes.get(len_at..len_at + len_width).ok_or_else(|| bad("truncated before the header length"))?;
    let header_len = len_bytes.iter().rev().fold(0usize, |acc, &b| (acc << 8) | b as usize);
    let data_at = len_at + len_width + header_len;
    let header = bytes.get(len_at + len_width..data_at).ok_or_else(|| bad("truncated inside the header"))?;
    let header = String::from_utf8_lossy(header);
    if !header.contains("'descr'") {
        return Err(bad("no 'descr' key"));
    }
    if !header.contains("'|O'") {
        return Ok(None);
    }
    let name = if part.is_empty() { format!("object array at offset {data_at}") } else { format!("{part} (object array at offset {data_at})") };
    scan_pickle(&name, &bytes[data_at..], false).map(Some)
}

fn scan_zip(bytes: &[u8]) -> Result<Contents, ContainerError> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format_error("", format!("not a readable zip archive: {e}")))?;
    let mut parts = Vec::new();
    let mut format = "zip";
    for index in 0..archive.len() {
        let mut member = archive.by_index(index).map_err(|e| format_error("", format!("zip member {index}: {e}")))?;
        let name = member.name().to_string();
        let is_pickle = name.ends_with(".pkl");
        if !is_pickle && !name.ends_with(".npy") {
            continue;
        }
        let mut data = Vec::new();
        member.read_to_end(&mut data).map_err(|e| format_error(&name, format!("cannot read the zip member: {e}")))?;
        if is_pickle {
            format = "torch zip";
            parts.push(scan_pickle(&name, &data, false)?);
        } else {
            format = if format == "zip" { "npz" } else { format };
            parts.extend(scan_npy(&name, &data)?);
        }
    }
    Ok(Contents { format, parts })
}

/// Scans every pickle in `bytes`, whatever carries it.
pub fn scan_contents(bytes: &[u8]) -> Result<Contents, ContainerError> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return scan_zip(bytes);
    }
    if bytes.starts_with(NPY_MAGIC) {
        return Ok(Contents { format: "npy", parts: scan_npy("", bytes)?.into_iter().collect() });
    }
    if let Some(codec) = joblib_codec(bytes) {
        let part = format!("{codec}-decompressed stream");
        let inner = decompress(codec, bytes).map_err(|problem| format_error("", problem))?;
        let format = match codec {
            "zlib" => "joblib zlib",
            "gzip" => "joblib gzip",
            "bz2" => "joblib bz2",
            "xz" => "joblib xz",
            _ => "joblib lzma",
        };
        return Ok(Contents { format, parts: vec![scan_pickle(&part, &inner, true)?] });
    }
    Ok(Contents { format: "pickle", parts: vec![scan_pickle("", bytes, true)?] })
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
            writer.start_file(*name, zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored)).unwrap();
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
        assert_eq!(ext.outside(&["*".into()]).len(), 1, "unresolved imports are never allowed");
    }

    #[test]
    fn torch_zip_scans_every_pkl_member() {
        let file = zip_of(&[("archive/data.pkl", ODICT_P4), ("archive/version", b"3\n"), ("archive/data/0", b"\xff\xff"), ("archive/extra.pkl", b"\x80\x02K\x01.")]);
        let contents = scan_contents(&file).unwrap();
        assert_eq!(contents.format, "torch zip");
        let names: Vec<&str> = contents.parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["archive/data.pkl", "archive/extra.pkl"]);
        assert_eq!(contents.parts[0].report.globals, odict());
        let broken = zip_of(&[("archive/data.pkl", &ODICT_P4[..20])]);
        let err = scan_contents(&broken).unwrap_err();
        assert!(err.to_string().starts_with("archive/data.pkl: truncated pickle: input ends inside"), "{err}");
    }

    #[test]
    fn npy_and_npz_object_arrays() {
        let object = npy("|O", ODICT_P4);
        let contents = scan_contents(&object).unwrap();
        assert_eq!((contents.format, contents.parts[0].report.globals.clone()), ("npy", odict()));
        assert!(scan_contents(&npy("<f8", &[0u8; 8])).unwrap().parts.is_empty());
        let npz = zip_of(&[("a.npy", &npy("<f8", &[0u8; 8])), ("b.npy", &object)]);
        let contents = scan_contents(&npz).unwrap();
        assert_eq!(contents.format, "npz");
        assert_eq!(contents.parts.len(), 1);
        assert!(contents.parts[0].name.starts_with("b.npy (object array at offset"));
        let err = scan_contents(&object[..12]).unwrap_err();
        assert!(err.to_string().contains("bad .npy header: truncated inside the header"), "{err}");
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
            assert_eq!((contents.format, contents.parts[0].report.globals.clone()), (format, odict()));
            let err = scan_contents(&file[..file.len() / 2]).unwrap_err();
            assert!(err.to_string().contains("cannot be decompressed") || err.to_string().contains("truncated"), "{format}: {err}");
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
        file.extend_from_slice(b"\x8c\x05dtype\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02u1\x89\x88\x87Rub");
        file.extend_from_slice(b"cos\nsys\n.");
        let names: Vec<String> = scan_contents(&file).unwrap().parts[0].report.globals.iter().map(|(m, n)| format!("{m}.{n}")).collect();
        assert_eq!(names, ["joblib.numpy_pickle.NumpyArrayWrapper", "numpy.dtype", "os.sys"]);
    }

    #[test]
    fn every_prefix_of_every_container_errors_without_panic() {
        let files = [ODICT_P4.to_vec(), zip_of(&[("archive/data.pkl", ODICT_P4)]), npy("|O", ODICT_P4)];
        for file in &files {
            for cut in 0..file.len() {
                assert!(scan_contents(&file[..cut]).is_err(), "prefix {cut} of a {}-byte file scanned clean", file.len());
            }
        }
        assert!(matches!(scan_contents(b"\xffgarbage"), Err(ContainerError::Pickle { error: ScanError::UnknownOpcode { offset: 0, .. }, .. })));
    }
}
