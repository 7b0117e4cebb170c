//! The public URL's derivation against a real kube-apiserver (pipeline-testenv): the
//! documented order (flag, Ingress, LoadBalancer Service), with statuses written through
//! the status subresource as an ingress controller or a cloud load balancer would.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use pipeline_kube::public_url::{Exposure, PublicUrl, UrlSource, resolve};
use pipeline_testenv::TestCluster;
use serde_json::json;

const NS: &str = "pipeline-system";

fn exposure(flag: Option<&str>) -> Exposure {
    Exposure {
        flag: flag.map(str::to_string),
        service_namespace: NS.to_string(),
        service_name: "pc".to_string(),
    }
}

fn ingress(name: &str, path: &str, path_type: &str, host: Option<&str>) -> Ingress {
    let mut rule = json!({"http": {"paths": [{"path": path, "pathType": path_type,
        "backend": {"service": {"name": "pc", "port": {"name": "http"}}}}]}});
    if let Some(host) = host {
        rule["host"] = json!(host);
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": NS},
        "spec": {"rules": [rule]},
    }))
    .unwrap()
}

#[tokio::test]
async fn the_public_url_follows_the_documented_order() {
    let cluster = TestCluster::start().await.unwrap();
    cluster.ensure_namespace(NS).await.unwrap();
    let client = cluster.client();
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), NS);

    // Nothing at all: none, saying what was looked at.
    let PublicUrl::NotFound { reasons } = resolve(&client, &exposure(None)).await else {
        panic!("a URL out of nothing")
    };
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("Service pipeline-system/pc does not exist")),
        "{reasons:?}"
    );

    // A LoadBalancer Service without an address yet: still none.
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "pc", "namespace": NS},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "http", "port": 8443, "targetPort": 8080}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let PublicUrl::NotFound { reasons } = resolve(&client, &exposure(None)).await else {
        panic!("a URL without an address")
    };
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("without an address in its status yet")),
        "{reasons:?}"
    );
    // The cloud gives it a host name.
    services
        .patch_status(
            "pc",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"hostname": "lb.example.net"}]}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        resolve(&client, &exposure(None)).await,
        PublicUrl::Found {
            url: "http://lb.example.net:8443".into(),
            source: UrlSource::LoadBalancer {
                namespace: NS.into(),
                name: "pc".into()
            },
        }
    );

    // An Ingress that routes only an exact path, or another path, does not count.
    ingresses
        .create(
            &PostParams::default(),
            &ingress("a-exact", "/pipelines/", "Exact", Some("exact.example.com")),
        )
        .await
        .unwrap();
    ingresses
        .create(
            &PostParams::default(),
            &ingress("b-api", "/api/", "Prefix", Some("api.example.com")),
        )
        .await
        .unwrap();
    assert!(matches!(
        resolve(&client, &exposure(None)).await,
        PublicUrl::Found {
            source: UrlSource::LoadBalancer { .. },
            ..
        }
    ));

    // An Ingress without a host routing everything: usable once its controller wrote an
    // address into its status, and then it comes before the LoadBalancer.
    ingresses
        .create(
            &PostParams::default(),
            &ingress("c-any-host", "/", "Prefix", None),
        )
        .await
        .unwrap();
    let found = resolve(&client, &exposure(None)).await;
    assert!(
        matches!(
            &found,
            PublicUrl::Found {
                source: UrlSource::LoadBalancer { .. },
                ..
            }
        ),
        "{found:?}"
    );
    ingresses
        .patch_status(
            "c-any-host",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        resolve(&client, &exposure(None)).await,
        PublicUrl::Found {
            url: "http://198.51.100.7".into(),
            source: UrlSource::Ingress {
                namespace: NS.into(),
                name: "c-any-host".into()
            },
        }
    );

    // --public-url wins over everything, trailing slash dropped.
    assert_eq!(
        resolve(&client, &exposure(Some("https://promote.example.com/"))).await,
        PublicUrl::Found {
            url: "https://promote.example.com".into(),
            source: UrlSource::Flag,
        }
    );

    // Without the Ingress and the LoadBalancer address: none again.
    ingresses
        .delete("c-any-host", &DeleteParams::default())
        .await
        .unwrap();
    services
        .patch(
            "pc",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "ClusterIP"}})),
        )
        .await
        .unwrap();
    let PublicUrl::NotFound { reasons } = resolve(&client, &exposure(None)).await else {
        panic!("a URL from a ClusterIP Service")
    };
    assert!(
        reasons.iter().any(|r| r.contains("not LoadBalancer")),
        "{reasons:?}"
    );
}
