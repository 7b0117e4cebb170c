//! A stand-in for a strategy this build cannot carry out.

use async_trait::async_trait;
use pipeline_core::{PromotionContext, PromotionStrategy, StrategyError, StrategyOutcome};

/// Fails every promotion permanently, naming the strategy and why it cannot run. Used
/// where a strategy has not landed yet, so records end visibly instead of pretending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrategyNotAvailable {
    /// The strategy's name as pipelines spell it, e.g. `pull-request`.
    pub name: &'static str,
    pub reason: String,
}

impl StrategyNotAvailable {
    pub fn new(name: &'static str, reason: impl Into<String>) -> Self {
        Self {
            name,
            reason: reason.into(),
        }
    }

    /// The pull-request strategy, until it lands.
    pub fn pull_request(reason: impl Into<String>) -> Self {
        Self::new("pull-request", reason)
    }

    pub fn message(&self) -> String {
        format!(
            "{} strategy is not available in this build yet: {}",
            self.name, self.reason
        )
    }
}

#[async_trait]
impl PromotionStrategy for StrategyNotAvailable {
    async fn promote(&self, ctx: PromotionContext<'_>) -> Result<StrategyOutcome, StrategyError> {
        tracing::warn!(
            promotion = %ctx.record.id,
            pipeline = %ctx.record.pipeline,
            strategy = self.name,
            "promotion refused: strategy not available"
        );
        Err(StrategyError::permanent(self.message()))
    }
}
