//! Adapters for other runtimes: a merged Hugging Face model and llama.cpp GGUF LoRA files; the
//! base model written in 4 bits as transformers + bitsandbytes save it.

pub mod compat;
pub mod gguf;
pub mod merge;
pub mod quantize;
