//! mistralrs-retro: KV policies for mistral.rs paged attention, and the server and quality
//! harness around them. The data flow, module by module:
//! - [`config`]: a policy's settings, from defaults, the policy file and flags (`PolicyConfig`);
//! - [`policy`]: the policies (`full`, `quest`, `retro`) behind mistral.rs's `kv_policy` seam, on
//!   the kernels of `retro-kernels`;
//! - [`linear`]: which CPU linear layers the engine uses;
//! - [`server`]: `mistralrs-server` (command line, engine, request checks, `/metrics`, tensor
//!   parallelism);
//! - [`eval`]: `retro-eval`, the quality harness;
//! - [`convert`]: `convert-gguf`, a GGUF file to a safetensors model directory;
//! - [`env`]: every environment variable, read once (diagnostics only).

pub mod config;
pub mod policy;
pub mod linear;
pub mod server;
pub mod eval;
pub mod convert;
pub mod env;
