//! The address hasher of the pool's live map and the front caches' lists:
//! one multiply (Fibonacci hashing). Addresses and (stream, size) keys are
//! not attacker-chosen, and SipHash's cost is most of a cached malloc+free
//! pair.
#![forbid(unsafe_code)]

/// Builds [`AddrHasher`]s: the `S` of `HashMap<K, V, AddrHash>`.
#[derive(Clone, Copy, Default)]
pub struct AddrHash;

/// The hasher's state: the mix of the keys written so far.
pub struct AddrHasher(u64);

impl std::hash::BuildHasher for AddrHash {
    type Hasher = AddrHasher;
    fn build_hasher(&self) -> AddrHasher {
        AddrHasher(0)
    }
}

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        // Blocks are 512-aligned: drop the zero bits, then spread. Mixing in
        // the previous state lets (stream, size) keys hash both fields.
        self.0 = (self.0 ^ (x >> 9)).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
}
