//! libFuzzer target: input bytes decode (tests/fault_ops::decode, no
//! `arbitrary`) into a setup and operations, run under FaultyBackend on the
//! host backend with the checks of tests/faults.rs; any panic is a finding.
//! Single-fault model unless TESSERA_FUZZ_MULTI=1 (which hits known bugs:
//! see the ignored tests of tests/faults.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/fault_ops/mod.rs"]
mod fault_ops;

fuzz_target!(|data: &[u8]| {
    let (mut setup, ops) = fault_ops::decode(data);
    setup.single_fault = std::env::var_os("TESSERA_FUZZ_MULTI").is_none();
    fault_ops::run(&setup, &ops);
});
