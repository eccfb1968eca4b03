//! Kind-agnostic access to resources: their kind, meta and references, and conversions
//! between a [`ConfigSet`] and a flat list of [`Resource`]s.

use crate::pb::{self, ConfigSet, Resource, ResourceKind, resource::Kind};

/// Applies `$body` to the resource inside a `Resource`, whatever its kind.
macro_rules! with_inner {
    ($resource:expr, $inner:ident => $body:expr) => {
        match $resource {
            Some(Kind::Api($inner)) => Some($body),
            Some(Kind::Upstream($inner)) => Some($body),
            Some(Kind::Consumer($inner)) => Some($body),
            Some(Kind::Credential($inner)) => Some($body),
            Some(Kind::Plan($inner)) => Some($body),
            Some(Kind::Subscription($inner)) => Some($body),
            Some(Kind::Policy($inner)) => Some($body),
            Some(Kind::Broker($inner)) => Some($body),
            Some(Kind::Certificate($inner)) => Some($body),
            None => None,
        }
    };
}

impl Resource {
    pub fn kind(&self) -> ResourceKind {
        match &self.kind {
            Some(Kind::Api(_)) => ResourceKind::Api,
            Some(Kind::Upstream(_)) => ResourceKind::Upstream,
            Some(Kind::Consumer(_)) => ResourceKind::Consumer,
            Some(Kind::Credential(_)) => ResourceKind::Credential,
            Some(Kind::Plan(_)) => ResourceKind::Plan,
            Some(Kind::Subscription(_)) => ResourceKind::Subscription,
            Some(Kind::Policy(_)) => ResourceKind::Policy,
            Some(Kind::Broker(_)) => ResourceKind::Broker,
            Some(Kind::Certificate(_)) => ResourceKind::Certificate,
            None => ResourceKind::Unspecified,
        }
    }

    pub fn meta(&self) -> Option<&pb::Meta> {
        with_inner!(&self.kind, r => r.meta.as_ref()).flatten()
    }

    pub fn meta_mut(&mut self) -> Option<&mut pb::Meta> {
        with_inner!(&mut self.kind, r => r.meta.as_mut()).flatten()
    }

    /// The id, or "" when the resource has no meta.
    pub fn id(&self) -> &str {
        self.meta().map_or("", |m| m.id.as_str())
    }

    /// The ids of the resources this one refers to, with their kinds.
    pub fn references(&self) -> Vec<(ResourceKind, &str)> {
        use pb::route::Action;
        let mut refs = Vec::new();
        match &self.kind {
            Some(Kind::Consumer(consumer)) => refs.extend(
                consumer
                    .policy_ids
                    .iter()
                    .map(|id| (ResourceKind::Policy, id.as_str())),
            ),
            Some(Kind::Api(api)) => {
                refs.extend(
                    api.policy_ids
                        .iter()
                        .map(|id| (ResourceKind::Policy, id.as_str())),
                );
                for route in &api.routes {
                    refs.extend(
                        route
                            .policy_ids
                            .iter()
                            .map(|id| (ResourceKind::Policy, id.as_str())),
                    );
                    match &route.action {
                        Some(Action::Proxy(p)) => {
                            refs.push((ResourceKind::Upstream, p.upstream_id.as_str()));
                            refs.extend(
                                p.canaries
                                    .iter()
                                    .map(|c| (ResourceKind::Upstream, c.upstream_id.as_str())),
                            );
                            refs.extend(
                                p.mirror
                                    .iter()
                                    .map(|m| (ResourceKind::Upstream, m.upstream_id.as_str())),
                            );
                        }
                        Some(Action::Publish(p)) => {
                            refs.push((ResourceKind::Broker, p.broker_id.as_str()))
                        }
                        Some(Action::Subscribe(s)) => {
                            refs.push((ResourceKind::Broker, s.broker_id.as_str()))
                        }
                        Some(Action::DirectResponse(_)) | None => {}
                    }
                }
            }
            Some(Kind::Credential(c)) => {
                refs.push((ResourceKind::Consumer, c.consumer_id.as_str()))
            }
            Some(Kind::Subscription(s)) => {
                refs.push((ResourceKind::Consumer, s.consumer_id.as_str()));
                refs.push((ResourceKind::Api, s.api_id.as_str()));
                refs.push((ResourceKind::Plan, s.plan_id.as_str()));
            }
            _ => {}
        }
        refs.retain(|(_, id)| !id.is_empty());
        refs.sort_unstable();
        refs.dedup();
        refs
    }
}

macro_rules! from_inner {
    ($($ty:ident => $variant:ident),*) => {$(
        impl From<pb::$ty> for Resource {
            fn from(inner: pb::$ty) -> Self {
                Self { kind: Some(Kind::$variant(inner)) }
            }
        }
    )*};
}

from_inner!(Api => Api, Upstream => Upstream, Consumer => Consumer, Credential => Credential, Plan => Plan, Subscription => Subscription, Policy => Policy, Broker => Broker, Certificate => Certificate);

impl ConfigSet {
    /// Adds a resource to the list of its kind; a resource with no kind is ignored.
    pub fn push(&mut self, resource: Resource) {
        match resource.kind {
            Some(Kind::Api(r)) => self.apis.push(r),
            Some(Kind::Upstream(r)) => self.upstreams.push(r),
            Some(Kind::Consumer(r)) => self.consumers.push(r),
            Some(Kind::Credential(r)) => self.credentials.push(r),
            Some(Kind::Plan(r)) => self.plans.push(r),
            Some(Kind::Subscription(r)) => self.subscriptions.push(r),
            Some(Kind::Policy(r)) => self.policies.push(r),
            Some(Kind::Broker(r)) => self.brokers.push(r),
            Some(Kind::Certificate(r)) => self.certificates.push(r),
            None => {}
        }
    }

    /// Every resource, kind by kind in the order of the lists.
    pub fn into_resources(self) -> Vec<Resource> {
        self.into_iter().collect()
    }

    /// The number of resources.
    pub fn len(&self) -> usize {
        self.apis.len()
            + self.upstreams.len()
            + self.consumers.len()
            + self.credentials.len()
            + self.plans.len()
            + self.subscriptions.len()
            + self.policies.len()
            + self.brokers.len()
            + self.certificates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Every resource, kind by kind in the order of the lists, one at a time: a large set is taken
/// apart without a second copy of it.
impl IntoIterator for ConfigSet {
    type Item = Resource;
    type IntoIter = Box<dyn Iterator<Item = Resource> + Send>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(
            self.apis
                .into_iter()
                .map(Resource::from)
                .chain(self.upstreams.into_iter().map(Resource::from))
                .chain(self.consumers.into_iter().map(Resource::from))
                .chain(self.credentials.into_iter().map(Resource::from))
                .chain(self.plans.into_iter().map(Resource::from))
                .chain(self.subscriptions.into_iter().map(Resource::from))
                .chain(self.policies.into_iter().map(Resource::from))
                .chain(self.brokers.into_iter().map(Resource::from))
                .chain(self.certificates.into_iter().map(Resource::from)),
        )
    }
}

impl FromIterator<Resource> for ConfigSet {
    fn from_iter<I: IntoIterator<Item = Resource>>(iter: I) -> Self {
        let mut set = ConfigSet::default();
        for resource in iter {
            set.push(resource);
        }
        set
    }
}

/// The kind a collection name (`apis`, `upstreams`, ...) stands for.
pub fn kind_from_collection(name: &str) -> Option<ResourceKind> {
    [
        ResourceKind::Api,
        ResourceKind::Upstream,
        ResourceKind::Consumer,
        ResourceKind::Credential,
        ResourceKind::Plan,
        ResourceKind::Subscription,
        ResourceKind::Policy,
        ResourceKind::Broker,
        ResourceKind::Certificate,
    ]
    .into_iter()
    .find(|kind| crate::validate::list_name(*kind) == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declarative::{Format, load};

    #[test]
    fn resources_round_trip_through_a_config_set() {
        let config = load(
            include_str!("../../deploy/examples/sluice.yaml"),
            Format::Yaml,
        )
        .unwrap();
        let resources = config.clone().into_resources();
        assert_eq!(resources.len(), config.len());
        let subscription = resources
            .iter()
            .find(|r| r.kind() == ResourceKind::Subscription)
            .unwrap();
        assert_eq!(subscription.references().len(), 3);
        let api = resources
            .iter()
            .find(|r| r.meta().unwrap().name == "orders")
            .unwrap();
        let kinds: Vec<_> = api.references().into_iter().map(|(k, _)| k).collect();
        assert!(kinds.contains(&ResourceKind::Upstream) && kinds.contains(&ResourceKind::Broker));
        assert_eq!(resources.into_iter().collect::<ConfigSet>(), config);
        assert_eq!(kind_from_collection("policies"), Some(ResourceKind::Policy));
        assert_eq!(kind_from_collection("nope"), None);
    }
}
