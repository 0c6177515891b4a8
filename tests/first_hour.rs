//! An administrator's first hour (issue 22), each finding as the real binary shows it: `scan
//! PATH` beside a running service, exit codes that mean one thing, the quarantine tools' dry
//! run, trailing slash and audit view, the one-shot scan's pace, `check`'s instance line,
//! `purge-results` and `failed --help` saying what they do, the man pages and the container file.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dropscan::emulator::{InjectedVerdict, ScanState};

use crate::quarantine_tools::{dropscan, text};
use crate::util::{EICAR, Outcome, World, wait_for};

const LIMIT: Duration = Duration::from_secs(30);
/// The example configuration, the source of `dropscan.toml(5)`.
const EXAMPLE: &str = include_str!("../config/dropscan.example.toml");

/// The real agent as the service runs it (`dropscan run`, holding the state folder's lock).
struct Service(std::process::Child);

impl Service {
    fn start(config: &Path) -> Service {
        let child = Command::new(env!("CARGO_BIN_EXE_dropscan"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Service(child)
    }

    /// SIGTERM, then waits for the graceful stop; true when it exited 0.
    async fn stop(mut self) -> bool {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.0.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok();
        let status = wait_for(LIMIT, || self.0.try_wait().unwrap()).await;
        status.is_some_and(|s| s.success())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Only if a failed assertion left it running: this test's own child, by its handle.
        if matches!(self.0.try_wait(), Ok(None)) {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_path_is_not_refused_beside_a_running_service_and_leaves_its_journal_alone() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let c = cfg.to_str().unwrap();
    let service = Service::start(&cfg);
    // The service runs once it sorts a file (and holds the lock from before that).
    w.drop_file("before.txt", b"dropped before the check");
    let first = w.wait_placed(1, LIMIT).await;
    assert_eq!(first.values().next(), Some(&Outcome::Clean), "{first:?}");

    let suspicious = w.dir.path().join("suspicious");
    std::fs::create_dir_all(&suspicious).unwrap();
    std::fs::write(suspicious.join("mail.com"), EICAR).unwrap();
    std::fs::write(suspicious.join("notes.txt"), b"harmless").unwrap();
    let out = dropscan(&[
        "scan",
        "--config",
        c,
        "--json",
        suspicious.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "detected → 1: {}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["totals"]["detected"], 1, "{doc:#}");
    assert_eq!(doc["totals"]["clean"], 1, "{doc:#}");
    // Nothing moved, and the service's journal, staging and destinations never saw them.
    assert_eq!(std::fs::read(suspicious.join("mail.com")).unwrap(), EICAR);
    assert!(World::files_in(&w.quarantine).is_empty());

    // The service goes on sorting, undisturbed.
    w.drop_file("after.txt", b"dropped after the check");
    let placed = w.wait_placed(2, LIMIT).await;
    assert!(placed.values().all(|o| *o == Outcome::Clean), "{placed:?}");
    assert!(service.stop().await, "the service stops cleanly");
    let summary = dropscan::journal::read_summary(&w.state_dir().join("journal.sqlite")).unwrap();
    let files: i64 = summary.per_state.iter().map(|(_, n)| n).sum();
    assert_eq!(
        files, 2,
        "only the inbox's files are journaled: {summary:?}"
    );

    // `scan` of the inboxes still takes the lock (it sorts): refused beside a service.
    let again = Service::start(&cfg);
    w.drop_file("third.txt", b"third");
    w.wait_placed(3, LIMIT).await;
    let out = dropscan(&["scan", "--config", c]).await;
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(again.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_64_so_that_2_only_means_refused_or_failed() {
    for args in [
        &["--no-such-option"][..],
        &["quarantine", "restore", "1"],
        &["quarantine", "purge", "--older-than", "ninety days"],
        &["failed", "retry"],
        &["scan", "--json"],
    ] {
        let out = dropscan(args).await;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out));
        assert!(!out.stderr.is_empty(), "{args:?}: the usage error is shown");
    }
    for args in [&["--help"][..], &["--version"], &["quarantine", "--help"]] {
        let out = dropscan(args).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        assert!(!out.stdout.is_empty());
    }
    let help = text(&dropscan(&["quarantine", "--help"]).await);
    assert!(help.contains("64 usage error"), "{help}");
}

/// A world whose agent put `names` into quarantine; the agent is stopped (the tools run
/// beside it or not alike).
async fn quarantined(names: &[&str]) -> (World, PathBuf) {
    let w = World::quick().await;
    let cfg = w.write_config();
    let agent = w.start_agent();
    for n in names {
        w.drop_file(n, &[EICAR, n.as_bytes()].concat());
    }
    let placed = w.wait_placed(names.len(), LIMIT).await;
    assert!(
        placed.values().all(|o| *o == Outcome::Quarantine),
        "{placed:?}"
    );
    let (r, _) = agent.stop().await;
    r.unwrap();
    (w, cfg)
}

/// The id of the kept entry with relative path `path`.
async fn id_of(cfg: &Path, path: &str) -> String {
    let out = dropscan(&[
        "quarantine",
        "list",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
    ])
    .await;
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    all.iter().find(|e| e["path"] == path).unwrap()["id"].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_purge_without_yes_is_a_dry_run_that_exits_0_and_echoes_the_age_as_given() {
    let (w, cfg) = quarantined(&["a.com", "b.com"]).await;
    let c = cfg.to_str().unwrap();
    let out = dropscan(&["quarantine", "purge", "--older-than", "90d", "--config", c]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("older than 90d"), "{}", text(&out));
    assert!(!text(&out).contains("month"), "{}", text(&out));
    let out = dropscan(&["quarantine", "purge", "--older-than", "0s", "--config", c]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let listed = text(&out);
    assert!(
        listed.contains("a.com") && listed.contains("b.com") && listed.contains("dry run"),
        "the dry run lists what would go: {listed}"
    );
    assert_eq!(World::files_in(&w.quarantine).len(), 2, "nothing deleted");
    let out = dropscan(&["failed", "purge", "--older-than", "30d", "--config", c]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("older than 30d"), "{}", text(&out));
    // With --yes, the default reason keeps the age as given too.
    let out = dropscan(&[
        "quarantine",
        "purge",
        "--older-than",
        "0s",
        "--yes",
        "--config",
        c,
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let show = dropscan(&["quarantine", "list", "--all", "--json", "--config", c]).await;
    let all: Vec<serde_json::Value> = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(all[0]["audit"][0]["reason"], "older than 0s", "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_restore_to_a_missing_folder_with_a_trailing_slash_is_refused_not_made_a_file() {
    let (w, cfg) = quarantined(&["sample.com"]).await;
    let c = cfg.to_str().unwrap();
    let id = id_of(&cfg, "sample.com").await;
    let folder = w.dir.path().join("analysis");
    let with_slash = format!("{}/", folder.display());
    let restore = |to: String| {
        let (id, c) = (id.clone(), c.to_string());
        async move {
            let args = [
                "quarantine",
                "restore",
                &id,
                "--to",
                &to,
                "--reason",
                "lab",
                "--config",
                &c,
            ];
            dropscan(&args).await
        }
    };
    let out = restore(with_slash.clone()).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no such folder"), "{}", text(&out));
    assert!(!folder.exists(), "no file named after the folder");
    assert_eq!(
        World::files_in(&w.quarantine).len(),
        1,
        "still in quarantine"
    );
    let all = text(&dropscan(&["quarantine", "list", "--all", "--config", c]).await);
    assert!(all.contains("restore-refused"), "audited: {all}");

    // The folder made, the same command restores into it under the file's name.
    std::fs::create_dir(&folder).unwrap();
    let out = restore(with_slash).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(folder.join("sample.com")).unwrap(),
        [EICAR, b"sample.com"].concat()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_list_all_shows_the_audit_records_the_readme_promises() {
    let (_w, cfg) = quarantined(&["fp.doc", "kept.com"]).await;
    let c = cfg.to_str().unwrap();
    let id = id_of(&cfg, "fp.doc").await;
    let reason = "FP, KATA ticket 4711";
    let out = dropscan(&[
        "quarantine",
        "release",
        &id,
        "--reason",
        reason,
        "--config",
        c,
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let out = dropscan(&["quarantine", "list", "--all", "--config", c]).await;
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout);
    let audit: Vec<&str> = listed.lines().filter(|l| l.contains("audit")).collect();
    assert_eq!(audit.len(), 1, "one record, for the release: {listed}");
    assert!(
        audit[0].contains("release") && audit[0].contains(reason) && audit[0].contains("uid"),
        "who, what, why: {listed}"
    );
    // Without --all: what is kept, no audit lines.
    let out = dropscan(&["quarantine", "list", "--config", c]).await;
    let kept = String::from_utf8_lossy(&out.stdout);
    assert!(
        kept.contains("kept.com") && !kept.contains("audit"),
        "{kept}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_shot_inbox_scan_does_not_wait_a_whole_poll_interval_for_verdicts() {
    let w = World::quick().await;
    let cfg = w.write_config();
    // The vendor's advice for a daemon: one results request a minute.
    let text_cfg = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("poll_interval = \"100ms\"", "poll_interval = \"60s\"");
    std::fs::write(&cfg, text_cfg).unwrap();
    for i in 0..4 {
        w.drop_file(&format!("tiny-{i}.txt"), format!("tiny {i}").as_bytes());
    }
    // Before the fix the first verdicts came a whole poll_interval (60 s) after the uploads:
    // --max-time ran out (69) long before.
    let out = dropscan(&[
        "scan",
        "--max-time",
        "40s",
        "--config",
        cfg.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(World::files_in(&w.clean).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_path_submits_an_error_verdict_again_up_to_max_attempts_as_run_does() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let flaky = b"the sandbox failed on this once".to_vec();
    let sha: [u8; 32] = {
        use sha2::Digest as _;
        sha2::Sha256::digest(&flaky).into()
    };
    w.emulator()
        .state()
        .inject_verdict(sha, InjectedVerdict::once(ScanState::Error));
    let path = w.dir.path().join("flaky.bin");
    std::fs::write(&path, &flaky).unwrap();
    let c = cfg.to_str().unwrap();
    let out = dropscan(&["scan", "--config", c, "--json", path.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["files"][0]["verdict"], "not detected", "{doc:#}");
    assert_eq!(w.emulator().state().stats().submits_accepted, 2);

    // Past server.max_attempts (here 1), the error stands: exit 2, and it says why.
    w.emulator()
        .state()
        .inject_verdict(sha, InjectedVerdict::once(ScanState::Error));
    let once = w.dir.path().join("once.toml");
    let text_cfg = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[server]\n", "[server]\nmax_attempts = 1\n");
    std::fs::write(&once, text_cfg).unwrap();
    let out = dropscan(&[
        "scan",
        "--config",
        once.to_str().unwrap(),
        path.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("max_attempts"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_staging_instance_it_uses_when_no_instance_id_is_set() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let without = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("sensor_instance_id = \"test\"\n", "");
    std::fs::write(&cfg, without).unwrap();
    let out = dropscan(&["check", "--offline", "--config", cfg.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("instance:"))
        .unwrap()
        .to_string();
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    assert!(!line.contains("(none)"), "{line}");
    assert!(line.contains(&format!(".dropscan/{host}")), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_results_deletes_the_results_of_every_instance_as_it_says() {
    let w = World::quick().await;
    let cfg = w.write_config();
    // Results of this instance ("test") and of another agent sharing the sensorId.
    let mine = scan_as(&w, Some("test")).await;
    let theirs = scan_as(&w, Some("node-b")).await;
    let help = text(&dropscan(&["purge-results", "--help"]).await);
    assert!(help.contains("all instances"), "{help}");
    let out = dropscan(&["purge-results", "--yes", "--config", cfg.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out));
    let state = w.emulator().state();
    assert!(state.scan(&mine).unwrap().deleted, "ours");
    assert!(
        state.scan(&theirs).unwrap().deleted,
        "the other instance's too, as the command says"
    );
}

/// Submits one small file as instance `instance`; its scanId.
async fn scan_as(w: &World, instance: Option<&str>) -> String {
    let mut options = dropscan::config::Config::load(&w.write_config())
        .unwrap()
        .server
        .client_options();
    options.sensor_instance_id = instance.map(str::to_string);
    let client = dropscan::kata::KataClient::new(options).unwrap();
    let id = dropscan::kata::ScanId::generate();
    let path = w.dir.path().join(format!("{}.bin", id.as_str()));
    std::fs::write(&path, b"a result to purge").unwrap();
    let file = tokio::fs::File::open(&path).await.unwrap();
    client.submit(&id, file, 17).await.unwrap();
    id.as_str().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_help_speaks_of_failed_files_not_of_quarantine() {
    let help = text(&dropscan(&["failed", "--help"]).await);
    assert!(!help.contains("quarantine"), "{help}");
    assert!(help.contains("failed folder"), "{help}");
    let help = text(&dropscan(&["anomalies", "--help"]).await);
    assert!(!help.contains("bytes changed"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn man_pages_carry_exit_status_files_signals_environment_see_also_and_the_config_page() {
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man");
    let out = dropscan(&["generate", "man", "--out", man.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out));
    for page in [
        "dropscan.1",
        "dropscan-run.1",
        "dropscan-quarantine-restore.1",
    ] {
        let body = std::fs::read_to_string(man.join(page)).unwrap();
        for section in [
            ".SH \"EXIT STATUS\"",
            ".SH FILES",
            ".SH SIGNALS",
            ".SH ENVIRONMENT",
            ".SH \"SEE ALSO\"",
        ] {
            assert!(body.contains(section), "{page} lacks {section}");
        }
        for code in ["64", "75", "78"] {
            assert!(body.contains(&format!("\\fB{code}\\fR")), "{page}: {code}");
        }
        assert!(body.contains("dropscan.toml(5)"), "{page}");
    }
    let page = std::fs::read_to_string(man.join("dropscan.toml.5")).unwrap();
    assert!(page.starts_with(".TH dropscan.toml 5"), "{page}");
    let mut keys = 0;
    for line in EXAMPLE.lines() {
        let l = line.trim_start_matches("# ");
        if let Some((key, _)) = l.split_once(" = ")
            && !key.is_empty()
            && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            && !line.starts_with("# #")
        {
            keys += 1;
            let shown = key.replace('-', "\\-");
            assert!(
                page.contains(&format!("\\fB{shown}\\fR")) || page.contains(&shown),
                "dropscan.toml(5) lacks {key}"
            );
        }
    }
    assert!(keys > 30, "{keys} keys found in the example");
    for table in ["[server]", "[state]", "[[watch]]", "[log]", "[metrics]"] {
        assert!(page.contains(&format!(".SS \"{table}\"")), "{table}");
    }
    // groff reads every page without a warning, where it is installed.
    if Command::new("groff").arg("--version").output().is_ok() {
        let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        pages.sort();
        for p in pages {
            let o = Command::new("groff")
                .args(["-k", "-man", "-ww", "-z", "-t"])
                .arg(&p)
                .output()
                .unwrap();
            assert!(
                o.status.success() && o.stderr.is_empty(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

#[test]
fn the_container_file_keeps_target_out_strips_stops_gracefully_and_checks_health() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = std::fs::read_to_string(root.join("packaging/container/Containerfile")).unwrap();
    // `COPY . .` of the whole tree: the ignore files must keep target/ (GBs) and .git out.
    assert!(file.contains("COPY . ."));
    for ignore in [".containerignore", ".dockerignore"] {
        let list = std::fs::read_to_string(root.join(ignore)).unwrap();
        let lines: Vec<&str> = list.lines().map(str::trim).collect();
        for must in ["target/", ".git/"] {
            assert!(lines.contains(&must), "{ignore} lacks {must}");
        }
    }
    let instructions: Vec<&str> = file
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(' ') && !l.is_empty())
        .collect();
    let has = |prefix: &str| instructions.iter().any(|l| l.starts_with(prefix));
    for needed in [
        "STOPSIGNAL SIGTERM",
        "VOLUME [\"/var/lib/dropscan\"]",
        "HEALTHCHECK ",
        "EXPOSE 9187",
        "USER dropscan",
    ] {
        assert!(has(needed), "no {needed}");
    }
    assert!(file.contains("/healthz"), "the health check asks /healthz");
    assert!(
        file.contains("CARGO_PROFILE_RELEASE_STRIP=symbols"),
        "stripped"
    );
    // The metrics listen address the image's example sets must exist in the example to replace.
    assert!(EXAMPLE.lines().any(|l| l == "listen = \"127.0.0.1:9187\""));
    assert!(file.contains("listen = \"0.0.0.0:9187\""));
    // And the README says it was not built here.
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("has not been built or run here"));
}
