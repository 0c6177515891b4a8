//! The stages' supervisor: spawns each stage by name on one tracker, and turns a stage that ends
//! before it was told to (an error, a panic, or simply returning) into the agent's fatal error,
//! stopping the others. Owns no stage and no channel; `app` wires them.

use std::sync::{Arc, Mutex, PoisonError};

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::FatalError;

/// A stage's future, as spawned.
pub(super) type StageFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<(), FatalError>> + Send>>;

/// The running stages: what stops them, what waits for them, and the first failure.
pub(super) struct Supervisor {
    /// Cancelled by the caller's token or by a failing stage.
    pub(super) stages: CancellationToken,
    pub(super) tracker: TaskTracker,
    failure: Arc<Mutex<Option<FatalError>>>,
}

impl Supervisor {
    /// Stages stop on a child of `shutdown`.
    pub(super) fn new(shutdown: &CancellationToken) -> Self {
        Supervisor {
            stages: shutdown.child_token(),
            tracker: TaskTracker::new(),
            failure: Arc::default(),
        }
    }

    /// Every stage runs until `stages` is cancelled. One that ends before that (a panic, a
    /// fatal error) is logged by name and stops the others: the journal makes a restart by the
    /// service manager lossless, while a half-running pipeline would silently stall.
    pub(super) fn stage(&self, name: &'static str, fut: StageFuture) {
        let (stages, failure) = (self.stages.clone(), Arc::clone(&self.failure));
        self.tracker.spawn(async move {
            let outcome = std::panic::AssertUnwindSafe(fut).catch_unwind().await;
            if stages.is_cancelled() {
                return;
            }
            let error = why_stopped(name, outcome.ok());
            tracing::error!(stage = name, error = %error, "stage stopped unexpectedly; stopping the agent");
            failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert(error);
            stages.cancel();
        });
    }

    /// Waits until the stages are told to stop, then up to `grace` for them to finish; the
    /// first stage's failure, if one stopped the agent.
    pub(super) async fn wait(self, grace: std::time::Duration) -> Result<(), FatalError> {
        self.stages.cancelled().await;
        tracing::info!("shutting down: finishing or journaling work in progress");
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "some stages did not stop in time; their work resumes at the next start"
            );
        }
        let failed = self
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The error a stage that ended unasked stops the agent with: its own, or that it ended, or
/// (`None`) that it panicked.
fn why_stopped(stage: &'static str, ended: Option<Result<(), FatalError>>) -> FatalError {
    match ended {
        Some(Ok(())) => FatalError::Stage {
            stage,
            detail: "ended".into(),
        },
        Some(Err(e)) => e,
        None => FatalError::Stage {
            stage,
            detail: "panicked".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_that_ends_unasked_says_how() {
        let detail = |e: FatalError| match e {
            FatalError::Stage { stage, detail } => format!("{stage}: {detail}"),
            other => format!("other: {other}"),
        };
        assert_eq!(detail(why_stopped("claim", Some(Ok(())))), "claim: ended");
        assert_eq!(detail(why_stopped("poll", None)), "poll: panicked");
        let own = FatalError::Stage {
            stage: "watch",
            detail: "inotify".into(),
        };
        assert_eq!(
            detail(why_stopped("settle", Some(Err(own)))),
            "watch: inotify"
        );
    }

    #[tokio::test]
    async fn a_stage_that_ends_unasked_stops_the_others_and_is_the_failure() {
        let shutdown = CancellationToken::new();
        let sup = Supervisor::new(&shutdown);
        let stages = sup.stages.clone();
        sup.stage(
            "sort",
            Box::pin(async move {
                stages.cancelled().await;
                Ok(())
            }),
        );
        sup.stage("upload", Box::pin(async { Ok(()) }));
        sup.tracker.close();
        let got = sup.wait(std::time::Duration::from_secs(60)).await;
        assert!(
            matches!(
                got,
                Err(FatalError::Stage {
                    stage: "upload",
                    ..
                })
            ),
            "{got:?}"
        );
        assert!(
            !shutdown.is_cancelled(),
            "the caller's token is not touched"
        );
    }
}
