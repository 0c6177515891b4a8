//! Unit tests of the uploader's decision core.

use super::*;

/// The answer, as comparable text: kind, reason, flags.
fn shown(a: &Answer) -> String {
    match a {
        Answer::Accepted { bytes } => format!("accepted {bytes}"),
        Answer::Changed => "changed".into(),
        Answer::Rehash => "rehash".into(),
        Answer::Fail { reason, refresh } => format!("fail refresh={refresh}: {reason}"),
        Answer::RetryLater {
            ambiguous,
            throttled,
        } => format!("retry ambiguous={ambiguous} throttled={throttled}"),
    }
}

#[test]
fn answer_table() {
    let sha = [1u8; 32];
    let sent = |sha256: [u8; 32], bytes: u64| {
        Ok(Sent {
            sha256: Some(sha256),
            bytes,
        })
    };
    let cases: Vec<(&str, Result<Sent, ApiError>, &str)> = vec![
        ("exact bytes", sent(sha, 10), "accepted 10"),
        ("other content", sent([2; 32], 10), "changed"),
        ("same digest, other length", sent(sha, 9), "changed"),
        (
            "413",
            Err(ApiError::TooLarge),
            "fail refresh=true: too large: the server refused 10 bytes (413)",
        ),
        (
            "other 4xx",
            Err(ApiError::Rejected {
                status: 400,
                body: "bad".into(),
            }),
            "fail refresh=false: the server refused the file (400): bad",
        ),
        (
            "short read",
            Err(ApiError::Local {
                source: std::io::Error::other("short"),
            }),
            "rehash",
        ),
        (
            "429",
            Err(ApiError::Busy { retry_after: None }),
            "retry ambiguous=false throttled=true",
        ),
        (
            "500",
            Err(ApiError::Server {
                status: 500,
                retry_after: None,
            }),
            "retry ambiguous=false throttled=false",
        ),
        (
            "401",
            Err(ApiError::Unauthorized {
                sensor_id: "s".into(),
            }),
            "retry ambiguous=false throttled=false",
        ),
        (
            "garbage answer: the scan may exist",
            Err(ApiError::protocol("x")),
            "retry ambiguous=true throttled=false",
        ),
    ];
    for (what, result, want) in cases {
        assert_eq!(shown(&answer(&result, &sha, 10)), want, "{what}");
    }
}

/// Regression (issue 20): uploads that had finished stayed in the stage's `JoinSet` until the
/// loop found nothing else to do, so a steady backlog kept every upload since the start (`many`:
/// 88 MB at 43,000 files, RSS rising with every file placed).
#[tokio::test]
async fn finished_uploads_do_not_stay_in_memory_under_a_steady_backlog() {
    let mut uploads = JoinSet::new();
    for _ in 0..100 {
        spawn_reaping(&mut uploads, async {});
        // The test runtime has one thread: this lets the upload just spawned run to its end.
        tokio::task::yield_now().await;
    }
    assert!(
        uploads.len() <= 1,
        "{} finished uploads kept after 100 spawns",
        uploads.len()
    );
}
