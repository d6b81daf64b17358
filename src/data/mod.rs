//! Users' data → training examples: [`source`] reads records from files, [`format`] renders a
//! record into text segments (trainable or not) and tokenizes them with the model's
//! [`tokenizer`], [`batch`] groups examples into padded tensors; [`load`] does it all for a
//! run's config. The model's facts the data needs (its EOS ids, its vocabulary size) come in as
//! values: nothing here reads the model.

pub mod batch;
pub mod cache;
pub mod chat;
pub mod export;
pub mod format;
pub mod load;
pub mod preference;
pub mod preview;
pub mod source;
pub mod tokenizer;

pub use batch::{Batch, EpochPlan, RowLayout};
pub use format::{Example, Prepared};
pub use load::{load_data, ModelFacts, RunData};
pub use tokenizer::TextTokenizer;
