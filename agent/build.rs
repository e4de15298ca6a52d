// SPDX-License-Identifier: Apache-2.0
//! Embeds the kernel object that `cargo xtask build-ebpf` produced.
//!
//! `METADATA_GUARD_EBPF_OBJECT` names another object (the xtask uses it for the
//! test-variant build); otherwise the default release build is taken.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=METADATA_GUARD_EBPF_OBJECT");
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let object = match env::var_os("METADATA_GUARD_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => manifest_dir.join("../target/ebpf/bpfel-unknown-none/release/metadata-guard-ebpf"),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    let bytes = fs::read(&object).unwrap_or_else(|e| {
        panic!(
            "\n\nmetadata-guard embeds its kernel programs, but {} could not be read: {e}.\n\
             Build them first with `cargo xtask build-ebpf` (or use `cargo xtask build`, \
             `cargo xtask run` or `cargo xtask test`, which do it for you).\n\n",
            object.display()
        )
    });
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("metadata-guard.bpf.o");
    fs::write(&out, bytes).expect("write the kernel object into OUT_DIR");
}
