//! Git-side of pull-request promotions: rewriting marked YAML values, git CLI, forge providers.
//!
//! For now only [`markers`] exists: it finds `# {"$promotion": "ns:name:env"}` markers in a
//! GitOps repository and rewrites the marked values in place.
#![forbid(unsafe_code)]

pub mod markers;
