//! Queues between threads that sleep at once when empty.
//!
//! Every hand-off in wpfs (FUSE thread → Raft driver, driver → peer link,
//! applied command → invalidation thread, reply → waiting caller) went
//! through crossbeam channels first. Their receivers spin and call
//! `sched_yield()` a few times before they sleep. With three daemons on
//! two cores that spinning was a quarter of a follower's CPU time (perf,
//! during a WordPress tree extraction), taken from the threads that had
//! work. A mutex, a condition variable and a `VecDeque` do the same job
//! and sleep in the kernel on the first miss.
//!
//! Senders never block: a bounded mailbox that is full refuses the item
//! (`Full`), so the caller decides (the peer link reports the peer as
//! unreachable; Raft retries). Several receivers may share one mailbox
//! (the replication workers).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why an item was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// A bounded mailbox is at capacity.
    Full,
    /// Every receiver is gone.
    Closed,
}

/// Why nothing was received.
#[derive(Debug, PartialEq, Eq)]
pub enum RecvError {
    Timeout,
    /// Empty, and every sender is gone.
    Closed,
}

struct State<T> {
    items: VecDeque<T>,
    capacity: usize,
    senders: usize,
    receivers: usize,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    filled: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock leaves a consistent VecDeque.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Sender<T>(Arc<Shared<T>>);
pub struct Receiver<T>(Arc<Shared<T>>);

/// A mailbox that holds any number of items.
pub fn unbounded<T>() -> (Sender<T>, Receiver<T>) {
    bounded(usize::MAX)
}

/// A mailbox that refuses items beyond `capacity`.
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            capacity,
            senders: 1,
            receivers: 1,
        }),
        filled: Condvar::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    pub fn send(&self, item: T) -> Result<(), SendError> {
        self.queue(item)?;
        self.0.filled.notify_one();
        Ok(())
    }

    /// Queues `item` without waking a receiver: for a queue that whoever
    /// adds to it usually empties itself (the Raft driver's, see `node`).
    pub fn queue(&self, item: T) -> Result<(), SendError> {
        let mut state = self.0.lock();
        if state.receivers == 0 {
            return Err(SendError::Closed);
        }
        if state.items.len() >= state.capacity {
            return Err(SendError::Full);
        }
        state.items.push_back(item);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().items.is_empty()
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting as long as it takes; `None` once empty and
    /// every sender is gone.
    pub fn recv(&self) -> Option<T> {
        let mut state = self.0.lock();
        loop {
            if let Some(item) = state.items.pop_front() {
                return Some(item);
            }
            if state.senders == 0 {
                return None;
            }
            state = self.0.filled.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.0.lock();
        loop {
            if let Some(item) = state.items.pop_front() {
                return Ok(item);
            }
            if state.senders == 0 {
                return Err(RecvError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RecvError::Timeout);
            }
            state = match self.0.filled.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// The next item if one is queued.
    pub fn try_recv(&self) -> Option<T> {
        self.0.lock().items.pop_front()
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.0.lock().receivers += 1;
        Receiver(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.senders -= 1;
        if state.senders == 0 {
            drop(state);
            self.0.filled.notify_all(); // receivers learn they are done
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.receivers -= 1;
        if state.receivers == 0 {
            // Nobody will take them: drop queued items (and the reply
            // senders inside them, which wakes whoever waits on those).
            let items = std::mem::take(&mut state.items);
            drop(state);
            drop(items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_capacity_and_closing() {
        let (tx, rx) = bounded(2);
        assert!(tx.is_empty());
        assert_eq!(tx.send(1), Ok(()));
        assert_eq!(tx.queue(2), Ok(()), "queued quietly, in order");
        assert!(!tx.is_empty());
        assert_eq!(tx.send(3), Err(SendError::Full));
        assert_eq!(tx.queue(3), Err(SendError::Full));
        assert_eq!(rx.recv(), Some(1));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), None);
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(10)),
            Err(RecvError::Timeout)
        );
        let tx2 = tx.clone();
        drop(tx);
        tx2.send(4).unwrap();
        drop(tx2);
        assert_eq!(rx.recv(), Some(4)); // queued items outlive the senders
        assert_eq!(rx.recv(), None);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(RecvError::Closed)
        );
    }

    #[test]
    fn a_sleeping_receiver_wakes_for_a_send_from_another_thread() {
        let (tx, rx) = unbounded();
        let rx2 = rx.clone();
        let waiter = std::thread::spawn(move || rx2.recv_timeout(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        tx.send("hello").unwrap();
        assert_eq!(waiter.join().unwrap(), Ok("hello"));
        drop(rx);
        // The clone was the last receiver, gone with its thread.
        assert_eq!(tx.send("nobody"), Err(SendError::Closed));
    }
}
