//! The runner: reads due events from the journal, delivers them with bounded concurrency per
//! hook, and records each delivery's fate (see the module docs of `crate::hooks`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::deliver::{DeliveryError, client_for, deliver};
use crate::config::HookConfig;
use crate::journal::{HookEvent, Journal, now_ms};

/// Deliveries in progress at once for one hook.
pub(crate) const PER_HOOK_CONCURRENCY: usize = 4;
/// How often the queue is read.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// Events read from the queue at once, per hook.
const BATCH: usize = 256;
/// The first retry waits about this long, doubling each time…
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// …up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(600);

/// The wait before delivery attempt `attempt + 1` (after `attempt` failures, from 1):
/// exponential, capped, with `jitter` in 0..=1 choosing between half and all of it.
pub(crate) fn backoff(attempt: u32, jitter: f64) -> Duration {
    crate::backoff::Backoff::new(BACKOFF_MIN, BACKOFF_MAX).wait(attempt, jitter)
}

/// One configured hook, ready to deliver.
struct Ready {
    hook: HookConfig,
    client: Option<reqwest::Client>,
    slots: Arc<Semaphore>,
}

/// Delivers queued events until `shutdown`. Deliveries in progress at shutdown are abandoned
/// (their rows stay queued and are delivered again after the restart).
pub(crate) async fn run(journal: Journal, hooks: Vec<HookConfig>, shutdown: CancellationToken) {
    let mut ready: HashMap<String, Arc<Ready>> = HashMap::new();
    for hook in hooks {
        let key = hook.key();
        let client = match client_for(&hook) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(hook = %key, error = %e, "cannot set up the hook's HTTP client; its events wait");
                continue;
            }
        };
        ready.insert(
            key,
            Arc::new(Ready {
                hook,
                client,
                slots: Arc::new(Semaphore::new(PER_HOOK_CONCURRENCY)),
            }),
        );
    }
    let mut busy: HashSet<i64> = HashSet::new();
    // Events of hooks not configured now (removed, or not set up) wait for a later config;
    // they are never read, so they cannot crowd out the others.
    if let Ok(waiting) = journal.hooks_waiting().await {
        for hook in waiting.iter().filter(|h| !ready.contains_key(*h)) {
            // Such a hook may be a URL with a password, queued before those were refused.
            let hook = crate::config::redact_userinfo(hook);
            tracing::warn!(hook = %hook, "events queued for a hook that is not configured now; they wait");
        }
    }
    let keys: Vec<String> = ready.keys().cloned().collect();
    let mut tasks: JoinSet<(i64, Result<(), DeliveryError>, HookEvent, u32)> = JoinSet::new();
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok((id, result, ev, max)) = done {
                    busy.remove(&id);
                    record(&journal, ev, result, max).await;
                }
            }
            _ = tick.tick() => {
                if keys.is_empty() {
                    continue;
                }
                let due = match journal.hook_due(BATCH, keys.clone()).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the notification queue");
                        continue;
                    }
                };
                for ev in due {
                    if busy.contains(&ev.id) {
                        continue;
                    }
                    let Some(r) = ready.get(&ev.hook) else {
                        continue;
                    };
                    // A hook whose slots are all taken (slow or hanging) waits alone.
                    let Ok(permit) = Arc::clone(&r.slots).try_acquire_owned() else {
                        continue;
                    };
                    busy.insert(ev.id);
                    let r = Arc::clone(r);
                    tasks.spawn(async move {
                        let _permit = permit;
                        let result = deliver(&r.hook, r.client.as_ref(), &ev.event).await;
                        (ev.id, result, ev, r.hook.max_attempts)
                    });
                }
            }
        }
    }
    tasks.abort_all();
}

/// Records a delivery's fate in the journal.
async fn record(
    journal: &Journal,
    ev: HookEvent,
    result: Result<(), DeliveryError>,
    max_attempts: u32,
) {
    match result {
        Ok(()) => {
            tracing::debug!(hook = %ev.hook, event = ev.id, "notification delivered");
            if let Err(e) = journal.hook_delivered(ev.id).await {
                tracing::warn!(error = %e, "cannot record a delivered notification; it will be sent again");
            }
        }
        Err(why) => {
            let attempts = ev.attempts.saturating_add(1);
            let give_up = attempts >= max_attempts;
            let wait = backoff(attempts, rand::random::<f64>());
            let next = now_ms().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
            if give_up {
                tracing::error!(hook = %ev.hook, file = ?ev.file_id, attempts, error = %why, "notification given up");
                journal
                    .note_error(format!(
                        "notification to {} given up after {attempts} attempts: {why}",
                        ev.hook
                    ))
                    .await
                    .ok();
            } else {
                tracing::warn!(hook = %ev.hook, file = ?ev.file_id, attempts, retry_in = ?wait, error = %why, "notification failed; will retry");
            }
            if let Err(e) = journal
                .hook_failed(ev.id, next, why.to_string(), give_up)
                .await
            {
                tracing::warn!(error = %e, "cannot record a failed notification");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_hook_backoff_is_within_the_journals_retry_horizon() {
        // Beyond the horizon, a retry time is taken for one written before the clock stepped
        // back: no real backoff may reach it.
        assert!(BACKOFF_MAX < crate::journal::RETRY_HORIZON / 2);
    }

    #[test]
    fn hook_backoff_doubles_and_caps() {
        assert_eq!(backoff(1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(40, 1.0), BACKOFF_MAX);
    }
}
