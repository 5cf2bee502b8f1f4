//! Builds the LD_PRELOAD library (crate `picklegate-preload`) with the extension and copies it
//! into `python/picklegate/`, so maturin ships it in the wheel beside `_core`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const LIBRARY: &str = "libpicklegate_preload.so";

fn main() {
    println!("cargo:rerun-if-changed=preload/src");
    println!("cargo:rerun-if-changed=python/picklegate/_startup.py"); // embedded in the preload
    println!("cargo:rerun-if-changed=preload/Cargo.toml");
    println!("cargo:rerun-if-changed=preload/Cargo.lock");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return; // LD_PRELOAD with an ELF constructor: Linux only
    }
    let root =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("preload");
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            &target,
            "--target-dir",
        ])
        .arg(&out)
        .arg("--manifest-path")
        .arg(root.join("preload").join("Cargo.toml"));
    let status = cargo
        .status()
        .expect("cannot run cargo to build the preload library");
    assert!(
        status.success(),
        "building picklegate-preload failed ({status})"
    );
    let built = out.join(&target).join("release").join(LIBRARY);
    let dest = root.join("python").join("picklegate").join(LIBRARY);
    // Copy, then rename: a running process may have the previous library mapped.
    let partial = dest.with_extension("so.partial");
    std::fs::copy(&built, &partial)
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
    std::fs::rename(&partial, &dest)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}
