//! Domain core of pipeline-controller.
//!
//! It turns deployment events into durable promotion records and records into
//! promotions, through the ports in [`ports`]. It knows no HTTP framework, Kubernetes
//! client or database: adapters live in their own crates.
#![forbid(unsafe_code)]

pub mod deployment;
pub mod event;
pub mod executor;
pub mod flux_wiring;
pub mod insights;
pub mod intake;
pub mod intake_load;
pub mod metrics;
pub mod observe;
pub mod pipeline;
pub mod ports;
pub mod promotion;
pub mod read;
pub mod report;
pub mod retention;
pub mod signature;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use executor::{
    Attempt, Executor, ExecutorSettings, HealthGate, PromotionContext, PromotionStrategy,
    StrategyError, StrategyOutcome, StrategySet,
};
pub use intake::{
    ApprovalBody, ApprovalRequest, Decision, EventRequest, Intake, Refusal, RefusalClass,
    TimeWindow, Verdict, decide,
};
pub use intake_load::IntakeLoad;
pub use metrics::Metrics;
pub use pipeline::{Pipeline, PipelineRef, PipelineSpec};
pub use ports::{
    Clock, PipelineSource, PromotionFilter, PromotionStore, SecretBytes, SecretLookupError,
    SecretSource, StoreError, SystemClock, Unavailable,
};
pub use promotion::{
    ChangeReason, Phase, PromotionRecord, RetryPolicy, Trigger, parse_version, promotion_id,
};
pub use read::{PortReader, ReadPort};
pub use report::Throttle;
pub use retention::{RetentionPolicy, Sweep};
