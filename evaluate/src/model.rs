//! [`Scorer`] for the `runtime` crate's Mixtral model, on any of its backends.

use crate::error::ScorerError;
use crate::perplexity::Scorer;

impl<B: runtime::Backend> Scorer for runtime::Model<B> {
    /// The model's `nll`: T−1 values for a window of T tokens.
    fn nll(&mut self, window: &[u32]) -> Result<Vec<f32>, ScorerError> {
        runtime::Model::nll(self, window).map_err(|e| Box::new(e) as ScorerError)
    }
}
