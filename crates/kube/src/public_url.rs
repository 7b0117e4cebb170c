//! The base URL leaf clusters reach the webhook at (every generated Provider's address
//! starts with it): `--public-url` when given, else derived from what exposes the
//! controller's own Service, in this order:
//!
//! 1. an Ingress in the Service's namespace with a rule routing `/pipelines/promotions/`
//!    to the Service (Ingresses by name, rules in order): `https` when the rule's host is
//!    covered by the Ingress's `tls`, else `http`; the rule's host, else the address in the
//!    Ingress's `status.loadBalancer` (wildcard hosts are skipped);
//! 2. the Service itself when it is of type `LoadBalancer` with an address in its
//!    `status.loadBalancer`: `http://<ip or hostname>[:<port>]` (port `http`, else the
//!    first); a Service does not terminate TLS, so when something in front of it does,
//!    pass `--public-url`.
//!
//! Nothing is guessed: when neither gives an address, the answer says what was looked at
//! and why each was not usable.

use std::fmt;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

/// The path every Provider address continues with; an Ingress must route it.
const WEBHOOK_PATH: &str = "/pipelines/promotions/";

/// Where the public URL came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlSource {
    /// `--public-url`.
    Flag,
    /// An Ingress routing the webhook to the Service.
    Ingress { namespace: String, name: String },
    /// The Service's own load balancer.
    LoadBalancer { namespace: String, name: String },
}

impl fmt::Display for UrlSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flag => write!(f, "--public-url"),
            Self::Ingress { namespace, name } => write!(f, "Ingress {namespace}/{name}"),
            Self::LoadBalancer { namespace, name } => {
                write!(f, "LoadBalancer Service {namespace}/{name}")
            }
        }
    }
}

/// The outcome of [`resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicUrl {
    Found {
        url: String,
        source: UrlSource,
    },
    /// Nothing usable; each entry says what was looked at and why it did not do.
    NotFound {
        reasons: Vec<String>,
    },
}

impl fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Found { url, source } => write!(f, "{url} (from {source})"),
            Self::NotFound { reasons } => write!(
                f,
                "none found ({}); pass --public-url (Helm value publicUrl)",
                reasons.join("; ")
            ),
        }
    }
}

/// How the controller finds what exposes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    /// `--public-url`, which wins over anything derived.
    pub flag: Option<String>,
    /// The controller's own Service (the chart passes its name and the pod's namespace).
    pub service_namespace: String,
    pub service_name: String,
}

/// The public URL now, following the order in the module documentation.
pub async fn resolve(client: &Client, exposure: &Exposure) -> PublicUrl {
    if let Some(url) = &exposure.flag {
        return PublicUrl::Found {
            url: url.trim_end_matches('/').to_string(),
            source: UrlSource::Flag,
        };
    }
    let namespace = &exposure.service_namespace;
    let service_name = &exposure.service_name;
    let mut reasons = Vec::new();
    match Api::<Ingress>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            let mut ingresses = list.items;
            ingresses.sort_by_key(ResourceExt::name_any);
            for ingress in &ingresses {
                match from_ingress(ingress, service_name) {
                    Ok(Some(url)) => {
                        return PublicUrl::Found {
                            url,
                            source: UrlSource::Ingress {
                                namespace: namespace.clone(),
                                name: ingress.name_any(),
                            },
                        };
                    }
                    Ok(None) => {}
                    Err(why) => {
                        reasons.push(format!("Ingress {namespace}/{}: {why}", ingress.name_any()))
                    }
                }
            }
            if ingresses.is_empty() || reasons.is_empty() {
                reasons.push(format!(
                    "no Ingress in {namespace} routes {WEBHOOK_PATH} to Service {service_name}"
                ));
            }
        }
        Err(err) => reasons.push(format!(
            "cannot list Ingresses in {namespace}: {}",
            crate::store::describe(&err)
        )),
    }
    match Api::<Service>::namespaced(client.clone(), namespace)
        .get_opt(service_name)
        .await
    {
        Ok(Some(service)) => match from_load_balancer(&service) {
            Ok(url) => {
                return PublicUrl::Found {
                    url,
                    source: UrlSource::LoadBalancer {
                        namespace: namespace.clone(),
                        name: service_name.clone(),
                    },
                };
            }
            Err(why) => reasons.push(format!("Service {namespace}/{service_name}: {why}")),
        },
        Ok(None) => reasons.push(format!(
            "Service {namespace}/{service_name} does not exist (--service-name names the controller's Service)"
        )),
        Err(err) => reasons.push(format!(
            "cannot read Service {namespace}/{service_name}: {}",
            crate::store::describe(&err)
        )),
    }
    PublicUrl::NotFound { reasons }
}

/// The URL an Ingress gives, `None` when it does not route the webhook to the Service,
/// or why it routes it but gives no usable address.
fn from_ingress(ingress: &Ingress, service_name: &str) -> Result<Option<String>, String> {
    let Some(spec) = &ingress.spec else {
        return Ok(None);
    };
    let mut problem = None;
    for rule in spec.rules.iter().flatten() {
        let Some(http) = &rule.http else { continue };
        let routes = http.paths.iter().any(|path| {
            let to_service = path
                .backend
                .service
                .as_ref()
                .is_some_and(|s| s.name == service_name);
            let prefix = path.path.as_deref().unwrap_or("/");
            let prefix = prefix.trim_end_matches('/');
            let exact = path.path_type == "Exact";
            to_service && !exact && format!("{WEBHOOK_PATH}x").starts_with(&format!("{prefix}/"))
        });
        if !routes {
            continue;
        }
        let host = match rule.host.as_deref().filter(|h| !h.is_empty()) {
            Some(host) if host.starts_with('*') => {
                problem = Some(format!("its rule for {host} is a wildcard host"));
                continue;
            }
            Some(host) => host.to_string(),
            None => match ingress
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .and_then(|all| all.first())
                .and_then(|first| address(first.hostname.as_deref(), first.ip.as_deref()))
            {
                Some(address) => address,
                None => {
                    problem = Some(
                        "its rule has no host and its status has no load-balancer address yet"
                            .to_string(),
                    );
                    continue;
                }
            },
        };
        let tls = spec.tls.iter().flatten().any(|entry| match &entry.hosts {
            None => true,
            Some(hosts) => hosts.is_empty() || hosts.iter().any(|h| h == &host),
        });
        let scheme = if tls { "https" } else { "http" };
        return Ok(Some(format!("{scheme}://{host}")));
    }
    match problem {
        Some(problem) => Err(problem),
        None => Ok(None),
    }
}

/// The URL of a `LoadBalancer` Service's own address, or why there is none.
fn from_load_balancer(service: &Service) -> Result<String, String> {
    let spec = service.spec.as_ref();
    let kind = spec.and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP");
    if kind != "LoadBalancer" {
        return Err(format!("of type {kind}, not LoadBalancer"));
    }
    let first = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|all| all.first());
    let Some(host) = first.and_then(|LoadBalancerIngress { hostname, ip, .. }| {
        address(hostname.as_deref(), ip.as_deref())
    }) else {
        return Err("a LoadBalancer without an address in its status yet".to_string());
    };
    let ports = spec.and_then(|s| s.ports.as_ref());
    let port = ports
        .and_then(|ports| {
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some("http"))
                .or_else(|| ports.first())
        })
        .map(|p| p.port);
    Ok(match port {
        None | Some(80) => format!("http://{host}"),
        Some(port) => format!("http://{host}:{port}"),
    })
}

/// A host name, else an IP (IPv6 in brackets, as a URL needs).
fn address(hostname: Option<&str>, ip: Option<&str>) -> Option<String> {
    if let Some(hostname) = hostname.filter(|h| !h.is_empty()) {
        return Some(hostname.to_string());
    }
    ip.filter(|ip| !ip.is_empty()).map(|ip| {
        if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingress(value: serde_json::Value) -> Ingress {
        serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_ingress_gives_its_host_with_tls_deciding_the_scheme() {
        let routed = ingress(json!({
            "metadata": {"name": "pc"},
            "spec": {
                "tls": [{"hosts": ["promote.example.com"], "secretName": "tls"}],
                "rules": [
                    {"host": "*.example.org", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "pc", "port": {"name": "http"}}}}]}},
                    {"host": "promote.example.com", "http": {"paths": [{"path": "/pipelines/", "pathType": "Prefix", "backend": {"service": {"name": "pc", "port": {"name": "http"}}}}]}}
                ]
            }
        }));
        assert_eq!(
            from_ingress(&routed, "pc"),
            Ok(Some("https://promote.example.com".to_string()))
        );
        assert_eq!(from_ingress(&routed, "other"), Ok(None));
        let elsewhere = ingress(json!({
            "metadata": {"name": "pc"},
            "spec": {"rules": [{"host": "a.example", "http": {"paths": [{"path": "/api/", "pathType": "Prefix", "backend": {"service": {"name": "pc"}}}]}}]}
        }));
        assert_eq!(from_ingress(&elsewhere, "pc"), Ok(None));
        let no_host = ingress(json!({
            "metadata": {"name": "pc"},
            "spec": {"rules": [{"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "pc"}}}]}}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "2001:db8::1"}]}}
        }));
        assert_eq!(
            from_ingress(&no_host, "pc"),
            Ok(Some("http://[2001:db8::1]".to_string()))
        );
        let pending = ingress(json!({
            "metadata": {"name": "pc"},
            "spec": {"rules": [{"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "pc"}}}]}}]}
        }));
        assert!(from_ingress(&pending, "pc").is_err());
    }

    #[test]
    fn a_load_balancer_gives_its_address_and_port() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "pc"},
            "spec": {"type": "LoadBalancer", "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}]},
            "status": {"loadBalancer": {"ingress": [{"hostname": "lb.example.net"}]}}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            from_load_balancer(&service),
            Ok("http://lb.example.net:8080".to_string())
        );
        let cluster_ip: Service = serde_json::from_value(
            json!({"metadata": {"name": "pc"}, "spec": {"type": "ClusterIP"}}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(from_load_balancer(&cluster_ip).is_err());
    }
}
