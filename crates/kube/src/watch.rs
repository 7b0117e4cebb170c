//! The one way this crate keeps a watch running: a reflector (or a raw event stream) in a
//! task that is aborted when its owner is dropped, with warnings throttled so a cluster
//! that is away does not flood the log.

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use pipeline_core::Throttle;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// A background task that ends with its owner.
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often one watch's failure is logged while it keeps failing.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Starts a reflector for `api` (objects of dynamic type `dyntype`) in a task: the
/// returned store fills as the watch runs, and `changed` is notified after every change.
pub fn spawn_reflector<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    what: &'static str,
    changed: Arc<Notify>,
) -> (Store<K>, AbortOnDrop)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let warnings = Throttle::new(WARN_INTERVAL);
    let task = tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => changed.notify_one(),
                Err(err) => {
                    if let Some(held_back) = warnings.admit() {
                        tracing::warn!(watch = what, error = %err, failures_not_logged = held_back, "watch failed; retrying");
                    }
                }
            }
        }
    });
    (reader, AbortOnDrop(task))
}
