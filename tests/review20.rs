//! Review 20: attacks on the tee (issue 20, commits 8e59c10 and 3b2a2de): a big file just
//! claimed is owned (leased, copied, hashed) while it is uploaded. Each test is one attack; the
//! promises checked: nothing lost (each file in exactly one destination, byte for byte), fail
//! closed (nothing reaches clean without `not detected` for its exact bytes), never fooled (no
//! byte from outside the inbox read, sent or moved).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use dropscan::emulator::{EmulatorConfig, Faults};

use crate::kill_points::{Drops, every_kill_point_of};
use crate::util::{EICAR, LONG, Outcome, World, bytes, wait_for, wait_until};

/// Over the claim stage's small-file size: owned while it is uploaded.
const BIG: usize = 3 << 20;

/// A big file with the EICAR string at its start (detected by the emulator).
fn big_eicar(seed: u64) -> Vec<u8> {
    big_eicar_of(seed, BIG)
}

/// [`big_eicar`] of `len` bytes and a few.
fn big_eicar_of(seed: u64, len: usize) -> Vec<u8> {
    let mut b = EICAR.to_vec();
    b.extend(bytes(seed, len));
    b
}

fn staging(w: &World) -> PathBuf {
    w.inbox.join(".dropscan/test")
}

/// The staged files left in `w`'s staging folder (markers aside).
fn staging_left(w: &World) -> Vec<String> {
    std::fs::read_dir(staging(w))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".owner" && n != ".lock")
                .collect()
        })
        .unwrap_or_default()
}

/// Records owned while they are uploaded (`submitting` with no hash).
fn tees(w: &World) -> Option<i64> {
    let conn = rusqlite::Connection::open(w.state_dir().join("journal.sqlite")).ok()?;
    conn.query_row(
        "SELECT COUNT(*) FROM files WHERE state = 'submitting' AND sha256 IS NULL",
        [],
        |r| r.get::<_, i64>(0),
    )
    .ok()
}

/// The state of the newest record of `rel`.
fn state_of(w: &World, rel: &str) -> Option<String> {
    let conn = rusqlite::Connection::open(w.state_dir().join("journal.sqlite")).ok()?;
    conn.query_row(
        "SELECT state FROM files WHERE rel_path = ?1 ORDER BY id DESC LIMIT 1",
        [rel.as_bytes()],
        |r| r.get::<_, String>(0),
    )
    .ok()
}

/// The one `*.staged` file in staging, once there is exactly one.
fn the_staged(w: &World) -> Option<PathBuf> {
    let staged: Vec<PathBuf> = std::fs::read_dir(staging(w))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "staged"))
        .collect();
    (staged.len() == 1).then(|| staged[0].clone())
}

fn dir_of(w: &World, o: Outcome) -> &Path {
    match o {
        Outcome::Clean => &w.clean,
        Outcome::Quarantine => &w.quarantine,
        Outcome::Failed => &w.failed,
    }
}

/// Every file of `set` in its destination, byte for byte, and nothing left in the inbox or in
/// staging.
async fn all_in_place(w: &World, set: &[(&str, Vec<u8>, Outcome)]) {
    let o = w.wait_placed(set.len(), LONG).await;
    for (name, content, outcome) in set {
        let why = std::fs::read_to_string(w.failed.join(format!("{name}.dropscan.json")));
        assert_eq!(
            o.get(&PathBuf::from(name)),
            Some(outcome),
            "{name}: {o:?} {why:?}"
        );
        assert!(
            std::fs::read(dir_of(w, *outcome).join(name)).unwrap() == *content,
            "{name} changed"
        );
    }
    assert!(w.inbox_files().is_empty(), "{:?}", w.inbox_files().keys());
    let emptied = wait_for(LONG, || staging_left(w).is_empty().then_some(())).await;
    assert!(
        emptied.is_some(),
        "staging not emptied: {:?}",
        staging_left(w)
    );
}

/// Every scan the emulator was sent: (sha256, size, deleted).
fn scans(w: &World) -> Vec<([u8; 32], u64, bool)> {
    let emu = w.emulator().state();
    emu.stats()
        .submissions_per_scan_id
        .keys()
        .filter_map(|id| emu.scan(id))
        .map(|s| (s.sha256, s.size, s.deleted))
        .collect()
}

fn sha(b: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).into()
}

/// Attacks 1 and 2: a writer that opens the big file's staged inode for writing while it is
/// owned and uploaded, `after` the tee is journaled, and rewrites it in place (`truncate`: cut to
/// the EICAR string alone; else the EICAR string over its first bytes). Whenever the write lands
/// (before, during, at the end of the copy, while the copy is synced), the file must end in
/// exactly one destination, never in clean with the EICAR bytes, and nothing is lost: the
/// rewritten version is what must end (in quarantine), or the first one if the write came only
/// after the copy took over (then the user's inode is no longer the file).
async fn rewritten_during_the_tee(after: Duration, truncate: bool, seed: u64) {
    let w = World::quick().await;
    // Big enough for its tee to be seen under way.
    let first = bytes(seed, 24 << 20);
    w.drop_file("big.iso", &first);
    let agent = w.start_agent();
    wait_until(LONG, "a tee journaled", || {
        tees(&w).filter(|n| *n == 1).and_then(|_| the_staged(&w))
    })
    .await;
    tokio::time::sleep(after).await;
    // The staged inode now (the user's, or already the private copy that replaced it).
    let staged = the_staged(&w);
    let rewritten = staged.map(|path| {
        std::thread::spawn(move || {
            use std::io::{Seek as _, Write as _};
            let Ok(mut f) = std::fs::OpenOptions::new()
                .write(true)
                .truncate(truncate)
                .open(&path)
            else {
                return false;
            };
            f.seek(std::io::SeekFrom::Start(0)).unwrap();
            f.write_all(EICAR).unwrap();
            true
        })
    });
    let wrote = rewritten.is_some_and(|t| t.join().unwrap());
    let o = w.wait_placed(1, LONG).await;
    let outcome = *o.get(&PathBuf::from("big.iso")).unwrap();
    let ended = std::fs::read(dir_of(&w, outcome).join("big.iso")).unwrap();
    eprintln!("rewritten after {after:?} (truncate {truncate}): written {wrote}, {outcome:?}");
    assert!(
        !(outcome == Outcome::Clean && ended.starts_with(EICAR)),
        "after {after:?}: the rewritten EICAR bytes were released to clean"
    );
    if outcome == Outcome::Clean {
        assert!(ended == first, "after {after:?}: clean holds other bytes");
        let s = sha(&ended);
        assert!(
            scans(&w)
                .iter()
                .any(|(h, n, _)| *h == s && *n == ended.len() as u64),
            "after {after:?}: released bytes were never sent"
        );
    } else {
        assert!(
            wrote && outcome == Outcome::Quarantine && ended.starts_with(EICAR),
            "after {after:?} (written: {wrote}): {outcome:?}"
        );
    }
    assert!(w.inbox_files().is_empty(), "{:?}", w.inbox_files().keys());
    let emptied = wait_for(LONG, || staging_left(&w).is_empty().then_some(())).await;
    assert!(emptied.is_some(), "staging: {:?}", staging_left(&w));
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_file_rewritten_in_place_during_its_tee_never_reaches_clean_with_the_new_bytes() {
    for (k, ms) in [0u64, 30, 200, 230, 260, 290, 320, 350, 380, 500]
        .into_iter()
        .enumerate()
    {
        rewritten_during_the_tee(Duration::from_millis(ms), false, 200 + k as u64).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_file_truncated_during_its_tee_never_reaches_clean_with_the_new_bytes() {
    for (k, ms) in [0u64, 100, 220, 260, 300, 340, 380].into_iter().enumerate() {
        rewritten_during_the_tee(Duration::from_millis(ms), true, 300 + k as u64).await;
    }
}

/// Attack 3: the server fails the tee's upload (`faults`) until the file's tee is untied; the
/// file is then owned on its own and uploaded again, and ends sorted, byte for byte; no scan of
/// it is left on the server but the one that decided it.
async fn a_tee_failed_by_the_server(faults: Faults, content: Vec<u8>, outcome: Outcome) {
    let w = World::new(EmulatorConfig {
        faults,
        ..EmulatorConfig::default()
    })
    .await;
    let emu = w.emulator().state();
    let agent = w.start_agent();
    w.drop_file("big.iso", &content);
    // The tee is tried under the faults, then untied (back to `claimed`).
    wait_until(LONG, "the tee untied", || {
        (crate::util::events("owned while uploaded: not accepted", None) > 0
            || emu.stats().submits_by_status.keys().any(|s| *s >= 400)
            || emu.stats().dropped_connections > 0)
            .then_some(())
    })
    .await;
    emu.set_faults(Faults::default());
    all_in_place(&w, &[("big.iso", content.clone(), outcome)]).await;
    assert_eq!(tees(&w), Some(0));
    let s = emu.stats();
    assert!(s.submits_accepted >= 1, "{s:?}");
    let live: Vec<_> = scans(&w).into_iter().filter(|(_, _, d)| !d).collect();
    assert!(
        live.iter()
            .all(|(h, n, _)| *h == sha(&content) && *n == content.len() as u64),
        "a scan of other bytes left: {live:?}"
    );
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tee_answered_500_is_untied_and_the_file_sorted_byte_for_byte() {
    let f = Faults {
        http_500_share: 1.0,
        retry_after: Some("1".into()),
        ..Faults::default()
    };
    a_tee_failed_by_the_server(f.clone(), bytes(401, BIG), Outcome::Clean).await;
    a_tee_failed_by_the_server(f, big_eicar(402), Outcome::Quarantine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tee_whose_connection_is_closed_mid_body_is_untied_and_the_file_sorted_byte_for_byte() {
    let f = Faults {
        drop_share: 1.0,
        ..Faults::default()
    };
    a_tee_failed_by_the_server(f.clone(), bytes(403, BIG), Outcome::Clean).await;
    a_tee_failed_by_the_server(f, big_eicar(404), Outcome::Quarantine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tee_answered_429_is_untied_and_an_eicar_file_quarantined() {
    let f = Faults {
        http_429_share: 1.0,
        retry_after: Some("1".into()),
        ..Faults::default()
    };
    a_tee_failed_by_the_server(f, big_eicar(405), Outcome::Quarantine).await;
}

/// Attack 4: killed (SIGKILL) at each rename of a tee of a detected file: after the restart it
/// ends in quarantine, byte for byte, never in clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_rename_of_an_eicar_tee_never_releases_it() {
    let set: Drops = vec![("tee-eicar.iso", big_eicar(406), Outcome::Quarantine)];
    every_kill_point_of(&set, "rename,renameat,renameat2", "", 1).await;
}

/// Attack 4: killed at each unlink (the copy's partial file, the kept original, the release's
/// tidy-up) of a tee of a clean and of a detected file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_unlink_of_a_tee_loses_nothing() {
    let set: Drops = vec![
        ("tee-eicar.iso", big_eicar(407), Outcome::Quarantine),
        ("tee.iso", bytes(408, 2 << 20), Outcome::Clean),
    ];
    every_kill_point_of(&set, "unlink,unlinkat", "", 1).await;
}

/// Attack 4: killed at every third fsync of a tee of a detected file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_fsyncs_of_an_eicar_tee_never_releases_it() {
    let set: Drops = vec![("tee-eicar.iso", big_eicar(409), Outcome::Quarantine)];
    every_kill_point_of(&set, "fsync,fdatasync", "", 3).await;
}

/// What is swapped in for the staged big file between its claim and its tee's start.
#[derive(Clone, Copy, Debug)]
enum Swap {
    /// A symlink to a file outside the inbox.
    Symlink,
    /// A FIFO (nobody writes to it: an open that waits would hang the copy).
    Fifo,
}

/// Attack 5: the staged big file is replaced, after its claim journaled it as a tee and before
/// its tee started (the upload stage is held by a paused server), by a symlink to a secret
/// outside the inbox, or by a FIFO. Nothing of the secret may be read, sent or moved, and the
/// agent goes on (a FIFO must not hang it).
async fn swapped_before_the_tee(swap: Swap) {
    let w = World::new(EmulatorConfig {
        faults: Faults {
            http_500_share: 1.0,
            retry_after: Some("3".into()),
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let emu = w.emulator().state();
    let secret_path = w.dir.path().join("secret.bin");
    let secret = bytes(501, 2 << 20);
    std::fs::write(&secret_path, &secret).unwrap();
    let agent = w.start_agent();
    // A first upload answered 500 pauses the uploads for 3 s.
    w.drop_file("first.txt", b"pauses the server");
    wait_until(LONG, "a 500", || {
        emu.stats()
            .submits_by_status
            .contains_key(&500)
            .then_some(())
    })
    .await;
    let content = bytes(502, BIG);
    w.drop_file("big.iso", &content);
    let staged = wait_until(LONG, "a tee journaled", || {
        tees(&w).filter(|n| *n == 1).and_then(|_| {
            std::fs::read_dir(staging(&w))
                .ok()?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "staged"))
                .find(|p| std::fs::metadata(p).is_ok_and(|m| m.len() == BIG as u64))
        })
    })
    .await;
    // The attacker takes the user's file away and puts the link or FIFO in its place.
    let taken = w.dir.path().join("taken.iso");
    #[allow(clippy::disallowed_methods)] // The attacker's rename, not the agent's.
    std::fs::rename(&staged, &taken).unwrap();
    match swap {
        Swap::Symlink => std::os::unix::fs::symlink(&secret_path, &staged).unwrap(),
        Swap::Fifo => rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &staged,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap(),
    }
    emu.set_faults(Faults::default());
    // The tee opens the staged name, finds no regular file, and is untied; the record is
    // decided failed, and the sorter (which will not place what is not a regular file) keeps
    // it in staging, retried.
    wait_until(LONG, "the tee untied", || {
        (tees(&w) == Some(0)
            && state_of(&w, "big.iso").is_some_and(|s| s == "decided" || s == "placing"))
        .then_some(())
    })
    .await;
    let o = w.wait_placed(1, LONG).await;
    assert_eq!(o.get(&PathBuf::from("first.txt")), Some(&Outcome::Clean));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(o.get(&PathBuf::from("big.iso")), None, "{swap:?}: {o:?}");
    let left = std::fs::symlink_metadata(&staged).unwrap();
    assert!(!left.is_file(), "{swap:?}: {left:?}");
    assert_eq!(std::fs::read(&secret_path).unwrap(), secret, "{swap:?}");
    let s = sha(&secret);
    assert!(
        scans(&w).iter().all(|(h, _, _)| *h != s),
        "{swap:?}: the secret was sent"
    );
    for dir in [&w.clean, &w.quarantine, &w.failed] {
        for (p, b) in World::files_in(dir) {
            assert!(b != secret, "{swap:?}: the secret was moved to {p:?}");
            assert!(
                !std::fs::symlink_metadata(dir.join(&p))
                    .unwrap()
                    .is_symlink(),
                "{swap:?}: a link placed at {p:?}"
            );
        }
    }
    assert_eq!(tees(&w), Some(0));
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_swapped_in_before_the_tee_starts_is_never_followed() {
    swapped_before_the_tee(Swap::Symlink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_swapped_in_before_the_tee_starts_is_never_read_and_hangs_nothing() {
    swapped_before_the_tee(Swap::Fifo).await;
}

/// Sends `sig` to the process `pid`.
fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    rustix::process::kill_process(pid, sig).ok();
}

/// The agent (the real binary) under strace, every `fsync` held `hold` on entry; the copy of a
/// big file's tee is then still being synced when `then` (a SIGHUP or a SIGTERM) comes.
/// Returns the world, after the agent (or a second one, after a SIGTERM) sorted the file.
async fn signalled_while_a_tee_syncs_its_copy(
    sig: rustix::process::Signal,
    hold: Duration,
    content: &[u8],
    watch_extra: &str,
) -> Option<(World, Vec<String>)> {
    use std::os::unix::process::CommandExt as _;
    let Some(strace) = crate::shares_fixture::find_tool("strace") else {
        eprintln!("skipped: strace not installed (Debian package strace)");
        return None;
    };
    let mut w = World::quick().await;
    w.watch_extra = watch_extra.to_string();
    let config = w.write_config();
    // Uploads are abandoned soon after a stop: the tee's copying thread goes on meanwhile.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"100ms\"")
        .replace("level = \"warn\"", "level = \"debug\"");
    std::fs::write(&config, text).unwrap();
    let log = w.dir.path().join("strace.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let lines = crate::util::collect_stderr(&mut child);
    let up = wait_for(Duration::from_secs(20), || {
        (crate::util::count_lines(&lines, "dropscan running") > 0).then_some(())
    })
    .await;
    assert!(up.is_some(), "not up: {:#?}", lines.lock().unwrap());
    let pid = child.id();
    w.drop_file("big.iso", content);
    // Claimed: its copy's name is known now. Traced from now on (the journal's fsyncs are not
    // held): every thread, each fsync of that copy held on entry.
    let staged = wait_until(LONG, "the claim", || the_staged(&w)).await;
    let copy = staged.with_extension("copy");
    let mut tracer = std::process::Command::new(strace)
        .args(["-f", "-qq", "-ttt", "-y", "-o"])
        .arg(&log)
        .arg("-P")
        .arg(&copy)
        .args(["-e", "trace=fsync", "-e"])
        .arg(format!("inject=fsync:delay_enter={}", hold.as_micros()))
        .arg("-p")
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The copy is complete (every byte written) and its fsync held.
    wait_until(LONG, "the tee's copy synced", || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("fsync(")
            .then_some(())
    })
    .await;
    signal(pid, sig);
    if sig == rustix::process::Signal::TERM {
        wait_for(LONG, || child.try_wait().unwrap()).await.unwrap();
        let agent = w.start_agent();
        w.wait_placed(1, LONG).await;
        agent.stop().await.0.unwrap();
    } else {
        w.wait_placed(1, LONG).await;
        // Whatever comes after the placement (a sidecar, the staging tidied).
        wait_for(Duration::from_secs(5), || {
            staging_left(&w).is_empty().then_some(())
        })
        .await;
        signal(pid, rustix::process::Signal::TERM);
        wait_for(LONG, || child.try_wait().unwrap()).await;
    }
    crate::kill_points::kill_group(&mut child);
    tracer.kill().ok();
    tracer.wait().ok();
    let logged = lines.lock().unwrap().clone();
    if std::env::var_os("REVIEW20_SHOW").is_some() {
        eprintln!(
            "{}\n{}",
            logged.join("\n"),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    Some((w, logged))
}

/// A SIGHUP reload while the tee of a 48 MiB clean file (`seed`; `extra` config lines) syncs its
/// copy: the file ends in clean, byte for byte, and the inbox is empty. The world, the agent's
/// log and the outcomes after it (`None`: strace is not here).
async fn reloaded_while_a_tee_syncs_ends_clean(
    seed: u64,
    extra: &str,
) -> Option<(
    World,
    Vec<String>,
    std::collections::BTreeMap<PathBuf, Outcome>,
)> {
    let content = bytes(seed, 48 << 20);
    let (w, logged) = signalled_while_a_tee_syncs_its_copy(
        rustix::process::Signal::HUP,
        Duration::from_secs(6),
        &content,
        extra,
    )
    .await?;
    let o = w.outcomes();
    let why = std::fs::read_to_string(w.failed.join("big.iso.dropscan.json"));
    let shown: Vec<&String> = logged
        .iter()
        .filter(|l| {
            ["WARN", "ERROR", "INFO", "tee"]
                .iter()
                .any(|k| l.contains(k))
        })
        .collect();
    assert_eq!(
        o.get(&PathBuf::from("big.iso")),
        Some(&Outcome::Clean),
        "{o:?} {why:?} {shown:#?}"
    );
    assert!(std::fs::read(w.clean.join("big.iso")).unwrap() == content);
    assert!(w.inbox_files().is_empty());
    Some((w, logged, o))
}

/// Attack 6: a SIGHUP reload while a tee's copy is being synced. The reload abandons the upload
/// (after `shutdown_grace`) but not the copying thread, which goes on in the same process; the
/// next generation unties the tee and owns the file again meanwhile. The file must end in clean,
/// byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_tee_racing_the_next_generation_gives_its_file_back_as_still_written() {
    let Some((_, logged, _)) = reloaded_while_a_tee_syncs_ends_clean(601, "").await else {
        return;
    };
    // Nobody wrote to it: the abandoned tee's thread renamed the next owning's `X.copy` over
    // the staged name, which that owning then took for a writer (the original's ctime moved).
    let given_back: Vec<&String> = logged
        .iter()
        .filter(|l| l.contains("still held open for writing"))
        .collect();
    assert!(given_back.is_empty(), "{given_back:#?}");
}

/// Attack 6: a SIGTERM while a tee's copy is being synced; the next start sorts the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_while_a_tee_syncs_its_copy_loses_nothing() {
    let content = big_eicar_of(602, 48 << 20);
    let Some((w, logged)) = signalled_while_a_tee_syncs_its_copy(
        rustix::process::Signal::TERM,
        Duration::from_secs(2),
        &content,
        "",
    )
    .await
    else {
        return;
    };
    let o = w.outcomes();
    assert_eq!(
        o.get(&PathBuf::from("big.iso")),
        Some(&Outcome::Quarantine),
        "{o:?} {logged:#?}"
    );
    assert!(std::fs::read(w.quarantine.join("big.iso")).unwrap() == content);
    assert!(w.inbox_files().is_empty());
}

/// Attack 6, originals kept (`keep_originals = "always"`): a SIGHUP reload while a tee's copy is
/// being synced. The abandoned tee's thread renames the user's original to `X.orig` and the
/// copy over `X.staged` while the next generation owns the file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_tee_keeping_originals_leaves_an_unjournaled_orig_released_twice() {
    let extra = "keep_originals = \"always\"";
    let Some((w, _, o)) = reloaded_while_a_tee_syncs_ends_clean(603, extra).await else {
        return;
    };
    assert_eq!(o.len(), 1, "{o:?}");
    // Nothing of it left behind in staging but its kept original (journaled, dropped by the
    // sweep after `keep_original`), and a restart finds nothing more to sort.
    let left = staging_left(&w);
    let agent = w.start_agent();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = w.outcomes();
    agent.stop().await.0.unwrap();
    assert!(
        left.len() <= 1 && again.len() == 1,
        "left in staging: {left:?}; after a restart: {again:?}"
    );
}
