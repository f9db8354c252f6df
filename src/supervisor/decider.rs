//! Strategies and deciders: which [`Directive`] a failure gets.
//!
//! A [`Strategy`] belongs to a supervisor and governs all of its children. It holds
//!
//! * the *kind*: one-for-one (only the failed child is affected) or all-for-one (a restart of one
//!   child restarts its siblings too);
//! * the *decider*: an ordered list of cases matched on the failure's concrete error type
//!   (a downcast), a case for panics, and a fallback (`otherwise`, default [`Directive::Escalate`],
//!   as in Akka: a failure no case matches escalates);
//! * the *restart limit* ([`RestartLimit`], default 10 restarts per child within any 60 s) and what
//!   to do when a restart would exceed it (default [`Directive::Stop`]).
//!
//! ```
//! use std::time::Duration;
//! use tributary::{Directive, Strategy};
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("division by zero")]
//! struct ArithmeticError;
//! #[derive(Debug, thiserror::Error)]
//! #[error("null pointer")]
//! struct NullPointerError;
//! #[derive(Debug, thiserror::Error)]
//! #[error("illegal argument")]
//! struct IllegalArgumentError;
//!
//! let strategy = Strategy::one_for_one(10, Duration::from_secs(60))
//!     .on::<ArithmeticError>(Directive::Resume)
//!     .on::<NullPointerError>(Directive::Restart)
//!     .on::<IllegalArgumentError>(Directive::Stop)
//!     .otherwise(Directive::Escalate);
//! assert_eq!(strategy.decide(&ArithmeticError), Directive::Resume);
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::error::ConfigError;
use crate::supervisor::backoff::Backoff;

/// What a supervisor does with a failed child.
///
/// | directive | the failed child |
/// | --- | --- |
/// | `Resume` | keeps its state; the failing message is dropped; the next message is processed |
/// | `Restart` | its state is dropped and rebuilt by its start hook; its mailbox and reference are kept; the failing message is dropped |
/// | `Stop` | stops for good, its stop hook runs and the reason is recorded by its supervisor |
/// | `Escalate` | the supervisor itself fails with the same error and *its* supervisor decides |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Directive {
    /// Keep the child's state, drop the failing message, carry on.
    Resume,
    /// Rebuild the child's state in place through its start hook; keep its mailbox.
    Restart,
    /// Stop the child for good.
    Stop,
    /// Fail the supervisor with the same error; its own supervisor decides.
    Escalate,
}

impl Directive {
    /// Lower-case name, as used in events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Directive::Resume => "resume",
            Directive::Restart => "restart",
            Directive::Stop => "stop",
            Directive::Escalate => "escalate",
        }
    }
}

impl fmt::Display for Directive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a strategy treats the siblings of a failed child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    /// Only the failed child is affected (Akka `OneForOneStrategy`, OTP `one_for_one`).
    OneForOne,
    /// When a child is restarted, all its siblings are restarted in place too
    /// (Akka `AllForOneStrategy`, OTP `one_for_all`). Resume, Stop and Escalate affect only the
    /// failed child, as in Akka.
    AllForOne,
}

/// The restart cap: at most `max_restarts` restarts of one child within any `window`.
///
/// The window *slides*: a restart is allowed when fewer than `max_restarts` restarts of that
/// child happened in the `window` before it. This is stricter than Akka, whose window is
/// tumbling (it opens at the first restart and lets up to `2 * max` restarts through across a
/// window boundary). A child that stays healthy regains its budget as old restarts leave the
/// window. Only [`Directive::Restart`] decisions use the budget; a restart that would exceed it
/// is not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartLimit {
    /// At most `max_restarts` within any `window`.
    Windowed {
        /// Restarts allowed within the window; `0` means never restart.
        max_restarts: u32,
        /// Length of the sliding window.
        window: Duration,
    },
    /// No cap. Use with care: a child whose start hook always fails restarts forever
    /// (Akka's classic default; here only by explicit choice, e.g. in benchmarks).
    Unlimited,
}

impl Default for RestartLimit {
    fn default() -> Self {
        RestartLimit::Windowed {
            max_restarts: 10,
            window: Duration::from_secs(60),
        }
    }
}

type Matcher = Box<dyn Fn(&(dyn StdError + 'static)) -> bool + Send + Sync>;

struct Case {
    name: &'static str,
    matches: Matcher,
    directive: Directive,
}

/// A supervisor's strategy: kind, decider and restart limit. Plain data: build it with
/// [`Strategy::one_for_one`] or [`Strategy::all_for_one`] and the chained methods, then give it
/// to a supervisor.
pub struct Strategy {
    kind: StrategyKind,
    limit: RestartLimit,
    cases: Vec<Case>,
    panic: Option<Directive>,
    otherwise: Directive,
    on_limit_exceeded: Directive,
    backoff: Option<Backoff>,
}

impl fmt::Debug for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cases: Vec<_> = self.cases.iter().map(|c| (c.name, c.directive)).collect();
        f.debug_struct("Strategy")
            .field("kind", &self.kind)
            .field("limit", &self.limit)
            .field("cases", &cases)
            .field("panic", &self.panic)
            .field("otherwise", &self.otherwise)
            .field("on_limit_exceeded", &self.on_limit_exceeded)
            .field("backoff", &self.backoff)
            .finish()
    }
}

impl Default for Strategy {
    /// One-for-one, 10 restarts per 60 s, every failure escalates.
    fn default() -> Self {
        Strategy::new(StrategyKind::OneForOne, RestartLimit::default())
    }
}

impl Strategy {
    fn new(kind: StrategyKind, limit: RestartLimit) -> Self {
        Strategy {
            kind,
            limit,
            cases: Vec::new(),
            panic: None,
            otherwise: Directive::Escalate,
            on_limit_exceeded: Directive::Stop,
            backoff: None,
        }
    }

    /// A one-for-one strategy allowing `max_restarts` restarts per child within any `window`.
    pub fn one_for_one(max_restarts: u32, window: Duration) -> Self {
        Strategy::new(
            StrategyKind::OneForOne,
            RestartLimit::Windowed {
                max_restarts,
                window,
            },
        )
    }

    /// An all-for-one strategy allowing `max_restarts` restarts per child within any `window`.
    pub fn all_for_one(max_restarts: u32, window: Duration) -> Self {
        Strategy::new(
            StrategyKind::AllForOne,
            RestartLimit::Windowed {
                max_restarts,
                window,
            },
        )
    }

    /// Failures whose error is of concrete type `E` get `directive`.
    ///
    /// Cases are tried in the order they were added; the first match wins. The match is a
    /// downcast of the error the child returned (`Box<dyn Error>`), so `E` must be exactly the
    /// type that was boxed.
    pub fn on<E: StdError + 'static>(mut self, directive: Directive) -> Self {
        self.cases.push(Case {
            name: std::any::type_name::<E>(),
            matches: Box::new(|e| e.is::<E>()),
            directive,
        });
        self
    }

    /// Failures for which `predicate` holds get `directive`; `name` labels the case in
    /// [`fmt::Debug`] output. Use it for matches a type alone cannot express
    /// (an `io::ErrorKind`, an error's source chain).
    pub fn on_when<F>(mut self, name: &'static str, predicate: F, directive: Directive) -> Self
    where
        F: Fn(&(dyn StdError + 'static)) -> bool + Send + Sync + 'static,
    {
        self.cases.push(Case {
            name,
            matches: Box::new(predicate),
            directive,
        });
        self
    }

    /// Panics in the child's handler or start hook get `directive`. Without this case a panic
    /// is matched like any error of type [`PanicError`](crate::PanicError) (so
    /// `on::<PanicError>` works too) and otherwise falls through to [`Strategy::otherwise`].
    ///
    /// Resuming after a panic keeps state that may have been left half-updated; prefer Restart.
    pub fn on_panic(mut self, directive: Directive) -> Self {
        self.panic = Some(directive);
        self
    }

    /// The directive for failures no case matches (default: [`Directive::Escalate`]).
    pub fn otherwise(mut self, directive: Directive) -> Self {
        self.otherwise = directive;
        self
    }

    /// Replaces the restart limit.
    pub fn limit(mut self, limit: RestartLimit) -> Self {
        self.limit = limit;
        self
    }

    /// What a restart that would exceed the limit becomes: [`Directive::Stop`] (default) or
    /// [`Directive::Escalate`]. Other values are refused by [`Strategy::validate`].
    pub fn on_limit_exceeded(mut self, directive: Directive) -> Self {
        self.on_limit_exceeded = directive;
        self
    }

    /// Default backoff between restarts for every child of this strategy's supervisor
    /// (a child can override it, see [`ReceiverSpec::backoff`](crate::ReceiverSpec::backoff)).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// The strategy's kind.
    pub fn kind(&self) -> StrategyKind {
        self.kind
    }

    /// The restart limit.
    pub fn restart_limit(&self) -> RestartLimit {
        self.limit
    }

    /// The directive for a restart that would exceed the limit.
    pub fn limit_exceeded_directive(&self) -> Directive {
        self.on_limit_exceeded
    }

    /// The default backoff, if any.
    pub fn default_backoff(&self) -> Option<Backoff> {
        self.backoff
    }

    /// The directive this strategy's decider gives `error` (before the restart limit is applied).
    pub fn decide(&self, error: &(dyn StdError + 'static)) -> Directive {
        if let Some(directive) = self.panic {
            if error.is::<crate::PanicError>() {
                return directive;
            }
        }
        self.cases
            .iter()
            .find(|case| (case.matches)(error))
            .map_or(self.otherwise, |case| case.directive)
    }

    /// Checks the configuration; called by every supervisor before it starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let RestartLimit::Windowed { window, .. } = self.limit {
            if window.is_zero() {
                return Err(ConfigError::new(
                    "strategy.window",
                    "must be longer than zero; use RestartLimit::Unlimited for no cap",
                ));
            }
        }
        if !matches!(
            self.on_limit_exceeded,
            Directive::Stop | Directive::Escalate
        ) {
            return Err(ConfigError::new(
                "strategy.on_limit_exceeded",
                "must be Directive::Stop or Directive::Escalate",
            ));
        }
        if let Some(backoff) = &self.backoff {
            backoff.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PanicError;

    #[derive(Debug, thiserror::Error)]
    #[error("a")]
    struct A;
    #[derive(Debug, thiserror::Error)]
    #[error("b")]
    struct B;

    #[test]
    fn first_matching_case_wins_and_unmatched_escalates() {
        let s = Strategy::one_for_one(1, Duration::from_secs(1))
            .on::<A>(Directive::Resume)
            .on::<A>(Directive::Stop);
        assert_eq!(s.decide(&A), Directive::Resume);
        assert_eq!(s.decide(&B), Directive::Escalate);
    }

    #[test]
    fn panic_case_and_predicate_cases() {
        let s = Strategy::one_for_one(1, Duration::from_secs(1))
            .on_panic(Directive::Restart)
            .on_when("is b", |e| e.to_string() == "b", Directive::Stop)
            .otherwise(Directive::Resume);
        assert_eq!(s.decide(&PanicError::new("boom")), Directive::Restart);
        assert_eq!(s.decide(&B), Directive::Stop);
        assert_eq!(s.decide(&A), Directive::Resume);
    }

    #[test]
    fn boxed_errors_downcast_to_their_concrete_type() {
        let s = Strategy::default().on::<A>(Directive::Resume);
        let boxed: Box<dyn StdError + Send + Sync> = Box::new(A);
        assert_eq!(s.decide(boxed.as_ref()), Directive::Resume);
    }

    #[test]
    fn validate_names_the_setting() {
        let err = Strategy::one_for_one(3, Duration::ZERO)
            .validate()
            .unwrap_err();
        assert_eq!(err.setting, "strategy.window");
        let err = Strategy::default()
            .on_limit_exceeded(Directive::Resume)
            .validate()
            .unwrap_err();
        assert_eq!(err.setting, "strategy.on_limit_exceeded");
        assert!(Strategy::default().validate().is_ok());
    }
}
