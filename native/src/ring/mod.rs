//! The consistent hash ring of DESIGN.md "Hash ring", in plain Rust.
//!
//! Owns token placement, owner lookup, successor walks and key-space shares.
//! Nodes are known by rank (their index in the sorted list of node ids), so the
//! edge in `python.rs` can keep one cached Python string per rank.

pub mod python;

use std::fmt;

use xxhash_rust::xxh3::xxh3_64;

/// The most tokens a node may hold; far above any useful count, low enough
/// that a typo cannot make `add_node` hash billions of tokens.
pub const MAX_TOKENS_PER_NODE: u64 = 65_536;

/// Where a user sits on the ring: xxh3_64 of the id as 8 little-endian bytes.
#[inline]
pub fn key_position(user_id: u64) -> u64 {
    xxh3_64(&user_id.to_le_bytes())
}

/// Where token `index` of `node_id` sits: xxh3_64 of `utf8(node_id + "#" + index)`.
pub fn token_position(node_id: &str, index: u64) -> u64 {
    xxh3_64(format!("{node_id}#{index}").as_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// `tokens_per_node` outside `1..=MAX_TOKENS_PER_NODE`.
    BadTokensPerNode(u64),
    EmptyNodeId,
    DuplicateNode(String),
    UnknownNode(String),
    /// The ring has no nodes, so no user has an owner.
    Empty,
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::BadTokensPerNode(n) => {
                write!(
                    f,
                    "tokens_per_node must be in 1..{MAX_TOKENS_PER_NODE}, got {n}"
                )
            }
            RingError::EmptyNodeId => write!(f, "node id must not be empty"),
            RingError::DuplicateNode(id) => write!(f, "node {id:?} is already on the ring"),
            RingError::UnknownNode(id) => write!(f, "node {id:?} is not on the ring"),
            RingError::Empty => write!(f, "the ring has no nodes"),
        }
    }
}

impl std::error::Error for RingError {}

/// A consistent hash ring: each node holds `tokens_per_node` derived tokens.
#[derive(Debug, Clone)]
pub struct HashRing {
    tokens_per_node: u64,
    /// Node ids, sorted; a node's index here is its rank.
    nodes: Vec<String>,
    /// Each node's token positions (by rank), kept so a rebuild does not rehash.
    node_tokens: Vec<Vec<u64>>,
    /// Every token's position, ascending; ties ordered by node id.
    positions: Vec<u64>,
    /// `token_ranks[i]` is the rank of the node holding token `i`.
    token_ranks: Vec<u32>,
    /// A directory over the top bits of a position: `bucket_starts[b]` is the
    /// index of the first token at or after the first position of bucket `b`
    /// (plus a last entry, the token count). A lookup only searches the tokens
    /// of its own bucket, mostly none or one.
    bucket_starts: Vec<u32>,
    /// `position >> bucket_shift` is a position's bucket (1..=63).
    bucket_shift: u32,
}

impl HashRing {
    pub fn new(tokens_per_node: u64) -> Result<Self, RingError> {
        if !(1..=MAX_TOKENS_PER_NODE).contains(&tokens_per_node) {
            return Err(RingError::BadTokensPerNode(tokens_per_node));
        }
        Ok(HashRing {
            tokens_per_node,
            nodes: Vec::new(),
            node_tokens: Vec::new(),
            positions: Vec::new(),
            token_ranks: Vec::new(),
            bucket_starts: Vec::new(),
            bucket_shift: 63,
        })
    }

    pub fn tokens_per_node(&self) -> u64 {
        self.tokens_per_node
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn contains(&self, node_id: &str) -> bool {
        self.rank_of(node_id).is_ok()
    }

    fn rank_of(&self, node_id: &str) -> Result<usize, usize> {
        self.nodes.binary_search_by(|n| n.as_str().cmp(node_id))
    }

    /// Adds a node; returns its rank (ranks at or after it shift up by one).
    pub fn add_node(&mut self, node_id: &str) -> Result<usize, RingError> {
        if node_id.is_empty() {
            return Err(RingError::EmptyNodeId);
        }
        let rank = match self.rank_of(node_id) {
            Ok(_) => return Err(RingError::DuplicateNode(node_id.to_owned())),
            Err(rank) => rank,
        };
        let tokens = (0..self.tokens_per_node)
            .map(|i| token_position(node_id, i))
            .collect();
        self.nodes.insert(rank, node_id.to_owned());
        self.node_tokens.insert(rank, tokens);
        self.rebuild_tokens();
        Ok(rank)
    }

    /// Removes a node; returns the rank it had (ranks after it shift down by one).
    pub fn remove_node(&mut self, node_id: &str) -> Result<usize, RingError> {
        let rank = self
            .rank_of(node_id)
            .map_err(|_| RingError::UnknownNode(node_id.to_owned()))?;
        self.nodes.remove(rank);
        self.node_tokens.remove(rank);
        self.rebuild_tokens();
        Ok(rank)
    }

    /// Re-sorts every token after a membership change. Sorting (position, rank)
    /// pairs orders equal positions by node id, as ranks follow node ids.
    fn rebuild_tokens(&mut self) {
        let mut tokens: Vec<(u64, u32)> = self
            .node_tokens
            .iter()
            .enumerate()
            .flat_map(|(rank, positions)| positions.iter().map(move |&p| (p, rank as u32)))
            .collect();
        tokens.sort_unstable();
        self.positions = tokens.iter().map(|&(p, _)| p).collect();
        self.token_ranks = tokens.iter().map(|&(_, r)| r).collect();
        self.rebuild_buckets();
    }

    /// About four buckets per token, at most 2**16 of them (a bigger ring just
    /// has more tokens per bucket).
    fn rebuild_buckets(&mut self) {
        let wanted = (self.positions.len() * 4).clamp(2, 1 << 16);
        let bits = wanted.next_power_of_two().trailing_zeros();
        self.bucket_shift = 64 - bits;
        let mut next = 0;
        self.bucket_starts = (0..1u64 << bits)
            .map(|bucket| {
                let first_position = bucket << self.bucket_shift;
                while next < self.positions.len() && self.positions[next] < first_position {
                    next += 1;
                }
                next as u32
            })
            .chain([self.positions.len() as u32])
            .collect();
    }

    /// Index of the first token at a position >= `position`, wrapping to 0.
    /// The ring must not be empty.
    #[inline]
    fn token_index(&self, position: u64) -> usize {
        let bucket = (position >> self.bucket_shift) as usize;
        let start = self.bucket_starts[bucket] as usize;
        let end = self.bucket_starts[bucket + 1] as usize;
        // The answer is in start..=end: `end` is the first token of a later bucket.
        let index = start + self.positions[start..end].partition_point(|&p| p < position);
        if index == self.positions.len() {
            0
        } else {
            index
        }
    }

    /// Rank of the node owning `user_id`.
    #[inline]
    pub fn owner(&self, user_id: u64) -> Result<usize, RingError> {
        if self.positions.is_empty() {
            return Err(RingError::Empty);
        }
        Ok(self.owner_of_nonempty(user_id))
    }

    /// Rank of the node owning `user_id`, for callers that checked the ring is not empty.
    #[inline]
    pub fn owner_of_nonempty(&self, user_id: u64) -> usize {
        self.token_ranks[self.token_index(key_position(user_id))] as usize
    }

    /// Ranks of the first `k` distinct nodes clockwise from the user's position.
    pub fn successors(&self, user_id: u64, k: usize) -> Result<Vec<usize>, RingError> {
        if self.positions.is_empty() {
            return Err(RingError::Empty);
        }
        let wanted = k.min(self.nodes.len());
        let mut found = Vec::with_capacity(wanted);
        let mut seen = vec![false; self.nodes.len()];
        let start = self.token_index(key_position(user_id));
        let tokens = self.token_ranks.len();
        for step in 0..tokens {
            if found.len() == wanted {
                break;
            }
            let rank = self.token_ranks[(start + step) % tokens] as usize;
            if !seen[rank] {
                seen[rank] = true;
                found.push(rank);
            }
        }
        Ok(found)
    }

    /// Each node's share of the key space, by rank, as a count of positions out
    /// of 2**64. A token owns the positions after the previous token up to its own.
    pub fn share_counts(&self) -> Vec<u128> {
        let mut counts = vec![0u128; self.nodes.len()];
        let Some(&last) = self.positions.last() else {
            return counts;
        };
        // The first token's arc wraps round from the last token: modulo 2**128
        // arithmetic makes it position - last + 2**64.
        let mut previous: u128 = u128::from(last).wrapping_sub(1u128 << 64);
        for (&position, &rank) in self.positions.iter().zip(&self.token_ranks) {
            let position = u128::from(position);
            counts[rank as usize] += position.wrapping_sub(previous);
            previous = position;
        }
        counts
    }

    /// Each node's fraction of the key space, by rank; the fractions sum to 1.
    pub fn shares(&self) -> Vec<f64> {
        const SPACE: f64 = 18_446_744_073_709_551_616.0; // 2**64
        self.share_counts()
            .into_iter()
            .map(|count| count as f64 / SPACE)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(tokens: u64, nodes: &[&str]) -> HashRing {
        let mut ring = HashRing::new(tokens).unwrap();
        for node in nodes {
            ring.add_node(node).unwrap();
        }
        ring
    }

    fn owner_name(ring: &HashRing, user_id: u64) -> &str {
        &ring.nodes[ring.owner(user_id).unwrap()]
    }

    /// The owner by the rule itself: a linear scan over every (position, node id).
    fn owner_by_scan(ring: &HashRing, user_id: u64) -> String {
        let key = key_position(user_id);
        let mut tokens: Vec<(u64, &str)> = ring
            .nodes
            .iter()
            .flat_map(|n| {
                (0..ring.tokens_per_node()).map(move |i| (token_position(n, i), n.as_str()))
            })
            .collect();
        tokens.sort();
        let chosen = tokens.iter().find(|(p, _)| *p >= key).unwrap_or(&tokens[0]);
        chosen.1.to_owned()
    }

    #[test]
    fn positions_match_the_vectors() {
        // From shared/vectors/ring-v1.json.
        assert_eq!(key_position(0), 14374147212387527897);
        assert_eq!(key_position(42), 15395265915043915720);
        assert_eq!(key_position(u64::MAX), 5841669975847748627);
        assert_eq!(token_position("app-1", 0), 15137683123095411028);
        assert_eq!(token_position("app-2", 2), 13499965359517586703);
        assert_eq!(token_position("cell1/host-a:7000", 1), 13517999489024188088);
    }

    #[test]
    fn owners_match_the_vectors() {
        let ring = ring(64, &["app-1", "app-2", "app-3", "app-4", "app-5"]);
        assert_eq!(owner_name(&ring, 0), "app-5");
        assert_eq!(owner_name(&ring, 1), "app-2");
        assert_eq!(owner_name(&ring, 2), "app-3");
        assert_eq!(owner_name(&ring, 42), "app-2");
        assert_eq!(owner_name(&ring, 4294967296), "app-5");
        let ranks = ring.successors(0, 3).unwrap();
        let names: Vec<&str> = ranks.iter().map(|&r| ring.nodes[r].as_str()).collect();
        assert_eq!(names, ["app-5", "app-4", "app-3"]);
    }

    #[test]
    fn owner_follows_the_rule() {
        let ring = ring(16, &["b", "a", "c", "é", "d"]);
        for user_id in (0..2_000u64).chain([u64::MAX, 1 << 63]) {
            assert_eq!(owner_name(&ring, user_id), owner_by_scan(&ring, user_id));
        }
    }

    #[test]
    fn token_index_finds_the_first_token_at_or_after() {
        // 3 x 2**16 tokens: more than four per bucket's worth, so buckets hold several.
        for ring in [
            ring(3, &["a", "b"]),
            ring(MAX_TOKENS_PER_NODE, &["a", "b", "c"]),
        ] {
            let positions = &ring.positions;
            let by_search = |p: u64| positions.partition_point(|&t| t < p) % positions.len();
            let probes = positions
                .iter()
                .flat_map(|&p| [p, p.wrapping_add(1), p.wrapping_sub(1)])
                .chain([0, u64::MAX, 1 << 63]);
            for probe in probes {
                assert_eq!(ring.token_index(probe), by_search(probe), "probe {probe}");
            }
        }
    }

    #[test]
    fn wraps_round_past_the_last_token() {
        let ring = ring(8, &["x", "y"]);
        let last = *ring.positions.last().unwrap();
        let first_rank = ring.token_ranks[0] as usize;
        let user = (0..u64::MAX)
            .find(|&u| key_position(u) > last)
            .expect("some key lies past the last token");
        assert_eq!(ring.owner(user).unwrap(), first_rank);
    }

    #[test]
    fn equal_positions_are_ordered_by_node_id() {
        let mut ring = ring(1, &["b", "a"]);
        // Force a tie: both tokens at one position.
        ring.node_tokens = vec![vec![100], vec![100]];
        ring.rebuild_tokens();
        assert_eq!(ring.token_ranks, [0, 1]);
        assert_eq!(owner_name(&ring, 0), "a");
        assert_eq!(ring.share_counts(), [1u128 << 64, 0]);
    }

    #[test]
    fn membership_errors() {
        assert_eq!(
            HashRing::new(0).unwrap_err(),
            RingError::BadTokensPerNode(0)
        );
        assert!(HashRing::new(MAX_TOKENS_PER_NODE + 1).is_err());
        let mut ring = ring(4, &["a"]);
        assert_eq!(
            ring.add_node("a"),
            Err(RingError::DuplicateNode("a".into()))
        );
        assert_eq!(ring.add_node(""), Err(RingError::EmptyNodeId));
        assert_eq!(
            ring.remove_node("z"),
            Err(RingError::UnknownNode("z".into()))
        );
        ring.remove_node("a").unwrap();
        assert!(ring.is_empty());
        assert_eq!(ring.owner(1), Err(RingError::Empty));
        assert_eq!(ring.successors(1, 2), Err(RingError::Empty));
        assert!(ring.shares().is_empty());
    }

    #[test]
    fn ranks_follow_node_ids() {
        let mut ring = ring(2, &["m"]);
        assert_eq!(ring.add_node("z").unwrap(), 1);
        assert_eq!(ring.add_node("a").unwrap(), 0);
        assert_eq!(ring.nodes, ["a", "m", "z"]);
        assert!(ring.contains("m"));
        assert_eq!(ring.remove_node("m").unwrap(), 1);
        assert!(!ring.contains("m"));
        assert_eq!(ring.len(), 2);
    }

    #[test]
    fn successors_are_distinct_and_start_at_the_owner() {
        let ring = ring(32, &["a", "b", "c", "d"]);
        for user_id in 0..200 {
            let all = ring.successors(user_id, 10).unwrap();
            assert_eq!(all.len(), 4);
            let mut sorted = all.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 4);
            assert_eq!(all[0], ring.owner(user_id).unwrap());
            assert_eq!(ring.successors(user_id, 2).unwrap(), all[..2]);
            assert!(ring.successors(user_id, 0).unwrap().is_empty());
        }
    }

    #[test]
    fn shares_cover_the_key_space() {
        let ring = ring(64, &["app-1", "app-2", "app-3", "app-4", "app-5"]);
        let counts = ring.share_counts();
        assert_eq!(counts.iter().sum::<u128>(), 1u128 << 64);
        assert!(counts.iter().all(|&c| c > 0));
        let total: f64 = ring.shares().iter().sum();
        assert!((total - 1.0).abs() < 1e-12);
        let solo = ring_one_token();
        assert_eq!(solo.share_counts(), [1u128 << 64]);
        assert_eq!(solo.shares(), [1.0]);
    }

    fn ring_one_token() -> HashRing {
        ring(1, &["solo"])
    }

    #[test]
    fn removing_a_node_moves_only_its_users() {
        let mut ring = ring(64, &["app-1", "app-2", "app-3", "app-4", "app-5"]);
        let before: Vec<String> = (0..5_000)
            .map(|u| owner_name(&ring, u).to_owned())
            .collect();
        ring.remove_node("app-3").unwrap();
        let mut new_homes = std::collections::BTreeSet::new();
        for (user_id, old) in before.iter().enumerate() {
            let now = owner_name(&ring, user_id as u64);
            if old == "app-3" {
                new_homes.insert(now.to_owned());
            } else {
                assert_eq!(now, old);
            }
        }
        assert_eq!(new_homes.len(), 4);
    }
}
