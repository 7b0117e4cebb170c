//! How promotions are carried out in embedded mode: strategies implementing
//! [`pipeline_core::PromotionStrategy`].
//!
//! - [`NotificationWebhook`] posts a signed Flux event to the configured receivers.
//! - [`StrategyNotAvailable`] stands in for a strategy this build cannot run yet, and
//!   says so instead of pretending to promote.
#![forbid(unsafe_code)]

mod notification;
mod unavailable;

pub use notification::{
    DEFAULT_CONTROLLER_NAME, NotificationWebhook, RECEIVER_TIMEOUT, delivered_checkpoint,
    redact_url,
};
pub use unavailable::StrategyNotAvailable;
