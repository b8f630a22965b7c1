//! Changes other gateways made to the shared registry (cluster mode), as the store's watch
//! reports them, applied to this gateway's copy: the registries that checks 1–7 read and the
//! tables of the fast path. Nothing here waits on the store, and nothing is written back to
//! it (the change is already there).
//!
//! The old owner lets go: when another gateway commits a REBIND of a connection, this one
//! keeps the new `L` (so a stale or replayed REBIND is refused here too) but drops the
//! connection's tuple from its tables and stops sending host→client traffic for it.
#![forbid(unsafe_code)]

use crate::gateway::store::StoredConn;
use crate::table::{ConnRef, ConnRoute};

use super::shared::{Control, Shared};

/// One change of the shared registry.
#[derive(Clone, Debug)]
pub enum RemoteChange {
    /// A connection as the store now holds it, `R` opened. `ours`: this gateway is its owner
    /// (the watch reports this gateway's own commits too).
    Stored { conn: StoredConn, ours: bool },
    /// The store no longer holds connection `index` of `epoch`.
    Removed {
        epoch: u32,
        index: u32,
        conn_id: u64,
    },
}

/// What applying a [`RemoteChange`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteApplied {
    /// A connection this gateway did not hold yet.
    Added,
    /// A newer `L` (and owner) for a connection held here.
    Updated,
    /// Nothing new (this gateway's own change, or an older one).
    Unchanged,
    Removed,
    /// For an epoch whose registry this gateway does not hold.
    UnknownEpoch,
}

impl Shared {
    /// Applies a change of the shared registry to this gateway's copy.
    pub fn apply_remote(&self, change: RemoteChange) -> RemoteApplied {
        let mut ctl = self.control();
        match change {
            RemoteChange::Removed {
                epoch,
                index,
                conn_id,
            } => {
                let Some(reg) = ctl.registry_mut(epoch) else {
                    return RemoteApplied::UnknownEpoch;
                };
                if reg.get(index).is_none_or(|c| c.conn_id != conn_id) {
                    return RemoteApplied::Unchanged;
                }
                reg.remove(index);
                // A connection registered in two epochs (a rotation) and routed by its
                // other registration lives on there.
                let elsewhere = ctl
                    .conns
                    .get(conn_id)
                    .is_some_and(|r| r.epoch_byte != epoch as u8 || r.index != index);
                if !elsewhere {
                    let_go(&mut ctl, conn_id, true);
                }
                RemoteApplied::Removed
            }
            RemoteChange::Stored { conn, ours } => {
                // Issue times above every L the cluster committed, so a connection that
                // rebound on a gateway whose clock runs ahead can rebind here at once.
                self.set_floor(conn.last_rebind);
                let Some(reg) = ctl.registry_mut(conn.epoch) else {
                    return RemoteApplied::UnknownEpoch;
                };
                let held = reg.get(conn.index).map(|c| (c.conn_id, c.last_rebind));
                match held {
                    Some((id, last)) if id == conn.conn_id => {
                        if conn.last_rebind <= last {
                            return RemoteApplied::Unchanged;
                        }
                        if let Some(t) = conn.tuple {
                            reg.commit_rebind(conn.index, conn.last_rebind, t);
                        }
                        if !ours {
                            reg.unbind_tuple(conn.index);
                            let_go(&mut ctl, conn.conn_id, false);
                        }
                        RemoteApplied::Updated
                    }
                    other => {
                        if let Some((old_id, _)) = other {
                            // The index was freed and reused while the watch was away.
                            reg.remove(conn.index);
                            let_go(&mut ctl, old_id, true);
                        }
                        let reg = ctl
                            .registry_mut(conn.epoch)
                            .expect("the registry looked up above");
                        let tuple = conn.tuple.filter(|_| ours);
                        if reg
                            .restore(
                                conn.index,
                                conn.conn_id,
                                &conn.secret,
                                conn.last_rebind,
                                tuple,
                                conn.host,
                            )
                            .is_err()
                        {
                            return RemoteApplied::Unchanged;
                        }
                        let epoch_byte = conn.epoch as u8;
                        let mut bound = None;
                        if let Some(t) = tuple
                            && ctl.tuples.get(&t).is_none()
                        {
                            let cref = ConnRef {
                                conn_id: conn.conn_id,
                                index: conn.index,
                                host: conn.host,
                                owner: 0,
                                epoch_byte,
                            };
                            bound = ctl.tuples.insert(t, cref).is_ok().then_some(t);
                        }
                        // A connection registered in two epochs (a rotation's key
                        // delivery) stays routed by the registration that holds its tuple.
                        let routed = ctl
                            .conns
                            .get(conn.conn_id)
                            .is_some_and(|r| r.tuple.is_some());
                        if bound.is_none() && routed {
                            return RemoteApplied::Added;
                        }
                        let _ = ctl.conns.insert(
                            conn.conn_id,
                            ConnRoute {
                                tuple: bound,
                                owner: 0,
                                index: conn.index,
                                epoch_byte,
                                host: conn.host,
                            },
                        );
                        RemoteApplied::Added
                    }
                }
            }
        }
    }
}

/// Drops `conn_id`'s tuple from the tables (and its route when `forget`).
pub(super) fn let_go(ctl: &mut Control, conn_id: u64, forget: bool) {
    let route = if forget {
        ctl.conns.remove(conn_id)
    } else {
        let route = ctl.conns.get(conn_id);
        if let Some(mut r) = route {
            r.tuple = None;
            let _ = ctl.conns.insert(conn_id, r);
        }
        route
    };
    if let Some(t) = route.and_then(|r| r.tuple)
        && ctl.tuples.get(&t).is_some_and(|r| r.conn_id == conn_id)
    {
        ctl.tuples.remove(&t);
    }
}
