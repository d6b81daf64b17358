//! Adapters for other runtimes: a merged Hugging Face model and llama.cpp GGUF LoRA files.

pub mod compat;
pub mod gguf;
pub mod merge;
