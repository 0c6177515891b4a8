//! `dropscan scan PATH… --json` as a pipeline runs it (the real binary, the emulator over mTLS),
//! and the single-instance lock on the state folder.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};

use crate::util::{EICAR, World};

async fn dropscan(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_dropscan"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_paths_json_reports_each_file_and_moves_nothing() {
    let w = World::quick().await;
    let config = w.write_config();
    let target = w.dir.path().join("to-check");
    std::fs::create_dir_all(target.join("sub")).unwrap();
    std::fs::write(target.join("clean.txt"), b"harmless").unwrap();
    std::fs::write(target.join("sub/eicar.com"), EICAR).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", target.join("link")).unwrap();
    let single = w.dir.path().join("single.txt");
    std::fs::write(&single, b"one more").unwrap();

    let out = dropscan(vec![
        "scan".into(),
        "--config".into(),
        config.display().to_string(),
        "--json".into(),
        target.display().to_string(),
        single.display().to_string(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "detected → 1\n{stdout}\n{stderr}"
    );
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let totals = &doc["totals"];
    assert_eq!(totals["files"], 3, "{doc:#}");
    assert_eq!(totals["clean"], 2, "{doc:#}");
    assert_eq!(totals["detected"], 1, "{doc:#}");
    assert_eq!(totals["errors"], 0, "{doc:#}");
    assert_eq!(totals["skipped"], 1, "the symlink: {doc:#}");
    let files = doc["files"].as_array().unwrap();
    let eicar = files
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("eicar.com"))
        .unwrap();
    assert_eq!(eicar["verdict"], "detect");
    assert_eq!(eicar["size"], EICAR.len());
    assert_eq!(eicar["sha256"].as_str().unwrap().len(), 64);
    assert!(eicar["scan_id"].is_string());
    let link = files
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("link"))
        .unwrap();
    assert!(link["error"].as_str().unwrap().contains("symbolic link"));
    // Nothing moved, nothing journaled into the folders.
    assert_eq!(std::fs::read(target.join("sub/eicar.com")).unwrap(), EICAR);
    assert!(single.exists());
    assert!(World::files_in(&w.quarantine).is_empty());

    // Clean only → 0.
    let clean = dropscan(vec![
        "scan".into(),
        "--config".into(),
        config.display().to_string(),
        single.display().to_string(),
    ])
    .await;
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );

    // A missing path → 2.
    let missing = dropscan(vec![
        "scan".into(),
        "--config".into(),
        config.display().to_string(),
        "--json".into(),
        w.dir.path().join("nope").display().to_string(),
    ])
    .await;
    assert_eq!(missing.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_or_scan_on_one_state_folder_refuses_naming_the_pid() {
    let w = World::quick().await;
    let config = w.write_config();
    let held = dropscan::app::lock::lock_state_dir(&w.state_dir()).unwrap();
    for cmd in ["run", "scan"] {
        let out = dropscan(vec![
            cmd.into(),
            "--config".into(),
            config.display().to_string(),
        ])
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(i32::from(dropscan::error::EXIT_LOCKED)),
            "{cmd}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("PID {}", std::process::id())),
            "{cmd}: {stderr}"
        );
        assert!(stderr.contains("already runs"), "{cmd}: {stderr}");
    }
    // status does not need the lock.
    let status = dropscan(vec![
        "status".into(),
        "--config".into(),
        config.display().to_string(),
    ])
    .await;
    assert!(status.status.success());
    drop(held);
}
