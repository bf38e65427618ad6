//! Build script: generates `include/tessera.h` with cbindgen (rewritten only
//! when its text changes, so the committed header stays the source of
//! truth and CI can diff it), then compiles the C++ shim that turns
//! allocation failures into exceptions for PyTorch.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    // cbindgen reads every module (a public constant anywhere lands in the
    // header), so any change under src/ regenerates it.
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");

    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let header = root.join("include/tessera.h");
    match cbindgen::Builder::new().with_crate(&root).with_config(config).generate() {
        Ok(bindings) => {
            let mut text = Vec::new();
            bindings.write(&mut text);
            if std::fs::read(&header).ok().as_deref() != Some(&text[..]) {
                std::fs::create_dir_all(root.join("include")).unwrap();
                std::fs::write(&header, &text).unwrap();
            }
        }
        Err(e) => panic!("cbindgen failed: {e}"),
    }

    cc::Build::new().cpp(true).file("src/shim.cpp").flag_if_supported("-std=c++17").compile("tessera_shim");
}
