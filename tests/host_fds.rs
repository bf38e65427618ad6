//! The host backend's file descriptors, alone in this test binary: the
//! process's descriptor count is what it checks, and other tests in the same
//! process would open and close their own meanwhile.

mod common;
use common::*;

#[test]
fn handles_cost_no_file_descriptor_each() {
    // One memfd per device: 3,000 live handles (the default soft limit of
    // open files is 1,024) leave the process's descriptors as they were.
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let (a, _) = host("page_size:64K,max_handle_size:64K,growth_size:0,device_capacity:1G");
    let before = fds();
    let blocks: Vec<u64> = (0..3000).map(|i| a.malloc(64 << 10, 0, i % 4).unwrap()).collect();
    for (i, &p) in blocks.iter().enumerate() {
        fill(p, 64 << 10, i as u64);
    }
    assert!(a.stats(0).unwrap().gauge(tessera::stats::TesseraGauge::Handles).current >= 3000);
    assert!(fds() <= before + 1, "{} descriptors for 3,000 handles", fds() - before);
    for (i, &p) in blocks.iter().enumerate() {
        assert!(verify(p, 64 << 10, i as u64), "block {i} overwritten");
    }
    for (i, &p) in blocks.iter().enumerate() {
        a.free(p, None, 0, Some(i as u64 % 4)).unwrap();
    }
    a.empty_cache().unwrap();
    check(&a, 0);
}
