//! Users' data → training examples: [`source`] reads records from files, [`format`] renders a
//! record into text segments (trainable or not) and tokenizes them, [`batch`] groups examples
//! into padded tensors.

pub mod batch;
pub mod cache;
pub mod chat;
pub mod export;
pub mod format;
pub mod preview;
pub mod source;

pub use batch::{Batch, EpochPlan, Layout as RowLayout};
pub use format::{Example, Prepared, TextTokenizer};
