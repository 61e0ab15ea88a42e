//! The data path. A connection redirected by the kernel is accepted by
//! [`outbound`], planned by [`route`] over one state snapshot, and carried
//! straight to its destination or through the mTLS [`tunnel`] to the
//! destination node's agent, whose [`inbound`] listener delivers it. Both
//! ends run the byte pump of [`copy`]. A connection that speaks HTTP is
//! served by [`http`] instead, request by request.
pub mod copy;
pub mod drain;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod plaintext;
pub mod pool;
pub mod route;
pub mod tunnel;

pub use copy::{Locked, copy_bidirectional};
