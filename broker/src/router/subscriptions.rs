//! The subscription tree: topic filters by level, matched against a topic name in time that
//! follows the topic's depth, not the number of subscriptions.
//!
//! A filter `a/+/c` is stored along the path `a` → `+` → `c`; `a/#` as a `#` child of `a`, which
//! matches `a` itself and everything below it. Shared subscriptions (`$share/<group>/<filter>`)
//! are stored at their filter's node as groups; a group is the set of members with the same
//! scope, group name and filter, and each matching message goes to one member of it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::session::Session;
use crate::message::{QoS, SubscriptionOptions};
use crate::topic::SubscriptionFilter;

/// One session's subscription at a node.
struct Subscriber {
    session: Arc<Session>,
    options: SubscriptionOptions,
}

/// A shared subscription group at a node.
struct Group {
    /// Only sessions with the same share scope join one group (see the router's docs).
    scope: Arc<str>,
    name: Box<str>,
    members: Vec<Subscriber>,
    /// Round-robin position.
    next: AtomicUsize,
}

#[derive(Default)]
struct Node {
    children: Children,
    subscribers: Vec<Subscriber>,
    groups: Vec<Group>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.groups.is_empty()
    }
}

/// A node's children by level. Most nodes have one or two (`devices/<id>/cmd`: one per device),
/// where a hash map's smallest table would cost more than the node itself.
enum Children {
    Few(Vec<(Box<str>, Node)>),
    Many(HashMap<Box<str>, Node>),
}

/// Beyond this many children a node looks them up by hash.
const FEW: usize = 8;

impl Default for Children {
    fn default() -> Self {
        Children::Few(Vec::new())
    }
}

impl Children {
    fn is_empty(&self) -> bool {
        match self {
            Children::Few(few) => few.is_empty(),
            Children::Many(many) => many.is_empty(),
        }
    }

    fn get(&self, level: &str) -> Option<&Node> {
        match self {
            Children::Few(few) => few.iter().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Many(many) => many.get(level),
        }
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut Node> {
        match self {
            Children::Few(few) => few.iter_mut().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Many(many) => many.get_mut(level),
        }
    }

    fn get_or_insert(&mut self, level: &str) -> &mut Node {
        if let Children::Few(few) = self {
            if few.len() >= FEW && !few.iter().any(|(l, _)| &**l == level) {
                *self = Children::Many(std::mem::take(few).into_iter().collect());
            }
        }
        match self {
            Children::Few(few) => match few.iter().position(|(l, _)| &**l == level) {
                Some(at) => &mut few[at].1,
                None => {
                    few.push((level.into(), Node::default()));
                    &mut few.last_mut().expect("just pushed").1
                }
            },
            Children::Many(many) => many.entry(level.into()).or_default(),
        }
    }

    fn remove(&mut self, level: &str) {
        match self {
            Children::Few(few) => few.retain(|(l, _)| &**l != level),
            Children::Many(many) => {
                many.remove(level);
            }
        }
    }
}

/// What a session's matching subscriptions, taken together, ask of a message.
pub(crate) struct Matched {
    /// The highest QoS among them.
    pub(crate) qos: QoS,
    /// Whether any keeps the RETAIN flag as published.
    pub(crate) retain_as_published: bool,
    /// Their Subscription Identifiers.
    pub(crate) ids: Box<[u32]>,
}

/// Where a matching message goes.
pub(crate) type Target = (Arc<Session>, Matched);

/// Every subscription of every session.
#[derive(Default)]
pub(crate) struct SubscriptionTree {
    root: Node,
}

impl SubscriptionTree {
    /// Adds `session`'s subscription to `filter`, or changes its options if it exists.
    pub(crate) fn insert(
        &mut self,
        filter: &SubscriptionFilter<'_>,
        session: &Arc<Session>,
        options: SubscriptionOptions,
    ) {
        let mut node = &mut self.root;
        for level in filter.filter.split('/') {
            node = node.children.get_or_insert(level);
        }
        let subscribers = match filter.group {
            None => &mut node.subscribers,
            Some(name) => {
                let at = match node
                    .groups
                    .iter()
                    .position(|g| &*g.name == name && g.scope == session.share_scope)
                {
                    Some(at) => at,
                    None => {
                        node.groups.push(Group {
                            scope: session.share_scope.clone(),
                            name: name.into(),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        node.groups.len() - 1
                    }
                };
                &mut node.groups[at].members
            }
        };
        match subscribers.iter_mut().find(|s| Arc::ptr_eq(&s.session, session)) {
            Some(existing) => existing.options = options,
            None => subscribers.push(Subscriber {
                session: session.clone(),
                options,
            }),
        }
    }

    /// Whether no subscription is left (tests: removal prunes every node).
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// Removes `session`'s subscription to `filter`; true if it was there. Empty nodes go.
    pub(crate) fn remove(&mut self, filter: &SubscriptionFilter<'_>, session: &Arc<Session>) -> bool {
        let levels: Vec<&str> = filter.filter.split('/').collect();
        remove_at(&mut self.root, &levels, filter.group, session)
    }

    /// Every target for a message on `topic`, into `out`: one per session for its ordinary
    /// subscriptions (at the highest QoS among those that match, with all their identifiers),
    /// plus one member per matching shared group. A No Local subscription of `origin`, the
    /// publisher's own session, does not match.
    pub(crate) fn matches(&self, topic: &str, origin: Option<&Arc<Session>>, out: &mut Vec<Target>) {
        let mut found = Vec::new();
        let mut groups = Vec::new();
        collect(
            &self.root,
            Some(topic),
            topic.starts_with('$'),
            true,
            &mut found,
            &mut groups,
        );
        if let Some(origin) = origin {
            found.retain(|(session, options)| !(options.no_local && Arc::ptr_eq(session, origin)));
        }
        if found.len() > 1 {
            found.sort_unstable_by_key(|(session, _)| Arc::as_ptr(session));
        }
        let mut found = found.into_iter().peekable();
        while let Some((session, options)) = found.next() {
            let mut matched = Matching::of(&options);
            while let Some((_, more)) = found.next_if(|(next, _)| Arc::ptr_eq(next, &session)) {
                matched.add(&more);
            }
            out.push((session, matched.done()));
        }
        out.extend(groups.into_iter().filter_map(pick_member));
    }
}

/// One session's matching subscriptions being merged into one delivery (MQTT-3.3.4-2, -3).
struct Matching {
    qos: QoS,
    retain_as_published: bool,
    /// Allocated only for subscriptions with identifiers.
    ids: Vec<u32>,
}

impl Matching {
    fn of(options: &SubscriptionOptions) -> Self {
        Self {
            qos: options.qos,
            retain_as_published: options.retain_as_published,
            ids: options.identifier.into_iter().collect(),
        }
    }

    fn add(&mut self, options: &SubscriptionOptions) {
        self.qos = self.qos.max(options.qos);
        self.retain_as_published |= options.retain_as_published;
        self.ids.extend(options.identifier);
    }

    fn done(self) -> Matched {
        Matched {
            qos: self.qos,
            retain_as_published: self.retain_as_published,
            ids: self.ids.into_boxed_slice(),
        }
    }
}

fn remove_at(node: &mut Node, levels: &[&str], group: Option<&str>, session: &Arc<Session>) -> bool {
    let Some((level, rest)) = levels.split_first() else {
        let before;
        match group {
            None => {
                before = node.subscribers.len();
                node.subscribers.retain(|s| !Arc::ptr_eq(&s.session, session));
                return node.subscribers.len() != before;
            }
            Some(name) => {
                let Some(at) = node
                    .groups
                    .iter()
                    .position(|g| &*g.name == name && g.scope == session.share_scope)
                else {
                    return false;
                };
                let members = &mut node.groups[at].members;
                before = members.len();
                members.retain(|s| !Arc::ptr_eq(&s.session, session));
                let removed = members.len() != before;
                if members.is_empty() {
                    node.groups.swap_remove(at);
                }
                return removed;
            }
        }
    };
    let Some(child) = node.children.get_mut(level) else {
        return false;
    };
    let removed = remove_at(child, rest, group, session);
    if child.is_empty() {
        node.children.remove(level);
    }
    removed
}

/// Collects the subscribers of every filter that matches `rest` below `node`. `dollar` and
/// `root` together keep wildcards at the first level away from `$` topics.
fn collect<'t>(
    node: &'t Node,
    rest: Option<&str>,
    dollar: bool,
    root: bool,
    out: &mut Vec<(Arc<Session>, SubscriptionOptions)>,
    groups: &mut Vec<&'t Group>,
) {
    let wildcards = !(root && dollar);
    if wildcards {
        if let Some(hash) = node.children.get("#") {
            take(hash, out, groups);
        }
    }
    let Some(rest) = rest else {
        take(node, out, groups);
        return;
    };
    let (level, below) = match rest.split_once('/') {
        Some((level, below)) => (level, Some(below)),
        None => (rest, None),
    };
    if let Some(child) = node.children.get(level) {
        collect(child, below, dollar, false, out, groups);
    }
    if wildcards {
        if let Some(plus) = node.children.get("+") {
            collect(plus, below, dollar, false, out, groups);
        }
    }
}

fn take<'t>(node: &'t Node, out: &mut Vec<(Arc<Session>, SubscriptionOptions)>, groups: &mut Vec<&'t Group>) {
    out.extend(node.subscribers.iter().map(|s| (s.session.clone(), s.options)));
    groups.extend(node.groups.iter());
}

/// One member of a group, in turn, preferring members that are online with room.
fn pick_member(group: &Group) -> Option<Target> {
    let count = group.members.len();
    if count == 0 {
        return None;
    }
    let start = group.next.fetch_add(1, Ordering::Relaxed) % count;
    let chosen = (0..count)
        .map(|i| &group.members[(start + i) % count])
        .find(|m| m.session.is_accepting())
        .unwrap_or(&group.members[start]);
    Some((chosen.session.clone(), Matching::of(&chosen.options).done()))
}
