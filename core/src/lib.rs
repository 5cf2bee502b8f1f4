//! picklegate's core, free of Python: the manifest, hashing, opcode scanning and the decisions.
//! The binding crate converts types and maps each error here to one Python exception.

pub mod callsite;
pub mod compiled;
pub mod container;
pub mod decision;
pub mod event;
pub mod freeze;
pub mod hash;
pub mod manifest;
pub mod policy;
pub mod record;
pub mod risk;
pub mod scan;
