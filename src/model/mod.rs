//! The frozen base model: `config.json` → [`ModelSpec`], safetensors → [`Weights`], and one
//! decoder-only transformer ([`Decoder`]) parameterised by the spec.

pub mod decoder;
pub mod layout;
pub mod spec;
pub mod weights;

pub use decoder::{Decoder, KvCache, Linear, Packing, Pass};
pub use spec::ModelSpec;
pub use weights::Weights;
