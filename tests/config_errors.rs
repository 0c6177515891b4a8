//! Configuration mistakes as an administrator makes them, run through the real binary: every
//! error a restart cannot fix is found by `check --offline` (the unit's `ExecStartPre`), and
//! `run` fails the same way with the same message and the exit code the unit does not restart
//! on; each message names its own file, line and key and gives advice that fits the mistake;
//! secrets in a hook URL are never written down. (Issue 18, findings 4, 6 and 7.)

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dropscan::emulator::{CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE};

use crate::util::World;

/// The exit code of a configuration error.
const EXIT_CONFIG: i32 = 78;
/// An unprivileged uid (`nobody`) for the tests that need the service user to be someone else.
const NOBODY: u32 = 65534;

fn dropscan_as(args: &[&str], uid: Option<u32>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dropscan"));
    c.args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        c.uid(uid).gid(uid);
    }
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `dropscan check --offline --config CFG`, as `uid` when given.
async fn check_offline(cfg: &Path, uid: Option<u32>) -> Output {
    let cfg = cfg.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        dropscan_as(&["check", "--offline", "--config", &cfg], uid)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// `dropscan run --config CFG`, as `uid` when given: its output once it exited by itself, or
/// `None` (after killing it) when it still runs after `limit`.
async fn run_until_exit(cfg: &Path, uid: Option<u32>, limit: Duration) -> Option<Output> {
    let cfg = cfg.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        let mut child = dropscan_as(&["run", "--config", &cfg], uid)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while start.elapsed() < limit {
            if child.try_wait().unwrap().is_some() {
                return Some(child.wait_with_output().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill().ok();
        child.wait().ok();
        None
    })
    .await
    .unwrap()
}

/// The 1-based line of the first line of `cfg` that starts with `prefix` (after indentation).
fn line_of(cfg: &Path, prefix: &str) -> usize {
    std::fs::read_to_string(cfg)
        .unwrap()
        .lines()
        .position(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starts with {prefix}"))
        + 1
}

/// The config error's line (the `config error: …` line) of an output.
fn config_error_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .find(|l| l.starts_with("config error:"))
        .unwrap_or_else(|| panic!("no `config error:` line in: {}", text(o)))
        .to_owned()
}

/// Asserts that `check --offline` and `run` both refuse `cfg` with exit 78 and the same
/// message naming `cfg`, its line of `key` (written as `prefix`) and `key`, which contains
/// every one of `words`. Returns the message.
async fn both_refuse(
    cfg: &Path,
    uid: Option<u32>,
    key: &str,
    prefix: &str,
    words: &[&str],
) -> String {
    let checked = check_offline(cfg, uid).await;
    assert_eq!(
        checked.status.code(),
        Some(EXIT_CONFIG),
        "check --offline passes what `run` cannot use ({key}): {}",
        text(&checked)
    );
    let message = config_error_line(&checked);
    let at = format!("{}:{}: key `{key}`", cfg.display(), line_of(cfg, prefix));
    assert!(message.contains(&at), "names {at}: {message}");
    for w in words {
        assert!(message.contains(w), "says `{w}`: {message}");
    }
    let ran = run_until_exit(cfg, uid, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("`run` waits for ever on {key} instead of failing: {message}"));
    assert_eq!(
        ran.status.code(),
        Some(EXIT_CONFIG),
        "`run` must exit 78 on {key}, as check does: {}",
        text(&ran)
    );
    assert_eq!(
        config_error_line(&ran),
        message,
        "the same message from run and check"
    );
    message
}

/// Finding 4: a folder key naming a file passed `check --offline`, after which `run` exited 69
/// (a systemd restart loop) or, for `watch.path`, waited for ever saying the inbox "does not
/// exist (yet)"; no message named the file, the line or the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_key_naming_a_file_fails_check_offline_and_run_alike_with_78() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let original = std::fs::read_to_string(&cfg).unwrap();
    let root = w.dir.path();
    std::fs::write(root.join("a-file"), b"not a folder").unwrap();
    for (key, written, prefix) in [
        ("state.dir", "dir = \"state\"", "dir ="),
        (
            "watch[0].clean_dir",
            "clean_dir = \"out/clean\"",
            "clean_dir",
        ),
        (
            "watch[0].quarantine_dir",
            "quarantine_dir = \"out/quarantine\"",
            "quarantine_dir",
        ),
        (
            "watch[0].failed_dir",
            "failed_dir = \"out/failed\"",
            "failed_dir",
        ),
        ("watch[0].path", "path = \"inbox\"", "path ="),
    ] {
        let changed = original.replacen(
            written,
            &format!("{} \"a-file\"", &written[..written.find('"').unwrap()]),
            1,
        );
        assert_ne!(changed, original, "{written}");
        std::fs::write(&cfg, &changed).unwrap();
        both_refuse(
            &cfg,
            None,
            key,
            prefix,
            &[&root.join("a-file").display().to_string(), "not a folder"],
        )
        .await;
    }
}

/// Finding 4: the most likely first-install mistake, a folder the service user cannot write,
/// passed `check --offline`; `run` then exited 69 in a restart loop. The check now tries the
/// writes as the user who runs it. Runs as `nobody` (root needed to switch users).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_the_service_user_cannot_write_fails_check_offline_and_run_alike_with_78() {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: needs root to run dropscan as a second, unprivileged user");
        return;
    }
    let w = World::quick().await;
    let root = w.dir.path().to_path_buf();
    // Everything belongs to the service user (`nobody` here), as after a correct install …
    let cfg = w.write_config();
    chown_tree(&root, NOBODY);
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    // … except the folder the destinations are to be created in: root's, 0755.
    let out = root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
    let message = both_refuse(
        &cfg,
        Some(NOBODY),
        "watch[0].clean_dir",
        "clean_dir",
        &[
            "cannot create folder as the user",
            "Permission denied",
            "chown",
        ],
    )
    .await;
    assert!(message.contains("(uid 65534)"), "names the user: {message}");

    // The state folder: root's, the journal cannot be written.
    std::os::unix::fs::chown(&out, Some(NOBODY), Some(NOBODY)).unwrap();
    let state = root.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    both_refuse(
        &cfg,
        Some(NOBODY),
        "state.dir",
        "dir =",
        &["Permission denied", "chown"],
    )
    .await;

    // With both writable, the check passes as that user (and creates the destinations).
    chown_tree(&root, NOBODY);
    let ok = check_offline(&cfg, Some(NOBODY)).await;
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(w.clean.is_dir() && w.quarantine.is_dir() && w.failed.is_dir());
    let leftovers: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("check"))
        .collect();
    assert!(leftovers.is_empty(), "the probe is removed: {leftovers:?}");
}

/// Finding 4: under the unit's `ProtectSystem=strict`, a folder missing from the README's
/// `ReadWritePaths` drop-in gave "Read-only file system" with no hint. Needs a read-only bind
/// mount (root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_folder_names_the_systemd_drop_in_that_makes_it_writable() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let out = w.dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let bind = |args: &[&str]| {
        Command::new("mount")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let o = out.to_str().unwrap();
    if !bind(&["--bind", o, o]) {
        println!("skipped: cannot bind-mount here (needs CAP_SYS_ADMIN)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            Command::new("umount").arg(&self.0).status().ok();
        }
    }
    let _unmount = Unmount(out.clone());
    if !bind(&["-o", "remount,bind,ro", o, o]) {
        println!("skipped: cannot remount read-only here");
        return;
    }
    let message = both_refuse(
        &cfg,
        None,
        "watch[0].clean_dir",
        "clean_dir",
        &[
            "Read-only file system",
            "ReadWritePaths=",
            "systemctl edit dropscan.service",
        ],
    )
    .await;
    // The folder that exists: systemd refuses a ReadWritePaths= that does not.
    assert!(
        message.contains(&format!("ReadWritePaths={} ", out.display())),
        "{message}"
    );
}

fn chown_tree(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
    if p.is_dir() && !p.is_symlink() {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            chown_tree(&e.path(), uid);
        }
    }
}

/// Finding 6: a hook URL's password was written in clear into WARN and ERROR lines, the
/// journal's error history and `status`. Such a URL is now refused, naming `secret_file`,
/// without ever repeating the password; `status` redacts one kept in the history by an older
/// version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_url_password_is_never_written_in_clear() {
    const PASSWORD: &str = "pw-s3cr3t-4711";
    let mut w = World::quick().await;
    for url in [
        format!("https://alice:{PASSWORD}@127.0.0.1:9/hooks/dropscan"),
        format!("https://{PASSWORD}@127.0.0.1:9/hooks/dropscan"),
        // Not a URL at all: the error quotes it.
        format!("https://alice:{PASSWORD}@"),
    ] {
        w.more_watches = format!("\n[[hook]]\non = [\"quarantine\"]\nurl = \"{url}\"\n");
        let cfg = w.write_config();
        let checked = check_offline(&cfg, None).await;
        assert_eq!(
            checked.status.code(),
            Some(EXIT_CONFIG),
            "{}",
            text(&checked)
        );
        let all = text(&checked);
        assert!(!all.contains(PASSWORD), "the password in clear: {all}");
        assert!(all.contains("hook[0].url"), "{all}");
        let ran = run_until_exit(&cfg, None, Duration::from_secs(30))
            .await
            .expect("run refuses the URL");
        assert_eq!(ran.status.code(), Some(EXIT_CONFIG), "{}", text(&ran));
        assert!(!text(&ran).contains(PASSWORD), "{}", text(&ran));
        let state = w.state_dir();
        for entry in std::fs::read_dir(&state).into_iter().flatten().flatten() {
            let bytes = std::fs::read(entry.path()).unwrap_or_default();
            assert!(
                !bytes
                    .windows(PASSWORD.len())
                    .any(|b| b == PASSWORD.as_bytes()),
                "the password in {}",
                entry.path().display()
            );
        }
    }
    w.more_watches = format!(
        "\n[[hook]]\non = [\"quarantine\"]\nurl = \"https://alice:{PASSWORD}@127.0.0.1:9/h\"\n"
    );
    let message = dropscan::config::Config::load(&w.write_config())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("secret_file"),
        "points to secret_file: {message}"
    );

    // A delivery error kept in the journal's history by an older version: `status` redacts it.
    w.more_watches.clear();
    let cfg = w.write_config();
    std::fs::create_dir_all(w.state_dir()).unwrap();
    {
        let journal =
            dropscan::journal::Journal::open(&w.state_dir().join("journal.sqlite")).unwrap();
        journal
            .note_error(format!(
                "hook https://alice:{PASSWORD}@siem.example.org/hooks/dropscan gave up after 20 attempts: error sending request for url (https://alice:{PASSWORD}@siem.example.org/hooks/dropscan)"
            ))
            .await
            .unwrap();
    }
    // … and an event still queued for that URL: the agent names the hook it no longer has.
    {
        use dropscan::journal::testing::RawAccess as _;
        let journal =
            dropscan::journal::Journal::open(&w.state_dir().join("journal.sqlite")).unwrap();
        let hook = format!("url:https://alice:{PASSWORD}@siem.example.org/hooks/dropscan");
        journal
            .run(move |db| {
                db.execute(
                    "INSERT INTO hook_events (hook, file_id, event, next_at, created_at) VALUES (?1, NULL, '{}', 0, 0)",
                    [hook],
                )
                .unwrap();
                Ok(())
            })
            .await
            .unwrap();
    }
    let log = w.dir.path().join("run.log");
    let logged = {
        let (c, log) = (cfg.to_str().unwrap().to_string(), log.clone());
        tokio::task::spawn_blocking(move || {
            let mut child = dropscan_as(&["run", "--config", &c], None)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let start = Instant::now();
            let mut text = String::new();
            while start.elapsed() < Duration::from_secs(30) {
                text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("not configured now") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
            rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok();
            child.wait().unwrap();
            text
        })
        .await
        .unwrap()
    };
    assert!(
        logged.contains("siem.example.org"),
        "the hook is named: {logged}"
    );
    assert!(
        !logged.contains(PASSWORD),
        "the log shows the password: {logged}"
    );

    let c = cfg.to_str().unwrap().to_string();
    let status = tokio::task::spawn_blocking(move || {
        dropscan_as(&["status", "--config", &c], None)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    let shown = text(&status);
    assert!(
        shown.contains("siem.example.org"),
        "the error is listed: {shown}"
    );
    assert!(
        !shown.contains(PASSWORD),
        "status shows the password: {shown}"
    );
}

/// Finding 7: advice that did not fit the mistake, and errors that named the wrong key. Each
/// case is a config an administrator could write; its error must name its own key and line and
/// must not tell them to `chmod` a certificate, a folder or `/dev/null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_give_advice_that_fits_the_mistake() {
    let mut w = World::quick().await;
    let certs = w.certs_dir.clone();
    let cert = certs.join(CLIENT_CERT_FILE);
    let key = certs.join(CLIENT_KEY_FILE);
    let ca = certs.join(CA_CERT_FILE);
    let other_key = w.dir.path().join("other.key");
    let other = dropscan::emulator::CertBundle::generate(&[]).unwrap();
    std::fs::write(&other_key, &other.client_key_pem).unwrap();
    std::fs::set_permissions(&other_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let not_pem = w.dir.path().join("not-pem.crt");
    std::fs::write(&not_pem, "hello").unwrap();
    let base = std::fs::read_to_string(w.write_config()).unwrap();
    let with = |from: &Path, to: &Path| {
        base.replace(
            &format!("\"{}\"", from.display()),
            &format!("\"{}\"", to.display()),
        )
    };
    let swapped = base
        .replace(
            &format!("client_cert = \"{}\"", cert.display()),
            "client_cert = \"@KEY@\"",
        )
        .replace(
            &format!("client_key = \"{}\"", key.display()),
            &format!("client_key = \"{}\"", cert.display()),
        )
        .replace("@KEY@", &key.display().to_string());
    let cases: Vec<(&str, String, &str, &str, &[&str])> = vec![
        (
            "certificate and key swapped",
            swapped,
            "server.client_key",
            "client_key",
            &["holds a certificate, not a private key", "swapped"],
        ),
        (
            "key path is a folder",
            with(&key, &certs),
            "server.client_key",
            "client_key",
            &["is a folder, not a regular file"],
        ),
        (
            "key of another certificate",
            with(&key, &other_key),
            "server.client_key",
            "client_key",
            &["does not belong to the client certificate"],
        ),
        (
            "CA is not PEM",
            with(&ca, &not_pem),
            "server.ca_cert",
            "ca_cert",
            &["CA certificate"],
        ),
        (
            "certificate is not PEM",
            with(&cert, &not_pem),
            "server.client_cert",
            "client_cert",
            &["client certificate"],
        ),
        (
            "CA missing",
            with(&ca, &w.dir.path().join("nowhere.crt")),
            "server.ca_cert",
            "ca_cert",
            &["No such file"],
        ),
    ];
    for (what, text_cfg, k, prefix, words) in cases {
        let cfg = w.dir.path().join("case.toml");
        std::fs::write(&cfg, &text_cfg).unwrap();
        let o = check_offline(&cfg, None).await;
        assert_eq!(o.status.code(), Some(EXIT_CONFIG), "{what}: {}", text(&o));
        let m = config_error_line(&o);
        let at = format!("{}:{}: key `{k}`", cfg.display(), line_of(&cfg, prefix));
        assert!(m.contains(&at), "{what}: names {at}: {m}");
        assert!(
            !m.contains(" / "),
            "{what}: names one key, not all three: {m}"
        );
        assert!(!m.contains("chmod"), "{what}: misleading chmod advice: {m}");
        for word in words {
            assert!(m.contains(word), "{what}: says `{word}`: {m}");
        }
    }

    // Hooks: `/dev/null` as the secret, a program that is relative or missing.
    let script = w.dir.path().join("notify.sh");
    std::fs::write(&script, "#!/bin/sh\ncat >/dev/null\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (what, hook, words) in [
        (
            "secret_file = /dev/null",
            "on = [\"quarantine\"]\nurl = \"https://siem.example.org/h\"\nsecret_file = \"/dev/null\"".to_owned(),
            &["not a regular file"][..],
        ),
        (
            "a relative hook command",
            "on = [\"quarantine\"]\ncommand = [\"notify.sh\"]".to_owned(),
            &["not an absolute path"][..],
        ),
        (
            "a hook command that does not exist",
            "on = [\"quarantine\"]\ncommand = [\"/nonexistent/notify-soc\"]".to_owned(),
            &["/nonexistent/notify-soc", "No such file"][..],
        ),
    ] {
        w.more_watches = format!("\n[[hook]]\n{hook}\n");
        let cfg = w.write_config();
        let o = check_offline(&cfg, None).await;
        assert_eq!(o.status.code(), Some(EXIT_CONFIG), "{what}: {}", text(&o));
        let m = config_error_line(&o);
        assert!(m.contains(":") && m.contains("hook[0]."), "{what}: {m}");
        assert!(!m.contains("chmod"), "{what}: misleading chmod advice: {m}");
        for word in words {
            assert!(m.contains(word), "{what}: says `{word}`: {m}");
        }
    }
    w.more_watches = format!(
        "\n[[hook]]\non = [\"quarantine\"]\ncommand = [\"{}\"]\n",
        script.display()
    );
    let o = check_offline(&w.write_config(), None).await;
    assert!(
        o.status.success(),
        "an absolute, executable hook passes: {}",
        text(&o)
    );

    // An unknown log level would hide every log line: refused.
    w.more_watches.clear();
    let cfg = w.write_config();
    let verbose = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("level = \"warn\"", "level = \"verbose\"");
    std::fs::write(&cfg, verbose).unwrap();
    let o = check_offline(&cfg, None).await;
    assert_eq!(o.status.code(), Some(EXIT_CONFIG), "{}", text(&o));
    let m = config_error_line(&o);
    assert!(
        m.contains(&format!(":{}: key `log.level`", line_of(&cfg, "level ="))),
        "{m}"
    );
    assert!(m.contains("verbose"), "{m}");

    // A history shorter than a minute would prune records as they finish: refused.
    let short = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("level = \"verbose\"", "level = \"warn\"")
        .replace("[state]\n", "[state]\nhistory = \"30s\"\n");
    std::fs::write(&cfg, short).unwrap();
    let o = check_offline(&cfg, None).await;
    assert_eq!(o.status.code(), Some(EXIT_CONFIG), "{}", text(&o));
    let m = config_error_line(&o);
    assert!(
        m.contains(&format!(
            ":{}: key `state.history`",
            line_of(&cfg, "history =")
        )),
        "{m}"
    );
    assert!(m.contains("too short"), "{m}");

    // The metrics port on every address: valid, with a warning naming the key.
    let cfg = w.write_config();
    let open = format!(
        "{}\n[metrics]\nlisten = \"0.0.0.0:0\"\n",
        std::fs::read_to_string(&cfg).unwrap()
    );
    std::fs::write(&cfg, open).unwrap();
    let o = check_offline(&cfg, None).await;
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    let warning = out
        .lines()
        .find(|l| l.contains("metrics.listen"))
        .unwrap_or_else(|| panic!("no warning on metrics.listen = 0.0.0.0: {out}"));
    assert!(warning.starts_with("warning:"), "{warning}");
    assert!(warning.contains("other hosts"), "{warning}");
    assert!(
        warning.contains(&format!(":{}:", line_of(&cfg, "listen ="))),
        "{warning}"
    );
}

/// Finding 4, through a reload: a SIGHUP with a folder key naming a file used to replace the
/// running agent with one that could not start, and `run` exited 69 (a restart loop). The new
/// file is tried like `check --offline` tries it, and refused: the agent keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_onto_a_folder_key_naming_a_file_is_refused_and_the_agent_keeps_running() {
    let w = World::quick().await;
    let cfg = w.write_config();
    std::fs::write(w.dir.path().join("a-file"), b"not a folder").unwrap();
    let log = w.dir.path().join("run.log");
    let (c, l) = (cfg.clone(), log.clone());
    let (inbox, clean) = (w.inbox.clone(), w.clean.clone());
    let (refused, still_running, went_on) = tokio::task::spawn_blocking(move || {
        let mut child = dropscan_as(&["run", "--config", c.to_str().unwrap()], None)
            .env("RUST_LOG", "warn,dropscan::watch=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&l).unwrap())
            .spawn()
            .unwrap();
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
        // Running, its signal handlers installed: its pipeline watches the inbox.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30)
            && !std::fs::read_to_string(&l).is_ok_and(|t| t.contains("watching inbox"))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&c).unwrap();
        std::fs::write(
            &c,
            text.replace("clean_dir = \"out/clean\"", "clean_dir = \"a-file\""),
        )
        .unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
        let mut refused = String::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            refused = std::fs::read_to_string(&l).unwrap_or_default();
            if refused.contains("refused") || child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Still at work on the old configuration: a file dropped now is released.
        std::fs::write(inbox.join("after.txt"), b"after the refused reload").unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) && !clean.join("after.txt").exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let went_on = clean.join("after.txt").exists();
        let still_running = child.try_wait().unwrap().is_none();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok();
        let status = child.wait().unwrap();
        (
            format!("{refused}\nexit: {status:?}"),
            still_running,
            went_on,
        )
    })
    .await
    .unwrap();
    assert!(
        went_on,
        "the agent stopped working after a refused reload: {refused}"
    );
    assert!(
        still_running,
        "the agent stopped on a refused reload: {refused}"
    );
    assert!(
        refused.contains("SIGHUP: configuration refused"),
        "{refused}"
    );
    assert!(refused.contains("watch[0].clean_dir"), "{refused}");
    assert!(refused.contains("not a folder"), "{refused}");
}

/// Finding 4: a `staging_dir` on another filesystem than its inbox passed `check --offline`;
/// `run` then exited 69 ("must be on the same filesystem"), a restart loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_dir_on_another_filesystem_fails_check_offline_and_run_alike_with_78() {
    use std::os::unix::fs::MetadataExt as _;
    let mut w = World::quick().await;
    let Some(other) = ["/dev/shm", "/run", "/var/tmp"]
        .into_iter()
        .map(Path::new)
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| {
                m.dev() != std::fs::metadata(&w.inbox).unwrap().dev() && !m.permissions().readonly()
            })
        })
    else {
        println!("skipped: no second filesystem to put a staging folder on");
        return;
    };
    let staging = tempfile::tempdir_in(other).unwrap();
    w.watch_extra = format!("staging_dir = \"{}\"", staging.path().display());
    let cfg = w.write_config();
    both_refuse(
        &cfg,
        None,
        "watch[0].staging_dir",
        "staging_dir",
        &["not on the filesystem of the inbox"],
    )
    .await;
}
