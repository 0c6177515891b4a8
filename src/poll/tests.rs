//! Unit tests of the poller: its clock and its decision core.

use super::*;
use crate::journal::ScanVerdict;
use crate::scanner::ScanResult;

fn r(id: &str, state: ScanState) -> ScanResult {
    ScanResult {
        scan_id: id.to_string(),
        state,
    }
}

#[test]
fn scan_timeout_counts_monotonic_time_not_the_wall_clock() {
    // The deadline is pure monotonic arithmetic: no wall-clock value enters it, so a jump of
    // the wall clock (forward or back) neither fails nor prolongs a scan. Scans adopted at
    // start-up start their clock at adoption (`run`), whatever their journaled submit time.
    let timeout = Duration::from_secs(60);
    let t0 = Instant::now();
    let mut clock = ScanClock::starting_at(t0);
    assert!(!clock.overdue(t0, timeout));
    assert!(!clock.overdue(t0 + Duration::from_secs(59), timeout));
    assert!(clock.overdue(t0 + Duration::from_secs(61), timeout));
    // An outage of an hour does not count.
    clock.stop_for(Duration::from_secs(3600));
    assert!(!clock.overdue(t0 + Duration::from_secs(3600 + 59), timeout));
    assert!(clock.overdue(t0 + Duration::from_secs(3600 + 61), timeout));
    // A "now" before the start (never happens with a monotonic clock) is not overdue.
    assert!(!ScanClock::starting_at(t0 + timeout * 2).overdue(t0, timeout));
}

#[test]
fn duplicate_entries_for_one_scan_in_one_answer_fold_to_detect() {
    let (folded, contradictions) = crate::scanner::merge_duplicates(vec![
        r("a", ScanState::NotDetected),
        r("b", ScanState::NotDetected),
        r("a", ScanState::Detect),
        r("c", ScanState::Processing),
        r("c", ScanState::NotDetected),
        r("d", ScanState::NotDetected),
        r("d", ScanState::Error),
        r("b", ScanState::NotDetected),
    ]);
    assert_eq!(
        folded,
        vec![
            r("a", ScanState::Detect),
            r("b", ScanState::NotDetected),
            r("c", ScanState::NotDetected),
            r("d", ScanState::Error),
        ]
    );
    let ids: Vec<String> = contradictions.into_iter().map(|c| c.scan_id).collect();
    assert_eq!(ids, vec!["a".to_string(), "d".to_string()]);
    // Detect wins whatever the order.
    let (folded, _) = crate::scanner::merge_duplicates(vec![
        r("a", ScanState::Detect),
        r("a", ScanState::NotDetected),
    ]);
    assert_eq!(folded, vec![r("a", ScanState::Detect)]);
}

fn id(n: u8) -> ScanId {
    ScanId::parse(&format!("scan{n}")).unwrap()
}

fn entry(limits: &crate::limits::Limits, file: FileId, attempts: u32) -> Entry {
    Entry {
        id: file,
        sha256: [file as u8; 32],
        attempts,
        clock: ScanClock::starting_at(Instant::now()),
        _slot: limits.adopt(),
    }
}

fn limits() -> crate::limits::Limits {
    crate::limits::Limits::new(
        std::num::NonZeroUsize::new(8).unwrap(),
        std::num::NonZeroU32::MIN,
    )
}

/// What a judgement says, in a comparable form: decisions as (file, outcome, verdict, reason),
/// retries as (file, scan), adopted scans.
type Seen = (
    Vec<(
        FileId,
        crate::journal::Outcome,
        Option<ScanVerdict>,
        Option<String>,
    )>,
    Vec<(FileId, ScanId)>,
    Vec<ScanId>,
);

fn seen(j: &judge::Judgement) -> Seen {
    (
        j.decisions
            .iter()
            .map(|(f, d)| (*f, d.outcome, d.verdict, d.reason.clone()))
            .collect(),
        j.retries.iter().map(|(f, s, _)| (*f, s.clone())).collect(),
        j.known.clone(),
    )
}

#[test]
fn judge_table() {
    use crate::journal::Outcome::{Clean, Failed, Quarantine};
    use ScanVerdict::{Detect, NotDetected};
    let l = limits();
    let max_attempts = 3;
    // Scan n belongs to file n; file 3 is on its last attempt.
    let scans: HashMap<ScanId, Entry> = [
        (id(1), entry(&l, 1, 1)),
        (id(2), entry(&l, 2, 1)),
        (id(3), entry(&l, 3, 3)),
    ]
    .into_iter()
    .collect();
    let exhausted = Some("scan ended with error on each of 3 attempts".to_string());
    let cases: Vec<(&str, Vec<ScanResult>, Seen)> = vec![
        ("nothing listed", vec![], (vec![], vec![], vec![])),
        (
            "not detected releases, detect quarantines",
            vec![
                r("scan1", ScanState::NotDetected),
                r("scan2", ScanState::Detect),
            ],
            (
                vec![
                    (1, Clean, Some(NotDetected), None),
                    (2, Quarantine, Some(Detect), None),
                ],
                vec![],
                vec![],
            ),
        ),
        (
            "processing and unknown states decide nothing",
            vec![
                r("scan1", ScanState::Processing),
                r("scan2", ScanState::Unknown("queued".into())),
            ],
            (vec![], vec![], vec![]),
        ),
        (
            "error with attempts left is retried, on the last attempt it fails",
            vec![r("scan1", ScanState::Timeout), r("scan3", ScanState::Error)],
            (
                vec![(3, Failed, None, exhausted.clone())],
                vec![(1, id(1))],
                vec![],
            ),
        ),
        (
            "scans never sent and ids we never make are ignored",
            vec![
                r("scan9", ScanState::NotDetected),
                r("../scan1", ScanState::NotDetected),
                r("", ScanState::Detect),
            ],
            (vec![], vec![], vec![]),
        ),
        (
            "an unconfirmed scan listed in any state is known",
            vec![r("scan7", ScanState::Processing)],
            (vec![], vec![], vec![id(7)]),
        ),
    ];
    for (what, results, want) in cases {
        let unconfirmed: HashMap<ScanId, ()> = HashMap::new();
        let unconfirmed = if what.starts_with("an unconfirmed") {
            unconfirmed_with(id(7))
        } else {
            unconfirmed
        };
        let mut recent = HashMap::new();
        let j = judge(results, &scans, &unconfirmed, &mut recent, max_attempts);
        assert_eq!(seen(&j), want, "{what}");
        assert_eq!(j.verdicts.len(), j.verdict_clocks.len(), "{what}");
    }
}

fn unconfirmed_with(scan: ScanId) -> HashMap<ScanId, ()> {
    [(scan, ())].into_iter().collect()
}

#[test]
fn judge_hands_a_contradiction_of_a_recent_verdict_to_the_journal_once() {
    let scans = HashMap::new();
    let unconfirmed: HashMap<ScanId, ()> = HashMap::new();
    let mut recent: HashMap<ScanId, Recent> = [(
        id(5),
        Recent {
            id: 5,
            sha256: [5; 32],
            verdict: ScanVerdict::NotDetected,
            until: Instant::now(),
            contradicted: false,
        },
    )]
    .into_iter()
    .collect();
    // The same verdict again: nothing to do.
    let j = judge(
        vec![r("scan5", ScanState::NotDetected)],
        &scans,
        &unconfirmed,
        &mut recent,
        3,
    );
    assert!(j.decisions.is_empty());
    // A contradicting one: handed over once, with the remembered content.
    for round in 0..2 {
        let j = judge(
            vec![r("scan5", ScanState::Detect)],
            &scans,
            &unconfirmed,
            &mut recent,
            3,
        );
        let got: Vec<_> = j
            .decisions
            .iter()
            .map(|(f, d)| (*f, d.verdict, d.verdict_sha256))
            .collect();
        let want = if round == 0 {
            vec![(5, Some(ScanVerdict::Detect), Some([5; 32]))]
        } else {
            vec![]
        };
        assert_eq!(got, want, "round {round}");
    }
}
