//! Kubernetes Events (`core/v1`) about Promotions and Pipelines. Written directly rather
//! than through `kube::runtime::events::Recorder` because the notification strategy's
//! `Promote` event carries annotations, as Flux's own controllers' events do.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::CONTROLLER_NAME;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// Creates Events in the namespace of the object they are about.
#[derive(Clone)]
pub struct EventPublisher {
    client: Client,
    instance: String,
}

impl EventPublisher {
    /// `instance` identifies this replica (reported as `reportingInstance`).
    pub fn new(client: Client, instance: impl Into<String>) -> Self {
        Self {
            client,
            instance: instance.into(),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Creates one Event about `object`.
    pub async fn publish(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        message: &str,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), kube::Error> {
        let namespace = object.namespace.clone().unwrap_or_default();
        let now = Utc::now();
        let base = object.name.clone().unwrap_or_else(|| "object".to_string());
        let name = format!(
            "{}.{:x}",
            base.chars().take(200).collect::<String>(),
            now.timestamp_nanos_opt().unwrap_or_default()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace.clone()),
                annotations: (!annotations.is_empty()).then_some(annotations),
                ..ObjectMeta::default()
            },
            involved_object: object.clone(),
            reason: Some(reason.to_string()),
            message: Some(message.chars().take(1024).collect()),
            type_: Some(type_.as_str().to_string()),
            source: Some(EventSource {
                component: Some(CONTROLLER_NAME.to_string()),
                host: None,
            }),
            first_timestamp: Some(Time(crate::convert::timestamp(now))),
            last_timestamp: Some(Time(crate::convert::timestamp(now))),
            event_time: Some(MicroTime(crate::convert::timestamp(now))),
            count: Some(1),
            action: Some(reason.to_string()),
            reporting_component: Some(CONTROLLER_NAME.to_string()),
            reporting_instance: Some(self.instance.chars().take(128).collect()),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        tokio::time::timeout(
            Duration::from_secs(10),
            api.create(&PostParams::default(), &event),
        )
        .await
        .map_err(|_| kube::Error::Service("timed out creating an Event".into()))??;
        Ok(())
    }

    /// Like [`publish`](Self::publish) without waiting, logging failures: Events are
    /// informative, never a reason to fail.
    pub fn spawn(
        &self,
        object: ObjectReference,
        type_: EventType,
        reason: &'static str,
        message: String,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(err) = this
                .publish(&object, type_, reason, &message, BTreeMap::new())
                .await
            {
                tracing::debug!(error = %err, reason, "could not create a Kubernetes Event");
            }
        });
    }
}

/// Reference to a Pipeline for Events.
pub fn pipeline_reference(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some(pipeline_core::pipeline::API_VERSION.to_string()),
        kind: Some("Pipeline".to_string()),
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
        uid,
        ..ObjectReference::default()
    }
}

/// Reference to a Promotion for Events.
pub fn promotion_reference(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some(pipeline_core::pipeline::API_VERSION.to_string()),
        kind: Some("Promotion".to_string()),
        namespace: Some(namespace.to_string()),
        name: Some(name.to_string()),
        uid,
        ..ObjectReference::default()
    }
}
