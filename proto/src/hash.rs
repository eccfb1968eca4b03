//! The canonical order of a configuration, so the same resources always encode to the same
//! bytes and hash (see [`crate::snapshot::content_hash`]), whatever order they were listed or
//! stored in. Map fields are `BTreeMap`s (see build.rs), so encoding itself is deterministic.

use crate::pb::ConfigSet;

/// Sorts every resource list by id. Routes keep their order inside an API: it breaks ties
/// between equally specific routes, so it is part of the content.
pub fn canonicalize(config: &mut ConfigSet) {
    macro_rules! sort {
        ($($list:ident),*) => {
            $(config.$list.sort_by(|a, b| id_of(a.meta.as_ref()).cmp(id_of(b.meta.as_ref())));)*
        };
    }
    sort!(
        apis,
        upstreams,
        consumers,
        credentials,
        plans,
        subscriptions,
        policies,
        brokers,
        certificates
    );
}

/// Whether every resource list of `config` is sorted as [`canonicalize`] sorts it.
pub fn is_canonical(config: &ConfigSet) -> bool {
    macro_rules! sorted {
        ($($list:ident),*) => {
            $(config
                .$list
                .windows(2)
                .all(|w| id_of(w[0].meta.as_ref()) <= id_of(w[1].meta.as_ref())))&&*
        };
    }
    sorted!(
        apis,
        upstreams,
        consumers,
        credentials,
        plans,
        subscriptions,
        policies,
        brokers,
        certificates
    )
}

fn id_of(meta: Option<&crate::pb::Meta>) -> &str {
    meta.map_or("", |m| m.id.as_str())
}
