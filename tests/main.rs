//! jolt's integration tests, one binary: each module drives the real `jolt` binary
//! in fresh temporary workspaces (see `util`), against a real RabbitMQ and real nginx
//! servers where it needs them.

mod util;

mod broker;
mod build;
mod cache;
mod commands;
mod deploy;
mod errors;
mod fleet;
mod ha;
mod http;
mod inputs;
mod network;
mod sources;
