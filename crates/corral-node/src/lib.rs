//! `corral node`: the per-node daemon. It serves everything `corral replica`
//! serves, plus the engine manager (`proto/corral/v1/node.proto`), which
//! runs the engine of each volume attached on this node as a supervised
//! child process and keeps a record so that it brings them back after the
//! daemon itself restarts.
