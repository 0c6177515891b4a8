//! What the package ships, as an administrator meets it: the conffile's placeholders, systemd's
//! notify protocol from the real `dropscan run`, the generated completions and man pages, and
//! the `.deb` metadata. (`packaging/check` builds the `.deb` itself and runs `systemd-analyze`
//! and `lintian` where they are installed.)

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use dropscan::emulator::{CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE};

use crate::util::{SENSOR, World, wait_for};

const EXAMPLE: &str = include_str!("../config/dropscan.example.toml");
const UNIT: &str = include_str!("../packaging/systemd/dropscan.service");
const LIMIT: Duration = Duration::from_secs(30);

fn dropscan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `dropscan check --offline` of `text` written to a file in `dir`.
fn check_offline(dir: &Path, text: &str) -> Output {
    let cfg = dir.join("dropscan.toml");
    std::fs::write(&cfg, text).unwrap();
    dropscan(&["check", "--offline", "--config", cfg.to_str().unwrap()])
}

/// The example config with every absolute path moved under `w`'s folder and the certificates of
/// `w`'s emulator: what an administrator has once the files exist, placeholders left alone.
fn example_with_paths_of(w: &World) -> String {
    let root = w.dir.path().display().to_string();
    let certs = |name: &str| w.certs_dir.join(name).display().to_string();
    std::fs::create_dir_all(w.dir.path().join("srv/drop/inbox")).unwrap();
    EXAMPLE
        .replace("/etc/dropscan/client.crt", &certs(CLIENT_CERT_FILE))
        .replace("/etc/dropscan/client.key", &certs(CLIENT_KEY_FILE))
        .replace("/etc/dropscan/kata-ca.crt", &certs(CA_CERT_FILE))
        .replace("/var/lib/dropscan", &format!("{root}/state"))
        .replace("/srv/drop", &format!("{root}/srv/drop"))
}

/// The value of `key = "…"` in the example (the first uncommented one).
fn example_value(key: &str) -> String {
    let prefix = format!("{key} = \"");
    let line = EXAMPLE
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{key}` in the example config"));
    line[prefix.len()..line.len() - 1].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_config_fails_check_on_each_placeholder_until_it_is_set() {
    let w = World::quick().await;
    let config = example_with_paths_of(&w);
    let (url, sensor) = (example_value("url"), example_value("sensor_id"));
    assert!(url.contains("REPLACE-ME"), "{url}");
    assert!(sensor.contains("REPLACE-ME"), "{sensor}");

    let o = check_offline(w.dir.path(), &config);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    let msg = text(&o);
    assert!(msg.contains("server.url"), "{msg}");
    assert!(msg.contains("placeholder"), "{msg}");
    assert!(
        msg.contains("Central Node"),
        "says what to put there: {msg}"
    );

    let config = config.replace(&url, &format!("https://{}", w.addr));
    let o = check_offline(w.dir.path(), &config);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    let msg = text(&o);
    assert!(msg.contains("server.sensor_id"), "{msg}");
    assert!(msg.contains("uuidgen"), "says what to put there: {msg}");

    // The commented-out sensor_instance_id, uncommented but not edited, is refused too.
    let config = config.replace(&sensor, SENSOR);
    let careless = config.replace("# sensor_instance_id", "sensor_instance_id");
    let o = check_offline(w.dir.path(), &careless);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert!(
        text(&o).contains("server.sensor_instance_id"),
        "{}",
        text(&o)
    );

    // Every placeholder set: the file passes, offline and against the server.
    let o = check_offline(w.dir.path(), &config);
    assert!(o.status.success(), "{}", text(&o));
    let cfg = w.dir.path().join("dropscan.toml");
    let o = tokio::task::spawn_blocking(move || {
        dropscan(&["check", "--config", cfg.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

/// Collects the datagrams that arrive on `socket` until `want` has been seen in one of them.
async fn receive_until(
    socket: &tokio::net::UnixDatagram,
    seen: &mut Vec<String>,
    want: &str,
) -> bool {
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut buf = vec![0u8; 4096];
    while !seen.iter().any(|m| m.lines().any(|l| l == want)) {
        match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Ok(Err(e)) => panic!("notify socket: {e}"),
            Err(_) => return false,
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_under_systemd_says_ready_pings_the_watchdog_and_says_stopping() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let sock_path = w.dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .env("NOTIFY_SOCKET", &sock_path)
        // WatchdogSec=1s as systemd passes it (no WATCHDOG_PID: any process may ping).
        .env("WATCHDOG_USEC", "1000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let ready = receive_until(&socket, &mut seen, "READY=1").await;
    let watchdog = ready && receive_until(&socket, &mut seen, "WATCHDOG=1").await;
    let running = seen.iter().any(|m| m.contains("STATUS=running"));
    // The agent is really running once READY=1 is said: a file dropped now is sorted.
    let placed = if ready {
        w.drop_file("after-ready.txt", b"hello");
        wait_for(LIMIT, || {
            w.clean.join("after-ready.txt").exists().then_some(())
        })
        .await
        .is_some()
    } else {
        false
    };
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok();
    let stopping = receive_until(&socket, &mut seen, "STOPPING=1").await;
    let status = wait_for(LIMIT, || child.try_wait().unwrap()).await;
    if status.is_none() {
        child.kill().ok();
        child.wait().ok();
    }
    assert!(ready, "no READY=1; received {seen:?}");
    assert!(running, "no STATUS=running…; received {seen:?}");
    assert!(watchdog, "no WATCHDOG=1; received {seen:?}");
    assert!(placed, "the agent that said READY=1 did not place a file");
    assert!(stopping, "no STOPPING=1 after SIGTERM; received {seen:?}");
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {status:?}"
    );
}

#[test]
fn generate_writes_completions_for_three_shells_and_man_pages() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("assets");
    let o = dropscan(&["generate", "completions", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    for (file, marker) in [
        ("dropscan.bash", "complete -F"),
        ("_dropscan", "#compdef dropscan"),
        ("dropscan.fish", "complete -c dropscan"),
    ] {
        let body = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(body.contains(marker), "{file} lacks {marker:?}");
        assert!(body.contains("check"), "{file} completes the subcommands");
    }
    let man = dir.path().join("man");
    let o = dropscan(&["generate", "man", "--out", man.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let top = std::fs::read_to_string(man.join("dropscan.1")).unwrap();
    assert!(top.contains(".TH dropscan 1"), "{top}");
    assert!(
        top.contains("dropscan\\-run(1)"),
        "lists the subcommands' pages: {top}"
    );
    let run = std::fs::read_to_string(man.join("dropscan-run.1")).unwrap();
    assert!(
        run.contains("DROPSCAN_CONFIG"),
        "the env var is documented: {run}"
    );
    assert!(
        !man.join("dropscan-generate.1").exists(),
        "the hidden packaging command has no man page"
    );
    // Hidden from the help a user reads.
    let help = text(&dropscan(&["--help"]));
    assert!(!help.contains("generate"), "{help}");
}

#[test]
fn the_unit_is_type_notify_sandboxed_and_its_comments_are_right() {
    let has = |line: &str| UNIT.lines().any(|l| l.trim() == line);
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        // Leases on other users' files: the open-writer check (see `fsops::lease`).
        "CapabilityBoundingSet=CAP_LEASE",
        "AmbientCapabilities=CAP_LEASE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "SystemCallArchitectures=native",
        "MemoryDenyWriteExecute=yes",
        "StateDirectory=dropscan",
    ] {
        assert!(has(line), "the unit lacks `{line}`");
    }
    assert!(UNIT.lines().any(|l| l.starts_with("WatchdogSec=")));
    // The only writable paths are the state folder; watched folders come from a drop-in.
    assert!(
        !UNIT.lines().any(|l| l.starts_with("ReadWritePaths=")),
        "site paths belong in a drop-in"
    );
    assert!(UNIT.contains("systemctl edit dropscan.service"));
    // `check --offline` validates the file and does not contact the server: no comment may say
    // the pre-start check catches an unreachable server.
    assert!(UNIT.contains("check --config ${DROPSCAN_CONFIG} --offline"));
    assert!(!UNIT.contains("unreachable server"), "{UNIT}");
    assert!(UNIT.contains("does not contact the server"));
}

/// `[package.metadata.deb]` as cargo-deb reads it.
fn deb_metadata() -> toml::Table {
    let manifest: toml::Table = include_str!("../Cargo.toml").parse().unwrap();
    manifest["package"]["metadata"]["deb"]
        .as_table()
        .unwrap()
        .clone()
}

#[test]
fn the_deb_metadata_names_a_maintainer_e_mail_adduser_and_installs_completions_and_man_pages() {
    let deb = deb_metadata();
    let maintainer = deb["maintainer"].as_str().unwrap();
    assert!(
        maintainer.contains('<') && maintainer.contains('@') && maintainer.ends_with('>'),
        "{maintainer}"
    );
    assert!(deb["depends"].as_str().unwrap().contains("adduser"));
    let targets: Vec<String> = deb["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a[1].as_str().unwrap().to_string())
        .collect();
    for target in [
        "usr/bin/",
        "etc/dropscan/dropscan.toml",
        "usr/lib/systemd/system/",
        "usr/share/bash-completion/completions/dropscan",
        "usr/share/zsh/vendor-completions/_dropscan",
        "usr/share/fish/vendor_completions.d/dropscan.fish",
        "usr/share/man/man1/",
    ] {
        assert!(targets.iter().any(|t| t == target), "no asset to {target}");
    }
    let conf: Vec<&str> = deb["conf-files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(conf, ["/etc/dropscan/dropscan.toml"]);
    for script in ["postinst", "prerm", "postrm"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("packaging/debian")
            .join(script);
        let body = std::fs::read_to_string(&path).unwrap();
        assert!(body.starts_with("#!/bin/sh\n"), "{script}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{script} is executable");
    }
}

#[test]
fn the_debian_changelog_is_for_this_version_and_in_debian_format() {
    let deb = deb_metadata();
    let path = deb["changelog"].as_str().unwrap();
    let text =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    let first = text.lines().next().unwrap();
    let head = format!("dropscan ({}-", env!("CARGO_PKG_VERSION"));
    assert!(first.starts_with(&head), "{first} (the package is {head}…)");
    assert!(first.contains("; urgency="), "{first}");
    let trailer = text.lines().find(|l| l.starts_with(" -- ")).unwrap();
    assert!(
        trailer.contains('@') && trailer.contains(">  "),
        "{trailer}"
    );
}

/// Issue 10, friction found by a new user: `demo --exit-after 2` hung on a second run, because
/// the two samples were only dropped on the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_exit_after_2_no_longer_hangs_on_a_second_run() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    for run in 1..=2 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dropscan"))
            .args(["demo", "--exit-after", "2", "--poll-interval", "100ms"])
            .args(["--settle", "200ms", "--dir"])
            .arg(&demo)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let status = wait_for(LIMIT, || child.try_wait().unwrap()).await;
        if status.is_none() {
            child.kill().ok();
            child.wait().ok();
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "run {run} of `demo --exit-after 2` did not end: {status:?}"
        );
    }
    let clean = World::files_in(&demo.join("clean"));
    assert_eq!(clean.len(), 2, "hello.txt twice: {clean:?}");
}

/// Review finding: the unit grants `CAP_LEASE` (the open-writer check), while the README's
/// security section still said it runs "with no capabilities".
#[test]
fn the_readme_names_the_capability_the_unit_grants() {
    let readme = include_str!("../README.md")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        UNIT.lines()
            .any(|l| l.trim() == "AmbientCapabilities=CAP_LEASE")
    );
    assert!(
        !readme.contains("with no capabilities"),
        "README says no capabilities"
    );
    assert!(readme.contains("with one capability (`CAP_LEASE`"));
}

/// Issue 18, finding 4: what a restart cannot fix must not be restarted in a loop: a
/// configuration error (78, which now includes a folder the service user cannot write), refused
/// credentials (77) and a server that is not who it should be (76) need a person first. An
/// unreachable server or a fatal runtime error (69) and a held state lock (75) are restarted.
#[test]
fn the_unit_does_not_restart_on_an_exit_code_a_restart_cannot_fix() {
    use dropscan::error::{EXIT_CONFIG, EXIT_LOCKED, EXIT_NOPERM, EXIT_PROTOCOL, EXIT_UNAVAILABLE};
    let codes: Vec<u8> = UNIT
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RestartPreventExitStatus="))
        .flat_map(|v| v.split_whitespace().map(|c| c.parse::<u8>().unwrap()))
        .collect();
    for code in [EXIT_CONFIG, EXIT_NOPERM, EXIT_PROTOCOL] {
        assert!(
            codes.contains(&code),
            "the unit restarts on {code}: {codes:?}"
        );
    }
    for code in [EXIT_UNAVAILABLE, EXIT_LOCKED] {
        assert!(
            !codes.contains(&code),
            "the unit never restarts on {code}: {codes:?}"
        );
    }
}
