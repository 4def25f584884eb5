//! Retained messages: the last retained message of each topic, bounded in count and bytes, in a
//! tree by topic level so a SUBSCRIBE visits only the topics its filter can match.

use std::collections::HashMap;
use std::sync::Arc;

use crate::message::Message;

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

/// Why a retained message was not stored (it is still delivered to current subscribers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `limits.max_retained_messages` topics already hold a retained message.
    TooMany,
    /// Storing it would exceed `limits.max_retained_bytes`.
    TooLarge,
}

/// The retained messages and their bounds.
pub(crate) struct RetainedStore {
    root: Node,
    count: usize,
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
}

impl RetainedStore {
    pub(crate) fn new(max_count: usize, max_bytes: usize) -> Self {
        Self {
            root: Node::default(),
            count: 0,
            bytes: 0,
            max_count,
            max_bytes,
        }
    }

    /// Messages and bytes held.
    pub(crate) fn size(&self) -> (usize, usize) {
        (self.count, self.bytes)
    }

    /// Stores `message` as its topic's retained message; an empty payload deletes it instead.
    pub(crate) fn store(&mut self, message: &Arc<Message>) -> Result<(), Refused> {
        if message.payload.is_empty() {
            let levels: Vec<&str> = message.topic.split('/').collect();
            if let Some(old) = remove(&mut self.root, &levels) {
                self.count -= 1;
                self.bytes -= old.size();
            }
            return Ok(());
        }
        let old_size = self.get(&message.topic).map(|m| m.size());
        let count_after = self.count + usize::from(old_size.is_none());
        let bytes_after = self.bytes - old_size.unwrap_or(0) + message.size();
        if count_after > self.max_count {
            return Err(Refused::TooMany);
        }
        if bytes_after > self.max_bytes {
            return Err(Refused::TooLarge);
        }
        let mut node = &mut self.root;
        for level in message.topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node.message = Some(message.clone());
        self.count = count_after;
        self.bytes = bytes_after;
        Ok(())
    }

    fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref()
    }

    /// Every retained message whose topic `filter` (valid, no `$share/`) matches.
    pub(crate) fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        visit(&self.root, &levels, true, &mut out);
        out
    }
}

fn remove(node: &mut Node, levels: &[&str]) -> Option<Arc<Message>> {
    let Some((level, rest)) = levels.split_first() else {
        return node.message.take();
    };
    let child = node.children.get_mut(*level)?;
    let removed = remove(child, rest);
    if child.message.is_none() && child.children.is_empty() {
        node.children.remove(*level);
    }
    removed
}

fn visit(node: &Node, levels: &[&str], root: bool, out: &mut Vec<Arc<Message>>) {
    let Some((level, rest)) = levels.split_first() else {
        out.extend(node.message.iter().cloned());
        return;
    };
    // Wildcards at the first level never reach topics that start with '$'.
    let reachable = |name: &str| !(root && name.starts_with('$'));
    match *level {
        "#" => {
            // "a/#" matches "a" itself too.
            out.extend(node.message.iter().filter(|_| !root).cloned());
            for (name, child) in &node.children {
                if reachable(name) {
                    everything(child, out);
                }
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if reachable(name) {
                    visit(child, rest, false, out);
                }
            }
        }
        exact => {
            if let Some(child) = node.children.get(exact) {
                visit(child, rest, false, out);
            }
        }
    }
}

fn everything(node: &Node, out: &mut Vec<Arc<Message>>) {
    out.extend(node.message.iter().cloned());
    for child in node.children.values() {
        everything(child, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::QoS;

    fn message(topic: &str, payload: &str) -> Arc<Message> {
        Message::new(topic, payload.as_bytes(), QoS::AtLeastOnce, true)
    }

    fn topics(store: &RetainedStore, filter: &str) -> Vec<String> {
        let mut found: Vec<String> = store.matching(filter).iter().map(|m| m.topic.to_string()).collect();
        found.sort();
        found
    }

    #[test]
    fn filters_find_what_they_match_and_dollar_topics_only_by_name() {
        let mut store = RetainedStore::new(100, 10_000);
        for topic in ["a", "a/b", "a/b/c", "a/x/c", "$SYS/load", "b"] {
            store.store(&message(topic, "v")).unwrap();
        }
        assert_eq!(topics(&store, "#"), ["a", "a/b", "a/b/c", "a/x/c", "b"]);
        assert_eq!(topics(&store, "a/#"), ["a", "a/b", "a/b/c", "a/x/c"]);
        assert_eq!(topics(&store, "a/+/c"), ["a/b/c", "a/x/c"]);
        assert_eq!(topics(&store, "+"), ["a", "b"]);
        assert_eq!(topics(&store, "$SYS/#"), ["$SYS/load"]);
        assert_eq!(topics(&store, "a/b"), ["a/b"]);
    }

    #[test]
    fn an_empty_payload_deletes_and_bounds_refuse_new_topics_only() {
        let mut store = RetainedStore::new(2, 100);
        store.store(&message("a", "1")).unwrap();
        store.store(&message("b", "1")).unwrap();
        assert_eq!(store.store(&message("c", "1")), Err(Refused::TooMany));
        store.store(&message("a", "2")).unwrap();
        assert_eq!(store.store(&message("a", &"x".repeat(200))), Err(Refused::TooLarge));
        store.store(&message("b", "")).unwrap();
        assert_eq!(store.size(), (1, 2));
        store.store(&message("c", "1")).unwrap();
        assert_eq!(topics(&store, "#"), ["a", "c"]);
        assert_eq!(&store.matching("a")[0].payload[..], b"2");
    }
}
