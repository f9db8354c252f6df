//! The one-machine cluster mode: the driver launches its worker processes itself (the same
//! binary in the worker role) and relaunches one that dies, under the same restart budget as
//! any supervised child.
//!
//! ```text
//!  WorkerLauncher ──spawn──► worker process i (program + args, cookie in TRIBUTARY_COOKIE)
//!        ▲                         │ exits (killed, crashed, fenced)
//!        └── budget (10 per 60 s) ◄┘   allowed: relaunched (a new incarnation joins as a new
//!                                      worker)   exhausted: stays down, reported
//! ```
//!
//! Each launch, exit and relaunch is a [`SupervisionEvent`] under the supervisor path
//! `workers` (children `workers/worker-<i>`), logged, counted and published on
//! [`WorkerLauncher::events`]. Every process is killed when the launcher is dropped.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::supervisor::{Directive, RestartLimit};
use crate::telemetry::{EventBus, EventKind, SupervisionEvent};

/// The worker processes the driver launches: which program, with which arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchConfig {
    /// The program (usually `std::env::current_exe()`: the same binary, in the worker role).
    pub program: PathBuf,
    /// Its arguments (e.g. `--worker --driver ADDR`).
    pub args: Vec<OsString>,
    /// The cookie, passed in the `TRIBUTARY_COOKIE` environment variable (not on the
    /// command line, where other users of the machine could read it).
    pub cookie: String,
    /// How many worker processes.
    pub workers: usize,
    /// Relaunches allowed per worker (default: 10 per 60 s, as for receivers).
    pub limit: RestartLimit,
    /// Environment variables set for the workers (besides the cookie).
    pub env: Vec<(OsString, OsString)>,
}

impl LaunchConfig {
    /// `workers` processes of `program args`.
    pub fn new(
        program: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
        cookie: impl Into<String>,
        workers: usize,
    ) -> LaunchConfig {
        LaunchConfig {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            cookie: cookie.into(),
            workers,
            limit: RestartLimit::Windowed {
                max_restarts: 10,
                window: Duration::from_secs(60),
            },
            env: Vec::new(),
        }
    }

    /// `workers` processes of this very program, with its own arguments, told to be workers
    /// of the driver at `driver` through `TRIBUTARY_WORKER_OF` (see
    /// [`worker_role`](crate::cluster::worker_role)): one binary, two roles.
    pub fn this_program(
        driver: std::net::SocketAddr,
        cookie: impl Into<String>,
        workers: usize,
    ) -> std::io::Result<LaunchConfig> {
        let mut c = LaunchConfig::new(
            std::env::current_exe()?,
            std::env::args_os().skip(1),
            cookie,
            workers,
        );
        c.env.push((WORKER_OF.into(), driver.to_string().into()));
        Ok(c)
    }
}

/// The environment variable that makes a program a worker of the driver it names.
pub const WORKER_OF: &str = "TRIBUTARY_WORKER_OF";

/// Runs and relaunches the worker processes (see the module documentation).
#[derive(Debug)]
pub struct WorkerLauncher {
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    bus: Arc<EventBus>,
    pids: Arc<std::sync::Mutex<Vec<Option<u32>>>>,
}

impl WorkerLauncher {
    /// Launches the workers now.
    pub fn start(config: LaunchConfig) -> WorkerLauncher {
        let bus = Arc::new(EventBus::new());
        let (stop, stopped) = watch::channel(false);
        let pids = Arc::new(std::sync::Mutex::new(vec![None; config.workers]));
        let config = Arc::new(config);
        let tasks = (0..config.workers)
            .map(|i| {
                tokio::spawn(keep_running(
                    i,
                    config.clone(),
                    bus.clone(),
                    stopped.clone(),
                    pids.clone(),
                ))
            })
            .collect();
        WorkerLauncher {
            tasks,
            stop,
            bus,
            pids,
        }
    }

    /// Launches, exits and relaunches, as supervision events.
    pub fn events(&self) -> broadcast::Receiver<SupervisionEvent> {
        self.bus.subscribe()
    }

    /// The process id of each worker's current incarnation (`None` while it is down).
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.pids.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Kills every worker process and waits for them.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for WorkerLauncher {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort(); // their children are killed on drop (`kill_on_drop`)
        }
    }
}

fn event(i: usize, kind: EventKind) -> SupervisionEvent {
    SupervisionEvent {
        supervisor: "workers".into(),
        child: format!("workers/worker-{i}").into(),
        kind,
    }
}

async fn keep_running(
    i: usize,
    config: Arc<LaunchConfig>,
    bus: Arc<EventBus>,
    mut stopped: watch::Receiver<bool>,
    pids: Arc<std::sync::Mutex<Vec<Option<u32>>>>,
) {
    let mut budget = crate::supervisor::restart_budget::RestartBudget::new(config.limit);
    let mut first = true;
    loop {
        let mut cmd = tokio::process::Command::new(&config.program);
        cmd.args(&config.args)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .env("TRIBUTARY_COOKIE", &config.cookie)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                event(
                    i,
                    EventKind::Stopped {
                        reason: format!("cannot launch {}: {e}", config.program.display()),
                    },
                )
                .emit(&bus);
                return;
            }
        };
        pids.lock().unwrap_or_else(|p| p.into_inner())[i] = child.id();
        if first {
            event(i, EventKind::Started).emit(&bus);
            first = false;
        }
        let status = tokio::select! {
            s = child.wait() => Some(s),
            _ = stopped.wait_for(|s| *s) => None,
        };
        let Some(status) = status else {
            let _ = child.kill().await;
            event(i, EventKind::ShutDown).emit(&bus);
            return;
        };
        pids.lock().unwrap_or_else(|p| p.into_inner())[i] = None;
        let why = match status {
            Ok(s) => format!("worker process exited: {s}"),
            Err(e) => format!("worker process lost: {e}"),
        };
        match budget.try_restart(tokio::time::Instant::now()) {
            Ok(n) => {
                event(
                    i,
                    EventKind::Failed {
                        error: why,
                        directive: Directive::Restart,
                        restarts_in_window: n,
                        limit_exceeded: false,
                    },
                )
                .emit(&bus);
                metrics::counter!(crate::telemetry::WORKER_RELAUNCHES_TOTAL).increment(1);
                // A short pause so that a worker failing at once does not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                event(
                    i,
                    EventKind::Restarted {
                        restarts_in_window: n,
                        counted: true,
                    },
                )
                .emit(&bus);
            }
            Err(e) => {
                event(
                    i,
                    EventKind::Failed {
                        error: why,
                        directive: Directive::Stop,
                        restarts_in_window: e.in_window,
                        limit_exceeded: true,
                    },
                )
                .emit(&bus);
                event(
                    i,
                    EventKind::Stopped {
                        reason: "relaunch limit reached: the worker stays down".into(),
                    },
                )
                .emit(&bus);
                return;
            }
        }
    }
}
