//! Review 8: attacks on what landed for issue 19 (tidy, late mounts, client mounts, save temps,
//! clutter, kept mtimes) and the health probe of issue 22. Each test is named after a finding
//! and failed before its fix (or is ignored with the reason, where the fix is not small).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use crate::util::{LONG, Outcome, World, bytes, wait_for};

/// Waits until the inbox folder `rel` is gone (tidied).
async fn wait_gone(w: &World, rel: &str) {
    let p = w.inbox.join(rel);
    let gone = wait_for(LONG, || (!p.exists()).then_some(())).await;
    assert!(gone.is_some(), "{rel} was never tidied");
}

/// Tidy asked the journal "did dropscan take a file from below `job/`?" by name only. A folder
/// made again under the name of one dropscan emptied weeks ago (an administrator's drop
/// structure, a scanner's target folder) was removed as soon as it had been empty for
/// `tidy_after`, although nothing was ever taken from it: the journal's answer was about the
/// earlier folder. A writer that relies on the folder then fails to save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidy_removes_a_new_folder_named_like_one_it_emptied_before() {
    let mut w = World::quick().await;
    w.watch_extra = "tidy_after = \"1s\"".into();
    let agent = w.start_agent();
    w.drop_file("job/a.bin", &bytes(1, 1000));
    let o = w.wait_placed(1, LONG).await;
    assert_eq!(o.get(Path::new("job/a.bin")), Some(&Outcome::Clean));
    // The folder the client dropped with its file: tidied, as it should be.
    wait_gone(&w, "job").await;
    // An administrator makes `job/` again, for files to come: nothing was taken from it.
    std::fs::create_dir(w.inbox.join("job")).unwrap();
    // Two folders dropped and tidied after it: at least one full tidy pass judged `job/` when
    // it had been quiet for longer than `tidy_after`.
    for ctl in ["ctl1", "ctl2"] {
        w.drop_file(&format!("{ctl}/b.bin"), &bytes(2, 1000));
        wait_gone(&w, ctl).await;
    }
    assert!(
        w.inbox.join("job").is_dir(),
        "the new, never used folder job/ was removed"
    );
    agent.stop().await.0.unwrap();
}
