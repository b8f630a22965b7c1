//! A gateway's local copy of the cluster's connection records, kept current by the etcd
//! watch. Sans-IO: it takes the changes (from the initial range read and from watch events)
//! and says what each one means for this gateway; it never talks to etcd. The packet path
//! reads only this copy (and the tables filled from it), never the store.
//!
//! Every entry remembers the etcd `mod_revision` it was read at: a REBIND is committed with a
//! transaction that compares it, so of two gateways that accept REBINDs of one connection at
//! once, exactly one commit succeeds.

use std::collections::HashMap;

use super::record::{ConnRecord, GatewayId, RecordError, parse_conn_key};

/// One change read from etcd, in revision order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        mod_revision: i64,
    },
    Delete {
        key: Vec<u8>,
        mod_revision: i64,
    },
}

/// A record and the revision it was written at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub record: ConnRecord,
    pub mod_revision: i64,
}

/// What a change meant, for the gateway that applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A connection this mirror did not know.
    Added { epoch: u32, index: u32 },
    /// A known connection changed. `owner_changed` with `lost` set: another gateway took the
    /// connection from this one, which must drop its old tuple and stop sending for it.
    Updated {
        epoch: u32,
        index: u32,
        owner_changed: bool,
        lost: bool,
    },
    Removed {
        epoch: u32,
        index: u32,
        /// The connection that was stored there (an index can be reused at once).
        conn_id: u64,
    },
    /// Older than what the mirror holds (a replayed event after a reconnect): ignored.
    Stale,
    /// Not a connection key of this cluster: ignored.
    Foreign,
    /// A connection key whose value is not a record: counted and ignored, never trusted.
    Malformed(RecordError),
}

#[derive(Debug)]
pub struct Mirror {
    prefix: String,
    me: GatewayId,
    /// The revision up to which every change has been applied.
    revision: i64,
    conns: HashMap<(u32, u32), Entry>,
    malformed: u64,
}

impl Mirror {
    pub fn new(prefix: &str, me: GatewayId) -> Mirror {
        Mirror {
            prefix: prefix.to_owned(),
            me,
            revision: 0,
            conns: HashMap::new(),
            malformed: 0,
        }
    }

    /// The revision up to which changes have been applied: the watch resumes after it.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Marks every change up to `revision` as applied (the header revision of a range read
    /// or of a watch response, which may be ahead of its last event).
    pub fn advance(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Values that were not records, since start.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    pub fn get(&self, epoch: u32, index: u32) -> Option<&Entry> {
        self.conns.get(&(epoch, index))
    }

    pub fn iter(&self) -> impl Iterator<Item = ((u32, u32), &Entry)> {
        self.conns.iter().map(|(k, e)| (*k, e))
    }

    /// Applies one change.
    pub fn apply(&mut self, change: Change) -> Applied {
        let (key, mod_revision) = match &change {
            Change::Put {
                key, mod_revision, ..
            }
            | Change::Delete { key, mod_revision } => (key, *mod_revision),
        };
        let Some((epoch, index)) = parse_conn_key(&self.prefix, key) else {
            return Applied::Foreign;
        };
        if let Some(old) = self.conns.get(&(epoch, index))
            && old.mod_revision >= mod_revision
        {
            return Applied::Stale;
        }
        self.revision = self.revision.max(mod_revision);
        match change {
            Change::Delete { .. } => {
                if let Some(old) = self.conns.remove(&(epoch, index)) {
                    Applied::Removed {
                        epoch,
                        index,
                        conn_id: old.record.conn_id,
                    }
                } else {
                    Applied::Stale
                }
            }
            Change::Put { value, .. } => {
                let record = match ConnRecord::decode(&value) {
                    Ok(r) => r,
                    Err(e) => {
                        self.malformed += 1;
                        return Applied::Malformed(e);
                    }
                };
                let new_owner = record.owner;
                let entry = Entry {
                    record,
                    mod_revision,
                };
                match self.conns.insert((epoch, index), entry) {
                    None => Applied::Added { epoch, index },
                    Some(old) => Applied::Updated {
                        epoch,
                        index,
                        owner_changed: old.record.owner != new_owner,
                        lost: old.record.owner == self.me && new_owner != self.me,
                    },
                }
            }
        }
    }

    /// Replaces the whole copy with a fresh range read (after the watch was lost): applies
    /// `puts` and removes every connection the read did not return. Says what changed, as
    /// [`Mirror::apply`] would have, so the gateway catches up on what it missed.
    pub fn reload(&mut self, puts: Vec<Change>, revision: i64) -> Vec<Applied> {
        let mut seen = std::collections::HashSet::new();
        let mut applied = Vec::new();
        for change in puts {
            if let Change::Put { key, .. } = &change
                && let Some(at) = parse_conn_key(&self.prefix, key)
            {
                seen.insert(at);
            }
            match self.apply(change) {
                Applied::Stale | Applied::Foreign => {}
                a => applied.push(a),
            }
        }
        let gone: Vec<(u32, u32)> = self
            .conns
            .keys()
            .filter(|at| !seen.contains(at))
            .copied()
            .collect();
        for (epoch, index) in gone {
            if let Some(old) = self.conns.remove(&(epoch, index)) {
                applied.push(Applied::Removed {
                    epoch,
                    index,
                    conn_id: old.record.conn_id,
                });
            }
        }
        self.advance(revision);
        applied
    }

    /// Records this gateway's own successful write (the watch's copy is then stale).
    pub fn record_own(&mut self, epoch: u32, index: u32, entry: Entry) {
        self.revision = self.revision.max(entry.mod_revision);
        self.conns.insert((epoch, index), entry);
    }

    /// Records this gateway's own removal (the watch's delete is then stale).
    pub fn forget(&mut self, epoch: u32, index: u32) {
        self.conns.remove(&(epoch, index));
    }

    /// An index of `epoch` below `capacity` that no record holds, starting the search at
    /// `hint` (gateways start at different hints so that their REGISTERs rarely collide;
    /// the etcd transaction decides when they do).
    pub fn free_index(&self, epoch: u32, capacity: u32, hint: u32) -> Option<u32> {
        self.free_index_except(epoch, capacity, hint, |_| false)
    }

    /// [`Mirror::free_index`], also skipping every index `busy` names (being allocated).
    pub fn free_index_except(
        &self,
        epoch: u32,
        capacity: u32,
        hint: u32,
        busy: impl Fn(u32) -> bool,
    ) -> Option<u32> {
        if capacity == 0 {
            return None;
        }
        let start = hint % capacity;
        (0..capacity)
            .map(|i| (start + i) % capacity)
            .find(|&x| !busy(x) && !self.conns.contains_key(&(epoch, x)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::{RecordSeal, conn_key};
    use super::*;
    use crate::keys::MasterSecret;
    use crate::rebind::RebindSecret;
    use crate::time::Ticks;

    const PREFIX: &str = "/mesh/t";

    fn put(index: u32, owner: GatewayId, rev: i64) -> Change {
        let seal = RecordSeal::new(&MasterSecret::from_bytes([1; 32]), PREFIX);
        let rec = ConnRecord {
            conn_id: u64::from(index) + 100,
            secret: seal.seal(1, index, u64::from(index) + 100, &RebindSecret([3; 32])),
            last_rebind: Ticks(rev as u64),
            host: 0,
            owner,
            tuple: Some("192.0.2.1:1000".parse().unwrap()),
        };
        Change::Put {
            key: conn_key(PREFIX, 1, index).into_bytes(),
            value: rec.encode(),
            mod_revision: rev,
        }
    }

    #[test]
    fn changes_say_what_they_mean_for_this_gateway() {
        let mut m = Mirror::new(PREFIX, 1);
        assert_eq!(
            m.apply(put(5, 1, 10)),
            Applied::Added { epoch: 1, index: 5 }
        );
        assert_eq!(m.revision(), 10);
        // Same owner, newer L.
        assert_eq!(
            m.apply(put(5, 1, 11)),
            Applied::Updated {
                epoch: 1,
                index: 5,
                owner_changed: false,
                lost: false
            }
        );
        // Gateway 2 took it: this one lost it.
        assert_eq!(
            m.apply(put(5, 2, 12)),
            Applied::Updated {
                epoch: 1,
                index: 5,
                owner_changed: true,
                lost: true
            }
        );
        assert_eq!(m.get(1, 5).unwrap().mod_revision, 12);
        assert_eq!(m.get(1, 5).unwrap().record.owner, 2);
        // A replayed older event changes nothing.
        assert_eq!(m.apply(put(5, 1, 11)), Applied::Stale);
        assert_eq!(m.get(1, 5).unwrap().record.owner, 2);
        // Taking it back is not a loss for this gateway.
        assert_eq!(
            m.apply(put(5, 1, 13)),
            Applied::Updated {
                epoch: 1,
                index: 5,
                owner_changed: true,
                lost: false
            }
        );
        let del = Change::Delete {
            key: conn_key(PREFIX, 1, 5).into_bytes(),
            mod_revision: 14,
        };
        assert_eq!(
            m.apply(del.clone()),
            Applied::Removed {
                epoch: 1,
                index: 5,
                conn_id: 105
            }
        );
        assert!(m.is_empty());
        assert_eq!(m.apply(del), Applied::Stale);
    }

    #[test]
    fn foreign_and_malformed_values_are_not_trusted() {
        let mut m = Mirror::new(PREFIX, 1);
        let foreign = Change::Put {
            key: b"/mesh/t/gateways/3".to_vec(),
            value: vec![1, 2, 3],
            mod_revision: 3,
        };
        assert_eq!(m.apply(foreign), Applied::Foreign);
        let bad = Change::Put {
            key: conn_key(PREFIX, 1, 9).into_bytes(),
            value: vec![1, 2, 3],
            mod_revision: 4,
        };
        assert_eq!(m.apply(bad), Applied::Malformed(RecordError::Short));
        assert_eq!(m.malformed(), 1);
        assert!(m.get(1, 9).is_none());
    }

    #[test]
    fn reload_reports_what_was_missed_while_the_watch_was_down() {
        let mut m = Mirror::new(PREFIX, 1);
        m.apply(put(1, 1, 1));
        m.apply(put(2, 1, 2));
        m.apply(put(3, 1, 3));
        // Meanwhile: 1 unchanged, 2 taken by gateway 2, 3 removed, 4 added.
        let applied = m.reload(vec![put(1, 1, 1), put(2, 2, 7), put(4, 2, 8)], 9);
        assert_eq!(
            applied,
            vec![
                Applied::Updated {
                    epoch: 1,
                    index: 2,
                    owner_changed: true,
                    lost: true
                },
                Applied::Added { epoch: 1, index: 4 },
                Applied::Removed {
                    epoch: 1,
                    index: 3,
                    conn_id: 103
                },
            ]
        );
        assert_eq!(m.len(), 3);
        assert_eq!(m.revision(), 9);
    }

    #[test]
    fn free_index_skips_taken_ones_from_the_hint() {
        let mut m = Mirror::new(PREFIX, 1);
        for (i, x) in [3, 4, 6].into_iter().enumerate() {
            m.apply(put(x, 1, i as i64 + 1));
        }
        assert_eq!(m.free_index(1, 8, 3), Some(5));
        assert_eq!(m.free_index(1, 8, 6), Some(7));
        assert_eq!(m.free_index(1, 8, 15), Some(7));
        assert_eq!(m.free_index(2, 8, 3), Some(3), "other epoch");
        assert_eq!(m.free_index(1, 0, 0), None);
        for (i, x) in [0, 1, 2, 5, 7].into_iter().enumerate() {
            m.apply(put(x, 1, i as i64 + 10));
        }
        assert_eq!(m.free_index(1, 8, 0), None, "full");
    }
}
