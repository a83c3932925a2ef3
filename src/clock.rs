//! The run's clock. `run` uses real time (optionally sped up on the simulated
//! lab); `simulate` runs the same code on tokio's paused clock, which jumps to
//! the next timer whenever every task is waiting, so nothing really sleeps.
//! Everything that waits — the scheduler and the simulated devices — goes
//! through a [`Clock`], so the two differ only here.

use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    /// Simulated seconds per real second (1 for real devices).
    speed: f64,
    /// Lab time at `start` (a resumed run goes on from where it was).
    offset_s: f64,
}

impl Clock {
    /// A clock starting now, running `speed` times faster than real time.
    pub fn new(speed: f64) -> Self {
        let speed = if speed.is_finite() && speed > 0.0 {
            speed
        } else {
            1.0
        };
        Clock {
            start: Instant::now(),
            speed,
            offset_s: 0.0,
        }
    }

    /// The same clock, reading `t_s` now.
    pub fn reading(self, t_s: f64) -> Self {
        let elapsed = self.start.elapsed().as_secs_f64() * self.speed;
        Clock {
            offset_s: if t_s.is_finite() { t_s - elapsed } else { 0.0 },
            ..self
        }
    }

    pub fn speed(&self) -> f64 {
        self.speed
    }

    /// Seconds of lab time since the clock started.
    pub fn now_s(&self) -> f64 {
        self.offset_s + self.start.elapsed().as_secs_f64() * self.speed
    }

    /// Waits `seconds` of lab time.
    pub async fn sleep(&self, seconds: f64) {
        if seconds > 0.0 && seconds.is_finite() {
            tokio::time::sleep(Duration::from_secs_f64(seconds / self.speed)).await;
        }
    }

    /// Waits until lab time `t_s` (seconds since start); returns at once if past.
    pub async fn sleep_until(&self, t_s: f64) {
        let now = self.now_s();
        if t_s > now {
            self.sleep(t_s - now).await;
        }
    }

    /// A lab-time duration in real time, for timeouts.
    pub fn real(&self, seconds: f64) -> Duration {
        Duration::from_secs_f64((seconds / self.speed).clamp(0.0, 1e9))
    }
}
