//! The frozen base model: `config.json` → [`ModelSpec`], safetensors → [`Weights`], and one
//! decoder-only transformer ([`Decoder`]) parameterised by the spec; [`load`] loads it on the
//! device and in the dtypes a command asks for. Trainable adapters plug into its linear layers
//! through [`LinearAdapter`], so the model knows nothing of how they are made or saved.

pub mod attention;
pub mod decoder;
pub mod load;
pub mod names;
pub mod quantized;
mod rope;
pub mod sites;
pub mod spec;
pub mod weights;

pub use decoder::{without_adapters, Decoder, KvCache, Linear, LinearAdapter, TokenPositions};
pub use load::{load_model, load_model_quantized};
pub use sites::{LinearSite, LinearSites};
pub use spec::ModelSpec;
pub use weights::Weights;
