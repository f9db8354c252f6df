//! Exponential backoff with jitter between restarts.
//!
//! The n-th restart within the window waits `min(max, initial * factor^(n-1))`, then a random
//! amount of up to `jitter` times that is added (so children restarting together spread out).
//! While a child waits, it processes nothing but its mailbox keeps filling: no message is lost.

use std::time::Duration;

use crate::error::ConfigError;

/// Exponential backoff between restarts of one child.
///
/// ```
/// use std::time::Duration;
/// use tributary::Backoff;
///
/// let b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1)).jitter(0.0);
/// assert_eq!(b.delay(1), Duration::from_millis(10));
/// assert_eq!(b.delay(3), Duration::from_millis(40));
/// assert_eq!(b.delay(30), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    factor: f64,
    jitter: f64,
}

impl Backoff {
    /// Doubling backoff from `initial` up to `max`, with 20 % jitter.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            factor: 2.0,
            jitter: 0.2,
        }
    }

    /// Growth factor per restart (at least 1.0; default 2.0).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// Random extra delay as a fraction of the computed delay, in `[0, 1]` (default 0.2).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Delay before the `restart`-th restart in the window (1-based), jitter included.
    pub fn delay(&self, restart: u32) -> Duration {
        let exp = restart.saturating_sub(1).min(64) as i32;
        let base = self.initial.as_secs_f64() * self.factor.powi(exp);
        let capped = base.min(self.max.as_secs_f64());
        let jittered = if self.jitter > 0.0 {
            capped * (1.0 + self.jitter * fastrand::f64())
        } else {
            capped
        };
        Duration::try_from_secs_f64(jittered).unwrap_or(self.max)
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.initial > self.max {
            return Err(ConfigError::new(
                "backoff.initial",
                "must not be longer than backoff.max",
            ));
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(ConfigError::new(
                "backoff.factor",
                "must be a finite number >= 1.0",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::new("backoff.jitter", "must be within [0, 1]"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10)).jitter(0.5);
        for _ in 0..1000 {
            let d = b.delay(2);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(300),
                "{d:?}"
            );
        }
    }

    #[test]
    fn invalid_settings_are_named() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.validate().unwrap_err().setting, "backoff.initial");
        let b = Backoff::new(Duration::ZERO, Duration::from_secs(1)).factor(0.5);
        assert_eq!(b.validate().unwrap_err().setting, "backoff.factor");
        let b = Backoff::new(Duration::ZERO, Duration::from_secs(1)).jitter(2.0);
        assert_eq!(b.validate().unwrap_err().setting, "backoff.jitter");
    }
}
