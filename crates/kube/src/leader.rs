//! Leader election on a `coordination.k8s.io/v1` Lease, in the manner of client-go's
//! leaderelection: optimistic concurrency on the Lease's resourceVersion, expiry judged
//! by this process's own clock from when it last saw the Lease change (so clock skew
//! between replicas does not matter), and a leader that could not renew for
//! `duration - renew` stops leading before anyone else may take over.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// Unique per process.
    pub identity: String,
    /// How long a Lease is valid after its last renewal.
    pub duration: Duration,
    /// How often the holder renews and others retry.
    pub renew: Duration,
}

pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The Lease as last seen (holder, renew time, transitions) and when it was seen.
    observed: Option<(String, Option<MicroTime>, Instant)>,
}

enum Attempt {
    Leading,
    Following(Option<String>),
}

impl LeaderElector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    /// Campaigns until `shutdown`. While this process holds the Lease, `lead` runs with a
    /// token that is cancelled as soon as leadership is lost (or at shutdown); it must
    /// stop promptly then. The Lease is released on shutdown so another replica takes
    /// over at once.
    pub async fn run<F, Fut>(mut self, shutdown: CancellationToken, lead: F)
    where
        F: Fn(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let identity = self.settings.identity.clone();
        let renew_deadline = self
            .settings
            .duration
            .saturating_sub(self.settings.renew)
            .max(self.settings.renew);
        let mut leading: Option<(CancellationToken, tokio::task::JoinHandle<()>, Instant)> = None;
        let mut last_holder: Option<String> = None;
        loop {
            let started = Instant::now();
            let attempt =
                tokio::time::timeout(self.settings.renew, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(Attempt::Leading)) => match &mut leading {
                    Some((_, _, renewed)) => *renewed = started,
                    None => {
                        tracing::info!(%identity, lease = %self.settings.name, "acquired leadership");
                        let token = shutdown.child_token();
                        let task = tokio::spawn(lead(token.clone()));
                        leading = Some((token, task, started));
                    }
                },
                Ok(Ok(Attempt::Following(holder))) => {
                    if let Some((token, task, _)) = leading.take() {
                        tracing::warn!(%identity, holder = ?holder, "lost leadership: the Lease has another holder");
                        token.cancel();
                        let _ = task.await;
                    }
                    if holder != last_holder {
                        tracing::info!(%identity, leader = ?holder, "following");
                        last_holder = holder;
                    }
                }
                Ok(Err(err)) => {
                    tracing::warn!(%identity, error = %crate::store::describe(&err), "cannot acquire or renew the Lease");
                }
                Err(_) => tracing::warn!(%identity, "acquiring or renewing the Lease timed out"),
            }
            if let Some((token, task, renewed)) = leading.take() {
                if renewed.elapsed() > renew_deadline {
                    tracing::warn!(%identity, "lost leadership: could not renew the Lease in time");
                    token.cancel();
                    let _ = task.await;
                } else if task.is_finished() && !shutdown.is_cancelled() {
                    tracing::error!(%identity, "leader work ended unexpectedly; releasing the Lease");
                    token.cancel();
                    let _ = self.release().await;
                } else {
                    leading = Some((token, task, renewed));
                }
            }
            let wait = self.settings.renew.saturating_sub(started.elapsed());
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Some((token, task, _)) = leading.take() {
            token.cancel();
            let _ = task.await;
            match tokio::time::timeout(Duration::from_secs(5), self.release()).await {
                Ok(Ok(())) => tracing::info!(%identity, "released the Lease"),
                _ => {
                    tracing::warn!(%identity, "could not release the Lease; it expires on its own")
                }
            }
        }
    }

    fn fresh_spec(&self, transitions: i32) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.settings.duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let name = self.settings.name.clone();
        let Some(mut lease) = self.api.get_opt(&name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.fresh_spec(0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(Attempt::Following(None)),
                Err(err) => Err(err),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let me = &self.settings.identity;
        let now = Instant::now();
        let key = (holder.clone().unwrap_or_default(), spec.renew_time.clone());
        let seen_at = match &self.observed {
            Some((h, r, at)) if *h == key.0 && *r == key.1 => *at,
            _ => {
                self.observed = Some((key.0.clone(), key.1.clone(), now));
                now
            }
        };
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(15).max(1)).unwrap_or(15),
        );
        let mine = holder.as_deref() == Some(me.as_str());
        let expired = holder.is_none() || now.duration_since(seen_at) > duration;
        if !mine && !expired {
            return Ok(Attempt::Following(holder));
        }
        let new_spec = if mine {
            LeaseSpec {
                renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                lease_duration_seconds: self.fresh_spec(0).lease_duration_seconds,
                ..spec
            }
        } else {
            self.fresh_spec(spec.lease_transitions.unwrap_or(0).saturating_add(1))
        };
        lease.spec = Some(new_spec);
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(stored) => {
                let spec = stored.spec.unwrap_or_default();
                self.observed = Some((
                    spec.holder_identity.unwrap_or_default(),
                    spec.renew_time,
                    Instant::now(),
                ));
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(Attempt::Following(holder)),
            Err(err) => Err(err),
        }
    }

    /// Gives the Lease up if this process holds it.
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        self.api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}
