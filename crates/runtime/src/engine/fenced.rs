//! [`Fenced`]: things held until a device event (a fence) completes — staging memory a copy
//! may still read, callbacks whose tensor's memory a copy may still read.
//!
//! Invariant: an item leaves only through [`Fenced::take_ready`] once its fence has
//! completed (or failed: a fence that cannot be queried never completes, and holding its
//! item forever would leak it), or through [`Fenced::take_all`] when nothing can read any
//! more.

use std::sync::Arc;

use crate::device::Event;

/// Items, each waiting for its fence.
pub(crate) struct Fenced<T> {
    waiting: Vec<(T, Arc<dyn Event>)>,
}

impl<T> Default for Fenced<T> {
    fn default() -> Self {
        Fenced { waiting: Vec::new() }
    }
}

impl<T> Fenced<T> {
    /// Holds `item` until `fence` completes.
    pub(crate) fn push(&mut self, item: T, fence: Arc<dyn Event>) {
        self.waiting.push((item, fence));
    }

    /// True when nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The items whose fences have completed, in the order held; the others stay.
    pub(crate) fn take_ready(&mut self) -> Vec<T> {
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(_, f)| f.query().unwrap_or(true));
        self.waiting = waiting;
        ready.into_iter().map(|(item, _)| item).collect()
    }

    /// Every item, whatever its fence.
    pub(crate) fn take_all(&mut self) -> Vec<T> {
        std::mem::take(&mut self.waiting)
            .into_iter()
            .map(|(item, _)| item)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostEvent;

    #[test]
    fn items_leave_once_their_fence_completes_in_the_order_held() {
        let (a, _fire_a) = HostEvent::manual();
        let (b, fire_b) = HostEvent::manual();
        let (c, fire_c) = HostEvent::manual();
        fire_c.fire();
        let mut f = Fenced::default();
        f.push(1, Arc::new(a) as Arc<dyn Event>);
        f.push(2, Arc::new(b) as Arc<dyn Event>);
        f.push(3, Arc::new(c) as Arc<dyn Event>);
        assert_eq!(f.take_ready(), vec![3]);
        assert_eq!(f.take_ready(), Vec::<i32>::new());
        fire_b.fire();
        assert_eq!(f.take_ready(), vec![2]);
        assert!(!f.is_empty());
        assert_eq!(f.take_all(), vec![1]);
        assert!(f.is_empty());
    }
}
