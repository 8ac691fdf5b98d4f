//! Evaluation of Mixtral checkpoints and GPTQ branches: perplexity under the GPTQ paper's and
//! llama.cpp's conventions, evaluation texts and datasets, comparison tables and charts, and the
//! published model card.
//!
//! The model is reached through the [`perplexity::Scorer`] trait; [`model`] implements it for the
//! `runtime` crate's Mixtral.

#![deny(missing_docs)]

pub mod card;
pub mod chart;
pub mod compare;
pub mod datasets;
pub mod error;
pub mod model;
pub mod perplexity;
pub mod results;
pub mod tokenize;

pub use error::{Error, Result};
pub use perplexity::{evaluate, Convention, ConventionKind, Perplexity, Scorer};
