//! mistralrs-retro: KV policies for mistral.rs paged attention.
pub mod convert;
pub mod policy;
pub mod linear;
pub mod server;
pub mod config;
pub mod metrics;
pub mod validate;
pub mod eval;
pub mod tp;
