//! Consistent hashing, ketama style: each shard owns points on a ring of 2³² positions, placed
//! by MD5 of its name; a key belongs to the first point at or after its hash. Adding or removing
//! one of N shards moves about 1/N of the keys, and only to or from that shard.
//!
//! The placement is the one twemproxy computes for a `ketama` pool with the same `hash` (160
//! points per shard at equal weights, four points per MD5 digest, the name `host:port` unless
//! one is given): an application can move from twemproxy to the ambassador, or back, without
//! its keys changing shards. The e2e suite checks that against `nutcracker`.

use md5::{Digest, Md5};

/// Points per shard at equal weights.
const POINTS_PER_SHARD: f32 = 160.0;
/// Points made from one MD5 digest (16 bytes, 4 per point).
const POINTS_PER_HASH: u32 = 4;

/// How keys are hashed onto the ring: twemproxy's names and functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hash {
    /// FNV-1a, 32 bits: spreads keys that differ in their last character (`user:1`,
    /// `user:2`) across the ring. The default.
    #[default]
    Fnv1a32,
    /// twemproxy's `fnv1a_64` (its default): FNV-1a with the 64-bit offset basis and prime,
    /// kept to 32 bits. Its prime keeps only 9 bits, so keys that differ in their last
    /// characters land near each other, often on one shard: use it to keep a twemproxy pool's
    /// placement.
    Fnv1a64,
    /// The first four bytes of the key's MD5 (twemproxy's `md5`).
    Md5,
}

impl Hash {
    pub fn parse(name: &str) -> Option<Hash> {
        match name {
            "fnv1a_32" => Some(Hash::Fnv1a32),
            "fnv1a_64" => Some(Hash::Fnv1a64),
            "md5" => Some(Hash::Md5),
            _ => None,
        }
    }

    /// The hash of a key (its hashed part: see [`hashed_part`]).
    pub fn of(self, key: &[u8]) -> u32 {
        match self {
            Hash::Fnv1a32 => key.iter().fold(0x811c_9dc5, |h: u32, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193)),
            Hash::Fnv1a64 => {
                const OFFSET: u32 = 0xcbf2_9ce4_8422_2325_u64 as u32;
                const PRIME: u32 = 0x0000_0100_0000_01b3_u64 as u32;
                key.iter().fold(OFFSET, |h, &b| (h ^ u32::from(b)).wrapping_mul(PRIME))
            }
            Hash::Md5 => {
                let d = Md5::digest(key);
                u32::from_le_bytes([d[0], d[1], d[2], d[3]])
            }
        }
    }
}

/// The part of a key that is hashed: with the tag `{}`, `user:{42}:name` hashes as `42`, so
/// keys that share a tag live on one shard (what multi-key commands need). No tag, or an empty
/// one (`{}`), hashes the whole key.
pub fn hashed_part(key: &[u8], tag: Option<(u8, u8)>) -> &[u8] {
    let Some((open, close)) = tag else { return key };
    let Some(start) = memchr::memchr(open, key) else { return key };
    match memchr::memchr(close, &key[start + 1..]) {
        Some(len) if len > 0 => &key[start + 1..start + 1 + len],
        _ => key,
    }
}

/// The ring over the shards that are in it (the live ones, when ejection is on).
#[derive(Debug, Clone, Default)]
pub struct Ring {
    /// (position, shard index), sorted by position.
    points: Vec<(u32, u32)>,
}

impl Ring {
    /// A ring of the shards `(index, name, weight)` given.
    pub fn new<'a>(shards: impl IntoIterator<Item = (usize, &'a str, u32)>) -> Ring {
        let shards: Vec<(usize, &str, u32)> = shards.into_iter().filter(|s| s.2 > 0).collect();
        let total: u32 = shards.iter().map(|s| s.2).sum();
        let live = shards.len() as f32;
        let mut points = Vec::with_capacity(shards.len() * POINTS_PER_SHARD as usize);
        for &(index, name, weight) in &shards {
            let share = weight as f32 / total as f32;
            // The same float steps as twemproxy, so that weights round the same way.
            let count = (((share * POINTS_PER_SHARD / 4.0 * live) as f64 + 0.000_000_000_1) as f32).floor() as u32 * 4;
            for i in 0..count / POINTS_PER_HASH {
                let digest = Md5::digest(format!("{name}-{i}").as_bytes());
                for j in 0..4 {
                    let b = &digest[j * 4..j * 4 + 4];
                    let position = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    points.push((position, index as u32));
                }
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The shard of a key's hash, or `None` when no shard is in the ring.
    pub fn shard(&self, hash: u32) -> Option<usize> {
        let at = self.points.partition_point(|p| p.0 < hash);
        let point = self.points.get(at).or_else(|| self.points.first())?;
        Some(point.1 as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:6379")).collect()
    }

    fn ring(names: &[String]) -> Ring {
        Ring::new(names.iter().enumerate().map(|(i, n)| (i, n.as_str(), 1)))
    }

    fn keys() -> impl Iterator<Item = Vec<u8>> {
        (0..30_000).map(|i| format!("key:{i}").into_bytes())
    }

    fn hash(key: &[u8]) -> u32 {
        Hash::default().of(key)
    }

    #[test]
    fn the_hashes_are_twemproxys() {
        // Published FNV-1a 32 test vectors.
        assert_eq!(Hash::Fnv1a32.of(b""), 0x811c_9dc5);
        assert_eq!(Hash::Fnv1a32.of(b"a"), 0xe40c_292c);
        assert_eq!(Hash::Fnv1a32.of(b"foobar"), 0xbf9c_f968);
        // twemproxy's fnv1a_64, kept to 32 bits, computed from its definition.
        assert_eq!(Hash::Fnv1a64.of(b""), 0x8422_2325);
        assert_eq!(Hash::Fnv1a64.of(b"a"), (0x8422_2325u32 ^ 0x61).wrapping_mul(0x1b3));
        // MD5("") = d41d8cd9…: its first four bytes, little-endian.
        assert_eq!(Hash::Md5.of(b""), 0xd98c_1dd4);
        assert_eq!(Hash::parse("fnv1a_64"), Some(Hash::Fnv1a64));
        assert_eq!(Hash::parse("murmur"), None);
    }

    #[test]
    fn twemproxys_fnv1a_64_puts_neighbouring_keys_together_and_fnv1a_32_does_not() {
        let three = ring(&names(3));
        let shards_of =
            |h: Hash| (0..10).map(|i| three.shard(h.of(format!("user:{i}").as_bytes())).unwrap()).collect::<std::collections::HashSet<_>>();
        assert_eq!(shards_of(Hash::Fnv1a64).len(), 1, "ten neighbours, one shard");
        assert_eq!(shards_of(Hash::Fnv1a32).len(), 3);
        assert_eq!(shards_of(Hash::Md5).len(), 3);
    }

    #[test]
    fn keys_spread_evenly_and_a_new_shard_takes_about_its_share() {
        let three = ring(&names(3));
        let mut counts = [0usize; 3];
        for key in keys() {
            counts[three.shard(hash(&key)).unwrap()] += 1;
        }
        for c in counts {
            assert!((7_000..13_000).contains(&c), "each of 3 shards holds about a third: {counts:?}");
        }
        let four = ring(&names(4));
        let mut moved = 0;
        for key in keys() {
            let (before, after) = (three.shard(hash(&key)).unwrap(), four.shard(hash(&key)).unwrap());
            if before != after {
                assert_eq!(after, 3, "a key only ever moves to the new shard");
                moved += 1;
            }
        }
        assert!((4_500..10_500).contains(&moved), "about 1/4 of the keys move: {moved}");
    }

    #[test]
    fn weights_and_removal() {
        let names = names(2);
        let heavy = Ring::new([(0, names[0].as_str(), 3), (1, names[1].as_str(), 1)]);
        let on_first = keys().filter(|k| heavy.shard(hash(k)) == Some(0)).count();
        assert!((19_000..26_000).contains(&on_first), "weight 3 of 4 holds about 3/4: {on_first}");
        let alone = Ring::new([(1, names[1].as_str(), 1)]);
        assert!(keys().all(|k| alone.shard(hash(&k)) == Some(1)));
        assert_eq!(Ring::new([]).shard(1), None);
    }

    #[test]
    fn hash_tags_pick_the_hashed_part() {
        let tag = Some((b'{', b'}'));
        assert_eq!(hashed_part(b"user:{42}:name", tag), b"42");
        assert_eq!(hashed_part(b"user:{}:name", tag), b"user:{}:name", "an empty tag hashes the whole key");
        assert_eq!(hashed_part(b"user:{42", tag), b"user:{42");
        assert_eq!(hashed_part(b"{a}{b}", tag), b"a");
        assert_eq!(hashed_part(b"user:{42}", None), b"user:{42}");
    }
}
