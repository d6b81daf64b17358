//! lorafit: LoRA fine-tuning of causal language models on libtorch, writing PEFT adapters.
//!
//! Data flows config → data → model + LoRA → training loop → run directory; each stage is a
//! module here, and `main.rs` only parses the command line and dispatches.

pub mod clock;
pub mod config;
pub mod data;
pub mod dist;
pub mod export;
pub mod files;
pub mod generate;
pub mod host_memory;
pub mod init;
pub mod inspect;
pub mod lora;
pub mod model;
pub mod observe;
pub mod packing;
pub mod torch_errors;
pub mod train;
