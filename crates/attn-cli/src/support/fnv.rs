//! FNV-1a (64-bit): the fingerprints in saved training states, the demo's per-word seeds, and
//! the digests that pin generated data in tests.

/// FNV-1a of `bytes`.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::fnv1a;

    /// The published FNV-1a 64 test vectors: the fingerprints in saved states are this hash, so
    /// a change to it would make every saved run unresumable.
    #[test]
    fn fnv1a_is_the_published_hash() {
        assert_eq!(fnv1a(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(*b"foobar"), 0x8594_4171_f739_67e8);
    }
}
