//! Git-side of pull-request promotions: rewriting marked YAML values, git CLI, forge providers.
//!
//! - [`markers`] finds `# {"$promotion": "ns:name:env"}` markers in a GitOps repository and
//!   rewrites the marked values in place.
//! - [`git`] runs the `git` command line with credentials kept out of URLs, arguments and
//!   messages.
//! - [`forge`] opens and updates pull requests on GitHub, GitLab, Gitea/Forgejo, Bitbucket
//!   Server and Azure DevOps.
//! - [`objects`] applies a promotion to a commit's YAML blobs, without a checkout.
//! - [`clones`] keeps a warm clone per repository and base branch between promotions.
//! - [`PullRequestStrategy`] puts them together as the `pull-request` promotion strategy.
#![forbid(unsafe_code)]

pub mod clones;
pub mod credentials;
pub mod forge;
pub mod git;
pub mod markers;
pub mod objects;
pub mod repo_url;
mod strategy;
#[cfg(feature = "testing")]
pub mod testing;

pub use clones::{CloneCacheLimits, DEFAULT_CLONE_CACHE_MAX_BYTES, DEFAULT_CLONE_CACHE_MAX_CLONES};
pub use strategy::{
    DEFAULT_AUTHOR_EMAIL, DEFAULT_AUTHOR_NAME, DEFAULT_MESSAGE, PullRequestSettings,
    PullRequestStrategy, promotion_branch,
};
