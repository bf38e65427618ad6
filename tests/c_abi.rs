//! The C ABI from C and C++: compiles tests/c/*.{c,cpp} against
//! include/tessera.h, links the cdylib that cargo built, runs them (each in
//! its own process: the global allocator is configured once per process).

use std::path::{Path, PathBuf};
use std::process::Command;

fn lib_dir() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    assert!(
        dir.join("libtessera.so").exists(),
        "libtessera.so not found in {}: run `cargo build --release` first (tests/run.sh does)",
        dir.display()
    );
    dir
}

fn build_and_run(source: &str, compiler: &str, expect: &str) {
    build_and_run_with(source, compiler, expect, &[]);
}

fn build_and_run_with(source: &str, compiler: &str, expect: &str, args: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let out = std::env::temp_dir().join(format!("tessera_{}_{}", std::process::id(), source.replace(['/', '.'], "_")));
    let status = Command::new(compiler)
        .args(["-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(root.join("include"))
        .arg(root.join(source))
        .arg("-o")
        .arg(&out)
        .arg("-L")
        .arg(&lib)
        .arg("-ltessera")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-ldl")
        .arg("-pthread")
        .arg("-lm")
        .status()
        .expect("compiler runs");
    assert!(status.success(), "{compiler} failed on {source}");
    let run = Command::new(&out).args(args).env_remove("TESSERA_CONF").output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{source}: {:?}\n{stdout}\n{}", run.status, String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains(expect), "{source} printed {stdout}");
    let _ = std::fs::remove_file(out);
}

#[test]
fn c_program_allocates_writes_frees_on_the_host_backend() {
    build_and_run("tests/c/host_smoke.c", "cc", "C ABI OK");
}

#[test]
fn cxx_program_catches_the_oom_exception_and_goes_on() {
    build_and_run("tests/c/oom_throws.cpp", "c++", "C++ OOM OK");
}

#[test]
fn without_the_driver_the_error_is_clear_and_calm() {
    build_and_run("tests/c/no_driver.c", "cc", "NO DRIVER OK");
}

#[test]
fn two_copies_of_the_library_stay_independent() {
    let lib = lib_dir().join("libtessera.so");
    let copy = std::env::temp_dir().join(format!("libtessera_copy_{}.so", std::process::id()));
    std::fs::copy(&lib, &copy).unwrap();
    build_and_run_with("tests/c/loaded_twice.c", "cc", "LOADED TWICE OK", &[lib.to_str().unwrap(), copy.to_str().unwrap()]);
    let _ = std::fs::remove_file(copy);
}

#[test]
fn every_function_survives_hostile_arguments_from_eight_threads() {
    build_and_run("tests/c/hostile.c", "cc", "HOSTILE OK");
}

#[test]
fn a_forked_child_gets_a_clear_error() {
    build_and_run("tests/c/fork_child.c", "cc", "FORK OK");
}

#[test]
fn unloading_gives_everything_back_and_exit_leaves_it_alone() {
    // 1,000 dlopen/dlclose cycles with allocations between: flat address
    // space, RSS and descriptors (the program checks and prints them).
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir().join("libtessera.so");
    let exe = std::env::temp_dir().join(format!("tessera_unload_{}", std::process::id()));
    let status = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-O1"])
        .arg(root.join("tests/c/unload_cycles.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(status.success());
    let run = Command::new(&exe).arg(&lib).arg("1000").env_remove("TESSERA_CONF").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success() && stdout.contains("UNLOAD OK"), "{:?}\n{stdout}\n{stderr}", run.status);
    println!("{stdout}");
    // Said once: at the unload with a live block; not at exit.
    let said: Vec<&str> = stderr.lines().filter(|l| l.contains("still live")).collect();
    assert_eq!(said, ["tessera: unloaded with 1 blocks (64.00 KiB) still live on device 0; their memory stays mapped"], "{stderr}");
    // With the driver thread: each cycle starts it and the unload joins it
    // (a thread left behind would keep its stack mapped: VmSize grows).
    let run = Command::new(&exe).arg(&lib).arg("300").arg("backend:host,driver_thread:true").env_remove("TESSERA_CONF").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success() && stdout.contains("UNLOAD OK"), "{:?}\n{stdout}\n{stderr}", run.status);
    println!("{stdout}");
    let _ = std::fs::remove_file(exe);
}

#[test]
fn committed_header_matches_the_source() {
    // build.rs rewrites include/tessera.h when the source changes: a header
    // that differs from git's copy means it was not committed.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Ok(out) = Command::new("git").arg("-C").arg(root).args(["diff", "--quiet", "--", "include/tessera.h"]).status() else {
        panic!("git is needed to check the committed header");
    };
    assert!(out.success(), "include/tessera.h differs from the committed one: commit the regenerated header");
}

#[test]
fn the_header_holds_the_public_abi_only() {
    // Every function it declares is one the library exports, no symbol the
    // library itself imports (`extern`), no test support (the fault
    // injector's codes and types), no opaque type a C caller cannot use.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = std::fs::read_to_string(root.join("include/tessera.h")).unwrap();
    let lib = lib_dir().join("libtessera.so");
    let nm = Command::new("nm").args(["-D", "--defined-only"]).arg(&lib).output().expect("nm runs");
    let exported = String::from_utf8_lossy(&nm.stdout);
    let exported: Vec<&str> = exported.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    let mut functions = 0;
    for line in header.lines().map(str::trim) {
        assert!(!line.starts_with("extern ") || line == "extern \"C\" {", "the header declares an import of the library: {line}");
        if let Some(name) = line.strip_prefix("#define ") {
            let name = name.split_whitespace().next().unwrap();
            assert!(name.starts_with("TESSERA_"), "a define outside the TESSERA_ prefix: {line}");
        }
        if let Some(rest) = line.strip_prefix("typedef struct ") {
            // `typedef struct X X;` declares a type the header never completes.
            let words: Vec<&str> = rest.trim_end_matches(';').split_whitespace().collect();
            assert!(!(words.len() == 2 && words[0] == words[1]), "an opaque type in the header: {line}");
        }
        if let Some(open) = line.find("tessera_").filter(|_| line.ends_with(");") && !line.starts_with('*')) {
            let name: String = line[open..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            assert!(exported.contains(&name.as_str()), "{name} is declared but not exported");
            functions += 1;
        }
    }
    assert!(functions >= 25, "only {functions} functions found in the header");
}
