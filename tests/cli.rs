//! The binary's commands as a user runs them: `emulate --init-certs`, `check`, `status`, config
//! errors and their exit codes.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use dropscan::emulator::{CertBundle, EmulatorConfig};

use crate::util::{World, wait_for};

fn dropscan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Writes a private key file readable by its owner only, as the agent requires.
fn write_key(path: &std::path::Path, pem: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, pem).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Runs `dropscan check [--offline] --config CONFIG` off the async runtime.
async fn check(config: &std::path::Path, offline: bool) -> Output {
    let cfg = config.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        if offline {
            dropscan(&["check", "--offline", "--config", &cfg])
        } else {
            dropscan(&["check", "--config", &cfg])
        }
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_restrictions_and_names_each_failure() {
    let w = World::new(EmulatorConfig {
        max_object_size: 52_428_800,
        ..EmulatorConfig::default()
    })
    .await;
    let config = w.write_config();
    let cfg = config.to_str().unwrap().to_string();
    let ok = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || dropscan(&["check", "--config", &cfg])
    })
    .await
    .unwrap();
    let out = text(&ok);
    assert!(ok.status.success(), "{out}");
    assert!(
        out.contains("maxObjectSize: 52428800 bytes (50.00 MiB)"),
        "{out}"
    );
    assert!(out.contains("version:"), "{out}");

    // A wrong CA: the server is not trusted.
    let other = CertBundle::generate(&[]).unwrap();
    let ca = w.dir.path().join("other-ca.crt");
    std::fs::write(&ca, &other.ca_cert_pem).unwrap();
    let text_cfg = std::fs::read_to_string(&config).unwrap();
    let bad_ca = w.dir.path().join("bad-ca.toml");
    let ca_line = text_cfg
        .lines()
        .find(|l| l.starts_with("ca_cert"))
        .unwrap()
        .to_string();
    std::fs::write(
        &bad_ca,
        text_cfg.replace(&ca_line, &format!("ca_cert = \"{}\"", ca.display())),
    )
    .unwrap();
    let o = tokio::task::spawn_blocking(move || {
        dropscan(&["check", "--config", bad_ca.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("not trusted"), "{}", text(&o));

    // A client certificate from another CA: refused by the server.
    let cert = w.dir.path().join("foreign.crt");
    let key = w.dir.path().join("foreign.key");
    std::fs::write(&cert, &other.client_cert_pem).unwrap();
    write_key(&key, &other.client_key_pem);
    let mut foreign = String::new();
    for l in text_cfg.lines() {
        if l.starts_with("client_cert") {
            foreign.push_str(&format!("client_cert = \"{}\"\n", cert.display()));
        } else if l.starts_with("client_key") {
            foreign.push_str(&format!("client_key = \"{}\"\n", key.display()));
        } else {
            foreign.push_str(l);
            foreign.push('\n');
        }
    }
    let foreign_cfg = w.dir.path().join("foreign.toml");
    std::fs::write(&foreign_cfg, foreign).unwrap();
    let o = tokio::task::spawn_blocking(move || {
        dropscan(&["check", "--config", foreign_cfg.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("refused our client certificate"),
        "{}",
        text(&o)
    );

    // Not yet accepted: 401 with the advice.
    w.emulator().state().set_auto_accept(false);
    let mut second = CertBundle::load_from_dir(&w.certs_dir).unwrap();
    let (c, k) = second.issue_client("second").unwrap();
    second.client_cert_pem = c;
    second.client_key_pem = k;
    std::fs::write(&cert, &second.client_cert_pem).unwrap();
    write_key(&key, &second.client_key_pem);
    let pending_cfg = w.dir.path().join("foreign.toml");
    let o = tokio::task::spawn_blocking(move || {
        dropscan(&["check", "--config", pending_cfg.to_str().unwrap()])
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
    assert!(
        text(&o).contains("accept the integration request"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulate_init_certs_then_check_against_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    // A free port on loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut emu = Command::new(env!("CARGO_BIN_EXE_dropscan"))
        .args(["emulate", "--listen", &listen, "--init-certs"])
        .arg(&certs)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = wait_for(Duration::from_secs(20), || {
        std::net::TcpStream::connect(&listen).ok().map(|_| ())
    })
    .await;
    assert!(ready.is_some(), "emulator did not listen");
    for f in ["ca.crt", "client.crt", "client.key", "server.crt"] {
        assert!(certs.join(f).exists(), "{f} not written");
    }
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[server]
url = "https://{listen}"
sensor_id = "0f8e2d1c-3b4a-4c5d-8e9f-a0b1c2d3e4f5"
client_cert = "certs/client.crt"
client_key = "certs/client.key"
ca_cert = "certs/ca.crt"
[state]
dir = "state"
[[watch]]
path = "inbox"
clean_dir = "clean"
quarantine_dir = "quarantine"
failed_dir = "failed"
"#
        ),
    )
    .unwrap();
    let cfg_s = cfg.to_str().unwrap().to_string();
    let o = tokio::task::spawn_blocking(move || dropscan(&["check", "--config", &cfg_s]))
        .await
        .unwrap();
    emu.kill().unwrap();
    emu.wait().ok();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("maxObjectSize: 104857600 bytes (100.00 MiB)"),
        "{}",
        text(&o)
    );
}

#[test]
fn config_errors_name_file_and_key_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let certs = CertBundle::generate(&[]).unwrap();
    certs.write_to_dir(dir.path()).unwrap();
    let good = r#"[server]
url = "https://127.0.0.1:1"
sensor_id = "0f8e2d1c-3b4a-4c5d-8e9f-a0b1c2d3e4f5"
client_cert = "client.crt"
client_key = "client.key"
ca_cert = "ca.crt"
poll_interval = "60s"
[state]
dir = "state"
[[watch]]
path = "inbox"
clean_dir = "clean"
quarantine_dir = "quarantine"
failed_dir = "failed"
"#;
    let cases: &[(&str, String, &str)] = &[
        ("valid", good.to_string(), ""),
        (
            "missing key",
            good.replace("client_key = \"client.key\"\n", ""),
            "client_key",
        ),
        (
            "unknown key",
            good.replace("[state]\n", "[state]\ncolour = \"blue\"\n"),
            "colour",
        ),
        (
            "bad duration",
            good.replace("\"60s\"", "\"sixty\""),
            "server.poll_interval",
        ),
        (
            "bad path",
            good.replace("client.crt", "missing/client.crt"),
            "server.client_cert",
        ),
        (
            "not a uuid",
            good.replace("0f8e2d1c-3b4a-4c5d-8e9f-a0b1c2d3e4f5", "fs01"),
            "server.sensor_id",
        ),
        (
            "nested wrongly",
            good.replace("clean_dir = \"clean\"", "clean_dir = \".\""),
            "watch[0].clean_dir",
        ),
    ];
    for (name, text_cfg, key) in cases {
        let path = dir.path().join(format!("{}.toml", name.replace(' ', "-")));
        std::fs::write(&path, text_cfg).unwrap();
        let o = dropscan(&["check", "--offline", "--config", path.to_str().unwrap()]);
        let out = text(&o);
        if key.is_empty() {
            assert!(o.status.success(), "{name}: {out}");
        } else {
            assert_eq!(o.status.code(), Some(78), "{name}: {out}");
            assert!(out.contains(key), "{name}: {out}");
            assert!(out.contains(path.to_str().unwrap()), "{name}: {out}");
            if *name == "bad duration" {
                // poll_interval is on line 7 of the file.
                assert!(out.contains(".toml:7: key"), "{name}: {out}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_journal_while_the_agent_runs() {
    let w = World::quick().await;
    let agent = w.start_agent();
    w.drop_file("a.txt", b"a");
    w.drop_file("b.com", crate::util::EICAR);
    w.wait_placed(2, Duration::from_secs(30)).await;
    let cfg = w.write_config();
    // A file is in its destination a moment before its record is done (seen in the whole suite:
    // "done 1, placing 1" right after both files were placed): asked again until both are.
    let mut out = String::new();
    for _ in 0..120 {
        let cfg = cfg.clone();
        let o = tokio::task::spawn_blocking(move || {
            dropscan(&["status", "--config", cfg.to_str().unwrap()])
        })
        .await
        .unwrap();
        out = text(&o);
        assert!(o.status.success(), "{out}");
        if out.contains("clean") && out.contains("quarantine") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(out.contains("clean") && out.contains("quarantine"), "{out}");
    agent.stop().await.0.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_results_needs_confirmation_and_deletes_all() {
    let w = World::quick().await;
    let cfg = w.write_config();
    let c = cfg.to_str().unwrap().to_string();
    let c2 = c.clone();
    let o = tokio::task::spawn_blocking(move || dropscan(&["purge-results", "--config", &c]))
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(64), "usage: {}", text(&o));
    assert!(text(&o).contains("--yes"), "{}", text(&o));
    assert_eq!(w.emulator().state().stats().delete_all, 0);
    let o =
        tokio::task::spawn_blocking(move || dropscan(&["purge-results", "--config", &c2, "--yes"]))
            .await
            .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(w.emulator().state().stats().delete_all, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_scan_reports_progress_and_exits_by_verdict() {
    let w = World::quick().await;
    for i in 0..5 {
        w.drop_file(
            &format!("batch/{i}.txt"),
            format!("document {i}").as_bytes(),
        );
    }
    let cfg = w.write_config();
    let c = cfg.to_str().unwrap().to_string();
    let run = |c: String| {
        tokio::task::spawn_blocking(move || {
            dropscan(&["scan", "--config", &c, "--max-time", "60s"])
        })
    };
    let o = run(c.clone()).await.unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("5 placed (clean 5, quarantine 0, failed 0)"),
        "{}",
        text(&o)
    );
    assert_eq!(World::files_in(&w.clean).len(), 5);
    // A detection: exit 1, like a virus scanner.
    w.drop_file("bad.com", crate::util::EICAR);
    w.drop_file("good.txt", b"fine");
    let o = run(c.clone()).await.unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("2 placed (clean 1, quarantine 1, failed 0)"),
        "{}",
        text(&o)
    );
    // Nothing to do: exit 0 at once.
    let o = run(c).await.unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("0 placed"), "{}", text(&o));
}

/// A TCP server on 127.0.0.1 that answers every connection with `reply` in clear text once it
/// has read the first bytes (the TLS ClientHello), then waits for the client to hang up.
async fn clear_text_server(reply: Vec<u8>) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let work = async {
                    let mut buf = [0u8; 4096];
                    if tcp.read(&mut buf).await.ok()? == 0 {
                        return None;
                    }
                    tcp.write_all(&reply).await.ok()?;
                    while tcp.read(&mut buf).await.ok()? > 0 {}
                    Some(())
                };
                tokio::time::timeout(Duration::from_secs(20), work)
                    .await
                    .ok();
            });
        }
    });
    (addr, task)
}

/// The world's config pointed at another address.
fn config_for(w: &World, addr: std::net::SocketAddr, name: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(w.write_config()).unwrap();
    let path = w.dir.path().join(name);
    std::fs::write(
        &path,
        text.replace(&format!("https://{}", w.addr), &format!("https://{addr}")),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_against_plain_http_or_garbage_on_the_port_exits_76() {
    let w = World::quick().await;
    let plain =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok".to_vec();
    let (plain_addr, plain_task) = clear_text_server(plain).await;
    let o = check(&config_for(&w, plain_addr, "plain.toml"), false).await;
    assert_eq!(o.status.code(), Some(76), "{}", text(&o));
    assert!(text(&o).contains("does not speak TLS"), "{}", text(&o));
    plain_task.abort();

    for seed in 0..3u64 {
        let garbage = crate::util::bytes(seed, 16 * 1024);
        let (addr, task) = clear_text_server(garbage).await;
        let o = check(&config_for(&w, addr, "garbage.toml"), false).await;
        assert_eq!(o.status.code(), Some(76), "seed {seed}: {}", text(&o));
        assert!(text(&o).contains("not a KATA scanner API"), "{}", text(&o));
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_without_filters_route_warns_connected_and_authorized_and_exits_0() {
    let w = World::quick().await;
    let config = w.write_config();
    for status in [405u16, 404] {
        w.emulator().state().set_no_filters_route(Some(status));
        let o = check(&config, false).await;
        let out = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}");
        assert!(
            out.lines().any(|l| l.starts_with(&format!(
                "warning: connected and authorized; restrictions unavailable ({status})"
            ))),
            "{out}"
        );
    }
    // A 401 still wins over the missing route.
    w.emulator().state().set_no_filters_route(Some(405));
    w.emulator().state().set_auto_accept(false);
    let mut other = CertBundle::load_from_dir(&w.certs_dir).unwrap();
    let (c, k) = other.issue_client("pending").unwrap();
    other.client_cert_pem = c;
    std::fs::write(w.certs_dir.join("client.crt"), &other.client_cert_pem).unwrap();
    write_key(&w.certs_dir.join("client.key"), &k);
    let o = check(&config, false).await;
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_client_cert_expiry_and_refuses_bad_keys_offline() {
    use std::os::unix::fs::PermissionsExt as _;
    let w = World::quick().await;
    let config = w.write_config();
    let o = check(&config, true).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("client cert: notAfter "))
        .unwrap_or_else(|| panic!("no expiry line in {out}"));
    assert!(line.contains("days left"), "{line}");

    // World-readable key: refused with the fix.
    let key = w.certs_dir.join("client.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = check(&config, true).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(78), "{out}");
    assert!(
        out.contains(&format!("chmod 600 {}", key.display())),
        "{out}"
    );
    // Group-readable: loads, with a warning line.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = check(&config, true).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("warning: the client key file")
            && text(&o).contains("readable by its group"),
        "{}",
        text(&o)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The key of another certificate: refused naming both files, offline too.
    let cert = w.certs_dir.join("client.crt");
    let (other_cert, _) = w.certs.issue_client("other").unwrap();
    std::fs::write(&cert, other_cert).unwrap();
    let o = check(&config, true).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(78), "{out}");
    assert!(out.contains("does not belong"), "{out}");
    assert!(out.contains(&cert.display().to_string()), "{out}");
    assert!(out.contains(&key.display().to_string()), "{out}");
}

/// `check` says, per inbox, how open writers are detected, and what completion rests on where
/// they cannot be (README, "Writers that pause").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_how_open_writers_are_detected_in_each_inbox() {
    let mut w = World::quick().await;
    let out = check(&w.write_config(), true).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("open writers: asked with a read lease"),
        "{}",
        text(&out)
    );
    w.watch_extra = "lease_check = \"off\"".into();
    let out = check(&w.write_config(), true).await;
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("open writers: not asked: lease_check = \"off\"") && t.contains("`settle`"),
        "{t}"
    );
}
