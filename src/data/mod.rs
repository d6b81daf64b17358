//! Users' data → training examples: [`source`] reads records from files, [`format`] renders a
//! record into text segments (trainable or not) and tokenizes them, [`batch`] groups examples
//! into padded tensors.

pub mod batch;
pub mod format;
pub mod source;

pub use batch::{Batch, EpochPlan};
pub use format::{Example, Prepared, TextTokenizer};
