//! Where a volume's replicas go: a pure choice over what the node daemons
//! reported. Replicas go on distinct nodes that have room; with
//! `dataLocality: best-effort` one goes on the node that will use the
//! volume when it can; otherwise the emptiest nodes (by room left after
//! what is already promised) come first, so volumes spread.

use std::collections::BTreeSet;

/// One node daemon as the controller sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRoom {
    pub node_id: String,
    /// Bytes free on the data directory's filesystem.
    pub free_bytes: u64,
    /// Bytes promised to replicas already there (they are sparse).
    pub allocated_bytes: u64,
    pub capacity_bytes: u64,
}

impl NodeRoom {
    /// Room for new replicas: free space, less what existing replicas may
    /// still grow into, never counting more than the capacity.
    pub fn room(&self) -> u64 {
        let used = self.capacity_bytes.saturating_sub(self.free_bytes);
        self.capacity_bytes
            .saturating_sub(used.max(self.allocated_bytes))
            .min(self.free_bytes)
    }
}

/// Why no placement exists.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{wanted} replicas of {size} bytes need {wanted} nodes with room; {fitting} of {nodes} nodes have it"
)]
pub struct NoRoom {
    pub wanted: usize,
    pub size: u64,
    pub fitting: usize,
    pub nodes: usize,
}

/// Choose `count` distinct nodes with room for `size` bytes each.
/// `preferred`: nodes to use first (the consumer's, for best-effort
/// locality), in order; `exclude`: nodes that must not be chosen (they
/// already hold a replica of the volume).
pub fn place(
    nodes: &[NodeRoom],
    count: usize,
    size: u64,
    preferred: &[String],
    exclude: &BTreeSet<String>,
) -> Result<Vec<String>, NoRoom> {
    let mut fitting: Vec<&NodeRoom> = nodes
        .iter()
        .filter(|n| n.room() >= size && !exclude.contains(&n.node_id))
        .collect();
    let distinct: BTreeSet<&str> = fitting.iter().map(|n| n.node_id.as_str()).collect();
    if distinct.len() < count {
        return Err(NoRoom {
            wanted: count,
            size,
            fitting: distinct.len(),
            nodes: nodes.len(),
        });
    }
    // Emptiest first; ties by name so the choice is stable.
    fitting.sort_by(|a, b| b.room().cmp(&a.room()).then(a.node_id.cmp(&b.node_id)));
    let mut chosen: Vec<String> = Vec::with_capacity(count);
    for p in preferred {
        if chosen.len() < count && fitting.iter().any(|n| &n.node_id == p) && !chosen.contains(p) {
            chosen.push(p.clone());
        }
    }
    for n in fitting {
        if chosen.len() == count {
            break;
        }
        if !chosen.contains(&n.node_id) {
            chosen.push(n.node_id.clone());
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(id: &str, free_gib: u64) -> NodeRoom {
        NodeRoom {
            node_id: id.into(),
            free_bytes: free_gib << 30,
            allocated_bytes: 0,
            capacity_bytes: 100 << 30,
        }
    }

    #[test]
    fn replicas_go_on_distinct_nodes_emptiest_first() {
        let nodes = [node("a", 10), node("b", 50), node("c", 30), node("d", 40)];
        let got = place(&nodes, 3, 1 << 30, &[], &BTreeSet::new()).unwrap();
        assert_eq!(got, ["b", "d", "c"]);
    }

    #[test]
    fn best_effort_locality_puts_one_on_the_consumer_node() {
        let nodes = [node("a", 10), node("b", 50), node("c", 30), node("d", 40)];
        let got = place(&nodes, 3, 1 << 30, &["a".into()], &BTreeSet::new()).unwrap();
        assert_eq!(got, ["a", "b", "d"]);
        // A consumer node without room is passed over, not an error.
        let got = place(&nodes, 2, 20 << 30, &["a".into()], &BTreeSet::new()).unwrap();
        assert_eq!(got, ["b", "d"]);
    }

    #[test]
    fn too_few_nodes_with_room_is_an_error() {
        let nodes = [node("a", 10), node("b", 50)];
        let err = place(&nodes, 3, 1 << 30, &[], &BTreeSet::new()).unwrap_err();
        assert_eq!((err.fitting, err.nodes), (2, 2));
        let err = place(&nodes, 2, 20 << 30, &[], &BTreeSet::new()).unwrap_err();
        assert_eq!(err.fitting, 1);
    }

    #[test]
    fn promised_bytes_count_against_room() {
        let mut a = node("a", 90);
        a.allocated_bytes = 95 << 30; // sparse replicas that may still grow
        assert_eq!(a.room(), 5 << 30);
        assert!(place(&[a], 1, 6 << 30, &[], &BTreeSet::new()).is_err());
    }

    #[test]
    fn excluded_nodes_are_never_chosen() {
        let nodes = [node("a", 10), node("b", 50), node("c", 30)];
        let exclude = BTreeSet::from(["b".to_string()]);
        let got = place(&nodes, 1, 1 << 30, &["b".into()], &exclude).unwrap();
        assert_eq!(got, ["c"]);
    }

    proptest! {
        #[test]
        fn a_placement_is_distinct_fits_and_honours_exclusions(
            frees in proptest::collection::vec(0u64..64, 0..8),
            count in 1usize..5,
            size_gib in 1u64..16,
            excluded in proptest::collection::btree_set(0usize..8, 0..3),
        ) {
            let nodes: Vec<_> = frees.iter().enumerate().map(|(i, f)| node(&format!("n{i}"), *f)).collect();
            let exclude: BTreeSet<String> = excluded.iter().map(|i| format!("n{i}")).collect();
            let size = size_gib << 30;
            let fit = nodes.iter().filter(|n| n.room() >= size && !exclude.contains(&n.node_id)).count();
            match place(&nodes, count, size, &["n0".into()], &exclude) {
                Ok(got) => {
                    prop_assert_eq!(got.len(), count);
                    let set: BTreeSet<_> = got.iter().collect();
                    prop_assert_eq!(set.len(), count);
                    for id in &got {
                        let n = nodes.iter().find(|n| &n.node_id == id).unwrap();
                        prop_assert!(n.room() >= size);
                        prop_assert!(!exclude.contains(id));
                    }
                }
                Err(_) => prop_assert!(fit < count),
            }
        }
    }
}
