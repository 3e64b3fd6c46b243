//! Log lines that a fault repeats once per chunk (a full disk refuses every
//! new chunk; a lost chunk fails every read of it) are let through at most
//! once per interval, saying how many were held back meanwhile. Otherwise
//! one upload onto a full disk writes thousands of lines into a log that
//! usually lives on that very disk.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub struct Throttle {
    every: Duration,
    /// When a line last went through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub const fn new(every: Duration) -> Self {
        Throttle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Whether a line may be logged now: `Some(lines held back since the
    /// last one)`, or None (counted as held back).
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock();
        match state.0 {
            Some(at) if at.elapsed() < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(Instant::now());
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

/// " (and N more like it)" for a line that `admit` let through after
/// holding back N, or nothing.
pub fn held_back(n: u64) -> String {
    match n {
        0 => String::new(),
        n => format!(" (and {n} more like it)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_then_the_count_of_those_held_back() {
        let throttle = Throttle::new(Duration::from_millis(200));
        assert_eq!(throttle.admit(), Some(0));
        assert_eq!(throttle.admit(), None);
        assert_eq!(throttle.admit(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(throttle.admit(), Some(2));
        assert_eq!(throttle.admit(), None);
    }
}
