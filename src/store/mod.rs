//! Where artifacts live: the local cache (`local`), the shared HTTP cache (`http`),
//! an artifact's manifest and publish rules (`artifact`), its tar archive
//! (`archive`), and the built-in kinds' sources (`sources`: git checkouts and
//! verified downloads).

pub mod archive;
pub mod artifact;
pub mod http;
pub mod local;
pub mod sources;
pub mod trim;
