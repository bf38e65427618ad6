//! libFuzzer target: input bytes as a trace file (plain, or gzip when they
//! start with its magic), parsed and, when they parse, replayed on the sim
//! backend under a small capacity, as tessera-replay would. Any panic, or a
//! parse that takes more memory than its bound, is a finding; errors are
//! answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera::config::Config;

fuzz_target!(|data: &[u8]| {
    let events = if data.starts_with(&[0x1f, 0x8b]) {
        tessera::trace::parse(flate2::read::GzDecoder::new(data))
    } else {
        tessera::trace::parse(data)
    };
    let Ok(mut events) = events else { return };
    events.truncate(2000);
    let config = Config::parse("growth_size:0").unwrap();
    if let Ok(r) = tessera::replay::replay(&events, &config, Some(64 << 20)) {
        let _ = tessera::replay::report_json(&r, None, Some(64 << 20));
        let _ = tessera::replay::block_map(&r, 2 << 20);
    }
    let _ = tessera::replay::peak_live_bytes(&events);
});
