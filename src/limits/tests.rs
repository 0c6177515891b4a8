//! Unit tests of the limits: backoff, gate, and the AIMD cap driven through real slots (paused
//! time), with the learned capacity persisted in a real journal.

use super::*;

fn rps() -> NonZeroU32 {
    NonZeroU32::new(1000).unwrap()
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

/// A free slot, or the test fails (a blocked acquire would hang).
async fn take(l: &Limits) -> InFlight {
    tokio::time::timeout(Duration::from_secs(5), l.acquire())
        .await
        .expect("a free slot")
}

/// Takes a slot and has the server accept it.
async fn submit(l: &Limits) -> InFlight {
    let mut slot = take(l).await;
    l.accepted(&mut slot);
    slot
}

/// Permits out (held by slots) plus free ones minus debt equals the cap.
fn assert_permits_consistent(l: &Limits, held: usize) {
    let c = lock(&l.inner.cap);
    assert_eq!(
        held + l.inner.sem.available_permits(),
        c.aimd.cap() + c.debt,
        "cap {} debt {}",
        c.aimd.cap(),
        c.debt
    );
}

#[test]
fn backoff_grows_caps_and_jitters() {
    assert_eq!(backoff(1, 0.0), Duration::from_millis(250));
    assert_eq!(backoff(1, 1.0), Duration::from_millis(500));
    assert_eq!(backoff(3, 0.0), Duration::from_millis(1000));
    assert_eq!(backoff(30, 1.0), BACKOFF_MAX);
    assert!(backoff(30, 0.0) >= BACKOFF_MAX / 2);
}

#[tokio::test(start_paused = true)]
async fn auto_cap_grows_while_the_server_accepts() {
    let l = Limits::auto(nz(1000), rps());
    assert_eq!(l.cap(), START_CAP);
    let mut scans = Vec::new();
    for _ in 0..40 {
        scans.push(submit(&l).await);
    }
    // Slow start: +1 per accepted submission once every slot is taken.
    assert_eq!(l.cap(), 41);
    assert_eq!(l.learned(), 40);
    assert_permits_consistent(&l, scans.len());
    // An idle agent does not inflate the cap: scans finish, nothing new comes.
    scans.truncate(3);
    let mut one = take(&l).await;
    l.accepted(&mut one);
    assert_eq!(l.cap(), 41);
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_429s_cuts_the_cap_once_and_not_to_one() {
    let l = Limits::auto(nz(1000), rps());
    l.restore(20);
    assert_eq!(l.cap(), 20);
    let mut scans = Vec::new();
    for _ in 0..20 {
        scans.push(submit(&l).await);
    }
    let cap_before = l.cap();
    assert_eq!(cap_before, 21);
    // The server holds 20; the 21st submission is refused, and so are others of the same window.
    let refused = take(&l).await;
    l.throttled(&refused);
    let cut = l.cap();
    assert!(
        (cap_before / 2..=cap_before * 3 / 4).contains(&cut),
        "cap {cut} after one cut from {cap_before}"
    );
    for s in &scans {
        l.throttled(s);
    }
    l.throttled(&refused);
    assert_eq!(l.cap(), cut, "a burst of 429s cuts once");
    assert!(cut > 1);
    assert_eq!(l.learned(), 20);
    assert_eq!(l.snapshot().throttled, 22);
    // Never more slots than the cap: the scans in flight retire permits as they finish.
    drop(refused);
    assert_eq!(l.available(), 0);
    assert_permits_consistent(&l, scans.len());
    while scans.len() > cut {
        scans.remove(0);
        assert_eq!(l.available(), 0);
    }
    assert_permits_consistent(&l, scans.len());
    assert_eq!(l.available(), cut - scans.len());
}

#[tokio::test(start_paused = true)]
async fn the_cap_recovers_after_a_burst_of_429s() {
    let l = Limits::auto(nz(1000), rps());
    l.restore(20);
    let mut scans = Vec::new();
    for _ in 0..20 {
        scans.push(submit(&l).await);
    }
    let refused = take(&l).await;
    l.throttled(&refused);
    drop(refused);
    let cut = l.cap();
    // Scans finish one by one and new ones take their place: fast recovery (+1 per accept)
    // back to the learned capacity, then +1 per cap's worth of accepts.
    let mut rounds = 0;
    while l.cap() < 20 {
        scans.remove(0);
        while l.available() > 0 {
            scans.push(submit(&l).await);
        }
        rounds += 1;
        assert!(rounds < 20, "no recovery: cap {}", l.cap());
    }
    // The scans over the cut drain first; then one finished scan refills to the learned level.
    assert!(
        rounds <= 20 - cut + 1,
        "recovery took {rounds} finished scans"
    );
    assert_eq!(l.cap(), 20);
    for _ in 0..(2 * 21) {
        scans.remove(0);
        while l.available() > 0 {
            scans.push(submit(&l).await);
        }
    }
    assert!(l.cap() >= 21, "additive increase: {}", l.cap());
    assert_permits_consistent(&l, scans.len());
    // A 429 in the new window cuts again.
    scans.remove(0);
    let before = l.cap();
    let refused = take(&l).await;
    l.throttled(&refused);
    assert!(l.cap() <= before * 3 / 4, "{} after {before}", l.cap());
}

#[tokio::test(start_paused = true)]
async fn the_ceiling_holds() {
    let l = Limits::auto(nz(6), rps());
    let mut scans = Vec::new();
    for _ in 0..6 {
        scans.push(submit(&l).await);
    }
    assert_eq!(l.cap(), 6);
    assert_eq!(l.available(), 0);
    for _ in 0..50 {
        scans.remove(0);
        scans.push(submit(&l).await);
    }
    assert_eq!(l.cap(), 6);
    assert_permits_consistent(&l, scans.len());
    // A learned capacity above the ceiling is clamped too.
    let l = Limits::auto(nz(6), rps());
    l.restore(100);
    assert_eq!(l.cap(), 6);
}

/// Review finding (issue 18, 9): a pinned `max_in_flight` ignored 429. Pinned at 8, a burst
/// of 429s cuts it once, the slots retire as they come back, it recovers to 8 and never past.
#[tokio::test(start_paused = true)]
async fn pinned_max_in_flight_is_a_ceiling_that_429_still_backs_off_below() {
    let l = Limits::new(nz(8), rps());
    let mut scans = Vec::new();
    for _ in 0..8 {
        scans.push(submit(&l).await);
    }
    assert_eq!(l.cap(), 8);
    l.restore(40);
    assert_eq!(l.cap(), 8, "a pinned cap restores nothing learned earlier");
    for s in &scans {
        l.throttled(s);
    }
    let cut = l.cap();
    assert!((4..=6).contains(&cut), "cut once to x0.5-0.75: {cut}");
    scans.clear();
    assert_eq!(l.available(), cut, "the slots over the cap retired");
    for _ in 0..200 {
        let mut held = Vec::new();
        while l.available() > 0 {
            held.push(submit(&l).await);
        }
    }
    assert_eq!(l.cap(), 8, "recovered to the pin, never past it");
    assert_eq!(l.snapshot().mode, "fixed");
    assert_eq!(l.snapshot().ceiling, 8);
}

#[tokio::test(start_paused = true)]
async fn adopted_scans_run_over_the_cap_and_count_as_in_flight() {
    let l = Limits::new(nz(1), rps());
    let a = l.adopt();
    let b = l.adopt();
    assert_eq!(l.available(), 0);
    assert_eq!(l.snapshot().in_flight, 2);
    drop(b); // held no permit
    assert_eq!(l.available(), 0);
    drop(a);
    assert_eq!(l.available(), 1);
    assert_eq!(l.snapshot().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn the_learned_capacity_survives_a_restart_in_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.sqlite");
    let journal = Journal::open(&path).unwrap();
    let l = Limits::auto(nz(1000), rps());
    let mut scans = Vec::new();
    for _ in 0..30 {
        scans.push(submit(&l).await);
    }
    let refused = take(&l).await;
    l.throttled(&refused);
    assert_eq!(l.learned(), 30);
    let saved = l.save(&journal).await;
    assert_eq!(saved.learned, 30);
    // `dropscan status` reads the snapshot from another connection.
    let text = crate::journal::read_capacity_snapshot(&path)
        .unwrap()
        .unwrap();
    let read = LimitsSnapshot::from_json(&text).unwrap();
    assert_eq!(read.learned, 30);
    assert_eq!(read.binding, Binding::Unknown);
    // A new run starts from what was learned.
    let shutdown = CancellationToken::new();
    let again = Limits::auto(nz(1000), rps());
    again.start(&journal, &shutdown).await;
    assert_eq!(again.cap(), 30);
    assert_eq!(again.learned(), 30);
    assert_eq!(again.available(), 30);
    // A pinned run ignores it.
    let pinned = Limits::new(nz(5), rps());
    pinned.start(&journal, &shutdown).await;
    assert_eq!(pinned.cap(), 5);
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn gate_logs_state_changes_and_pauses() {
    let l = Limits::new(NonZeroUsize::new(1).unwrap(), rps());
    assert_eq!(l.health(), Health::Up);
    let e503 = ApiError::Server {
        status: 503,
        retry_after: None,
    };
    let p = l.server_failed(&e503);
    assert!(p <= BACKOFF_MIN);
    assert_eq!(
        l.health(),
        Health::Up,
        "one failure is a blip, not an outage"
    );
    tokio::time::advance(DOWN_AFTER).await;
    l.server_failed(&e503);
    assert_eq!(l.health(), Health::Down, "failing for DOWN_AFTER is");
    l.server_ok();
    assert_eq!(l.health(), Health::Up);
    l.gate(&CancellationToken::new()).await;
}

/// Review finding (issue 18, 9): with 30% of answers 500 the agent logged "KATA unavailable"
/// and "answers again" 22 times in 2 s. Failures among successes never mark the server down.
#[tokio::test(start_paused = true)]
async fn failures_among_successes_are_blips_not_outages() {
    let l = Limits::new(NonZeroUsize::new(1).unwrap(), rps());
    for _ in 0..100 {
        l.server_failed(&ApiError::Server {
            status: 500,
            retry_after: None,
        });
        tokio::time::advance(Duration::from_secs(1)).await;
        l.server_ok();
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(l.health(), Health::Up);
}

/// Review finding (issue 18, 9): after each wait every queued upload fired at once. When a
/// pause ends one submission probes; the next waits for its answer.
#[tokio::test(start_paused = true)]
async fn after_a_pause_one_submission_probes_and_the_rest_wait_for_its_answer() {
    let l = Limits::new(nz(16), rps());
    let shutdown = CancellationToken::new();
    let p = l.server_failed(&ApiError::Busy { retry_after: None });
    let t0 = Instant::now();
    l.gate(&shutdown).await;
    assert!(t0.elapsed() >= p, "the pause is kept");
    // The probe went; the next one waits for its answer.
    let next = tokio::spawn({
        let (l, s) = (l.clone(), shutdown.clone());
        async move { l.gate(&s).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !next.is_finished(),
        "a second submission went before the probe's answer"
    );
    // A results request that went through says nothing about room for scans: still waiting.
    l.server_ok();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!next.is_finished(), "a poll's success ended a 429's pause");
    // The probe was accepted: the rest go on.
    let mut slot = take(&l).await;
    l.accepted(&mut slot);
    tokio::time::timeout(Duration::from_secs(1), next)
        .await
        .expect("released by the accepted probe")
        .unwrap();
}

#[tokio::test]
async fn retry_after_on_429_or_503_sets_the_minimum_pause() {
    let l = Limits::new(NonZeroUsize::new(1).unwrap(), rps());
    let wait = Duration::from_secs(90);
    let p = l.server_failed(&ApiError::Busy {
        retry_after: Some(wait),
    });
    assert!(p >= wait, "{p:?}");
    let p = l.server_failed(&ApiError::Server {
        status: 503,
        retry_after: Some(wait),
    });
    assert!(p >= wait, "{p:?}");
}

#[tokio::test(start_paused = true)]
async fn a_429_pauses_submissions_without_marking_the_server_down() {
    let l = Limits::auto(nz(100), rps());
    let p = l.server_failed(&ApiError::Busy { retry_after: None });
    assert!(p > Duration::ZERO);
    assert_eq!(l.health(), Health::Up, "a 429 is not an outage");
    // Paused until the backoff ends (paused time moves on by itself).
    let t0 = Instant::now();
    l.gate(&CancellationToken::new()).await;
    assert!(t0.elapsed() >= p);
    // A server already down stays down on a 429.
    let e503 = ApiError::Server {
        status: 503,
        retry_after: None,
    };
    l.server_failed(&e503);
    tokio::time::advance(DOWN_AFTER).await;
    l.server_failed(&e503);
    assert_eq!(l.health(), Health::Down);
    l.server_failed(&ApiError::Busy { retry_after: None });
    assert_eq!(l.health(), Health::Down);
}

/// What the tuner saved last, once `f` accepts it: polled in real time (the journal's own
/// thread writes it) while the paused clock stands still.
async fn saved_when(
    path: &std::path::Path,
    f: impl Fn(&LimitsSnapshot) -> bool,
) -> Option<LimitsSnapshot> {
    for _ in 0..300 {
        let text = crate::journal::read_capacity_snapshot(path).unwrap();
        if let Some(s) = text.and_then(|t| LimitsSnapshot::from_json(&t)) {
            if f(&s) {
                return Some(s);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
        tokio::task::yield_now().await;
    }
    None
}

#[tokio::test(start_paused = true)]
async fn status_sees_the_first_finished_scan_without_waiting_for_the_periodic_save() {
    // `dropscan status` showed "mean scan time: none finished yet" for up to SAVE_EVERY after
    // the first files went through.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.sqlite");
    let journal = Journal::open(&path).unwrap();
    let shutdown = CancellationToken::new();
    let l = Limits::auto(nz(1000), rps());
    l.start(&journal, &shutdown).await;
    // The tuner's first save: nothing finished yet.
    let first = saved_when(&path, |_| true).await.unwrap();
    assert_eq!(first.mean_scan_secs, None);
    let scan = submit(&l).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(scan);
    // One sample later, far short of SAVE_EVERY.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(Duration::from_secs(4) < observe::SAVE_EVERY);
    let next = saved_when(&path, |s| s.mean_scan_secs.is_some()).await;
    let mean = next.and_then(|s| s.mean_scan_secs);
    assert!(mean.is_some_and(|m| (1.5..=2.5).contains(&m)), "{mean:?}");
    shutdown.cancel();
}
