//! SHA-256 digests as the manifest names them: 32 bytes, written as 64 lower-case hex digits.
//! One hashing routine for every caller, so `picklegate hash` and the load path always agree.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::io::{self, Read};

const NOT_HEX: u8 = 0xff;

/// The value of each hex digit (either case), `NOT_HEX` for any other byte: a table, because a
/// million-entry manifest parses 64 million of them.
const HEX_VALUE: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// A SHA-256 digest of the exact bytes an unpickler would read.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Hashes a complete buffer.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    /// Hashes everything a reader yields (used by the CLI for files of any size).
    pub fn of_reader(mut reader: impl Read) -> io::Result<Self> {
        let mut hasher = Hasher::default();
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => hasher.update(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(hasher.finish())
    }

    /// Parses 64 hex digits, with or without a `sha256:` prefix.
    pub fn parse(text: &str) -> Result<Self, DigestError> {
        let hex_part = text.strip_prefix("sha256:").unwrap_or(text);
        if hex_part.len() != 64 {
            return Err(DigestError::WrongLength(hex_part.len()));
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex_part.as_bytes().chunks_exact(2)) {
            let (high, low) = (HEX_VALUE[pair[0] as usize], HEX_VALUE[pair[1] as usize]);
            if (high | low) == NOT_HEX {
                return Err(DigestError::NotHex);
            }
            *byte = (high << 4) | low;
        }
        Ok(Digest(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

/// A digest computed piece by piece, for bytes that arrive in chunks (hashed while still in cache).
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestError {
    WrongLength(usize),
    NotHex,
}

impl fmt::Display for DigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DigestError::WrongLength(n) => {
                write!(
                    f,
                    "expected 64 hex digits of a sha256, found {n} characters"
                )
            }
            DigestError::NotHex => f.write_str("expected 64 hex digits (0-9, a-f) of a sha256"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_matches_sha256sum() {
        // printf abc | sha256sum
        assert_eq!(
            Digest::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn reader_and_buffer_agree() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(Digest::of(&data), Digest::of_reader(&data[..]).unwrap());
    }

    #[test]
    fn parse_accepts_prefix_and_rejects_bad_input() {
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(Digest::parse(hex).unwrap(), Digest::of(b"abc"));
        assert_eq!(
            Digest::parse(&format!("sha256:{hex}")).unwrap(),
            Digest::of(b"abc")
        );
        assert_eq!(Digest::parse("abc"), Err(DigestError::WrongLength(3)));
        assert_eq!(Digest::parse(&"zz".repeat(32)), Err(DigestError::NotHex));
    }
}
