//! The agent's admin API, as xtask uses it: the contract crate's client.
pub use mesh_api::admin::{AdminClient, AdminError, client::HttpError};
