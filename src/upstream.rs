//! Upstream groups: their targets (resolved once per config generation), round-robin choice,
//! and timeouts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub targets: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    cursor: AtomicUsize,
}

impl Upstream {
    pub fn new(
        name: String,
        targets: Vec<SocketAddr>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Self {
        Upstream {
            name,
            targets,
            connect_timeout,
            read_timeout,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The next target in round-robin order (`None` only for an empty group, which validation
    /// rejects).
    pub fn next_target(&self) -> Option<SocketAddr> {
        if self.targets.is_empty() {
            return None;
        }
        let i = self.cursor.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        Some(self.targets[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_visits_every_target() {
        let targets: Vec<SocketAddr> = vec![
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
        ];
        let up = Upstream::new(
            "u".into(),
            targets.clone(),
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let picked: Vec<_> = (0..4).filter_map(|_| up.next_target()).collect();
        assert_eq!(picked, [targets[0], targets[1], targets[0], targets[1]]);
    }
}
