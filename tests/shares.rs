//! The promises on a real share: the agent watches the folder that a real smbd or NFS-Ganesha
//! exports on 127.0.0.1, and real clients write into it (`smbclient`, a scanner-style SMB writer,
//! libnfs). The reproductions of the "paused writers" issue, and the normal cases that must keep
//! working. Each counts the uploads the emulator accepted: a half-written version must never be
//! uploaded, and the client's exact bytes must land in clean.
//!
//! A test whose server or client is missing prints "skipped: …" and returns (`.ci/run` installs
//! them, so CI always runs them).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::shares_fixture::{
    Ganesha, GaneshaOptions, MDCACHE_PROMPT_CLOSE, NfsVersion, Smbd, slow_writer_content,
};
use crate::util::{Outcome, World, bytes, wait_for};

const LIMIT: Duration = Duration::from_secs(90);

/// A world whose inbox is exported by a fresh smbd, with `settle` of one second.
pub(crate) async fn smb_world(watch_extra: &str) -> Option<(World, Smbd)> {
    let mut w = World::quick().await;
    w.settle = "1s";
    w.watch_extra = watch_extra.to_string();
    match Smbd::start(&w.inbox) {
        Ok(s) => Some((w, s)),
        Err(skip) => {
            eprintln!("{skip}");
            None
        }
    }
}

pub(crate) fn uploads(w: &World) -> u64 {
    w.emulator().state().stats().submits_accepted
}

/// Runs a blocking client call off the async threads.
async fn client<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn placed_clean(w: &World, rel: &str) {
    let o = w.wait_placed(1, LIMIT).await;
    assert_eq!(o.get(Path::new(rel)), Some(&Outcome::Clean), "{o:?}");
}

/// Issue reproduction 1: smbd creates the file empty when the client opens it and holds it open
/// while the client pauses (longer than `settle`, and than `settle_empty`) before any data. It was
/// released as a 0-byte file on a reused verdict, and the client's 2 MB went into a deleted inode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_a_client_that_creates_the_file_and_pauses_before_writing_loses_nothing() {
    let Some((w, smbd)) = smb_world("").await else {
        return;
    };
    let agent = w.start_agent();
    let data = bytes(1, 2_000_000);
    let d = data.clone();
    let smbd = std::sync::Arc::new(smbd);
    let s = std::sync::Arc::clone(&smbd);
    let status =
        client(move || s.put_paced("zero-first.pdf", &[(Duration::from_secs(5), d)])).await;
    assert!(status.success(), "smbclient: {status:?}");
    placed_clean(&w, "zero-first.pdf").await;
    assert_eq!(std::fs::read(w.clean.join("zero-first.pdf")).unwrap(), data);
    assert_eq!(uploads(&w), 1, "one upload, of the whole file");
    agent.stop().await.0.unwrap();
}

/// Issue reproduction 2: a 30 MiB put that stalls after 20 MiB (smbclient writes in 16 MiB
/// bursts). Clean held 16,777,216 bytes and the rest was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_a_put_that_stalls_after_the_first_16_mib_is_uploaded_once_whole() {
    let Some((w, smbd)) = smb_world("").await else {
        return;
    };
    let agent = w.start_agent();
    let data = bytes(2, 30 << 20);
    let (head, tail) = (data[..20 << 20].to_vec(), data[20 << 20..].to_vec());
    let status = client(move || {
        smbd.put_paced(
            "stall.iso",
            &[(Duration::ZERO, head), (Duration::from_secs(4), tail)],
        )
    })
    .await;
    assert!(status.success(), "smbclient: {status:?}");
    placed_clean(&w, "stall.iso").await;
    assert!(std::fs::read(w.clean.join("stall.iso")).unwrap() == data);
    assert_eq!(uploads(&w), 1);
    agent.stop().await.0.unwrap();
}

/// Issue reproduction 3: a scanner-style application writing through SMB, 1 MiB with a flush
/// every 2.5 s, holding the file open throughout. Clean held 3 of 4 MB, after uploads of 2 MB
/// and 3 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_a_scanner_writing_a_page_every_few_seconds_is_uploaded_once_whole() {
    let Some((w, smbd)) = smb_world("").await else {
        return;
    };
    let agent = w.start_agent();
    let written =
        client(move || smbd.slow_writer("scan-0001.pdf", 1 << 20, 4, Duration::from_millis(2500)))
            .await;
    let (status, out) = match written {
        Ok(x) => x,
        Err(skip) => {
            eprintln!("{skip}");
            return;
        }
    };
    assert!(status.success(), "slow writer: {status:?} {out}");
    placed_clean(&w, "scan-0001.pdf").await;
    assert!(
        std::fs::read(w.clean.join("scan-0001.pdf")).unwrap() == slow_writer_content(1 << 20, 4)
    );
    assert_eq!(uploads(&w), 1);
    agent.stop().await.0.unwrap();
}

/// Issue reproduction 5: a 30 MiB copy at about 6 MiB/s was uploaded three times (0 B, 16 MiB,
/// whole): a real KATA would have run three sandbox scans, two on half-written files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_a_slow_copy_is_uploaded_once_complete() {
    let Some((w, smbd)) = smb_world("").await else {
        return;
    };
    let agent = w.start_agent();
    let data = bytes(5, 30 << 20);
    let chunks: Vec<(Duration, Vec<u8>)> = data
        .chunks(3 << 20)
        .map(|c| (Duration::from_millis(500), c.to_vec()))
        .collect();
    let status = client(move || smbd.put_paced("slow.bin", &chunks)).await;
    assert!(status.success(), "smbclient: {status:?}");
    placed_clean(&w, "slow.bin").await;
    assert!(std::fs::read(w.clean.join("slow.bin")).unwrap() == data);
    assert_eq!(uploads(&w), 1, "uploaded once, complete");
    agent.stop().await.0.unwrap();
}

/// A client that writes a released file's name again: the new content is a new file, scanned
/// and placed beside the first (`name (1)`), never written into anything of dropscan's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_a_client_writing_a_released_name_again_gets_a_second_version() {
    let Some((w, smbd)) = smb_world("").await else {
        return;
    };
    let agent = w.start_agent();
    let (v1, v2) = (bytes(61, 300_000), bytes(62, 200_000));
    let local = w.dir.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("v1"), &v1).unwrap();
    std::fs::write(local.join("v2"), &v2).unwrap();
    let smbd = std::sync::Arc::new(smbd);
    let (s, l) = (std::sync::Arc::clone(&smbd), local.clone());
    client(move || s.put(&l.join("v1"), "plan.xlsx")).await;
    placed_clean(&w, "plan.xlsx").await;
    let (s, l) = (std::sync::Arc::clone(&smbd), local.clone());
    client(move || s.put(&l.join("v2"), "plan.xlsx")).await;
    let o = w.wait_placed(2, LIMIT).await;
    assert_eq!(o[Path::new("plan (1).xlsx")], Outcome::Clean);
    assert_eq!(std::fs::read(w.clean.join("plan.xlsx")).unwrap(), v1);
    assert_eq!(std::fs::read(w.clean.join("plan (1).xlsx")).unwrap(), v2);
    assert_eq!(uploads(&w), 2);
    agent.stop().await.0.unwrap();
}

/// Normal cases that must keep working through the share: a temp name renamed to its final name
/// once written (rsync, Office, browsers), a folder tree, and 2,000 small files by `mput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_temp_then_rename_a_folder_tree_and_2000_small_files_all_land_once() {
    let Some((w, smbd)) = smb_world("").await else {
        return;
    };
    let agent = w.start_agent();
    let local = w.dir.path().join("local");
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..2000u64 {
        let rel = PathBuf::from(format!("batch-{:02}/doc-{i:04}.txt", i / 100));
        let content = format!("document {i}\n")
            .repeat(1 + (i as usize % 7))
            .into_bytes();
        std::fs::create_dir_all(local.join(rel.parent().unwrap())).unwrap();
        std::fs::write(local.join(&rel), &content).unwrap();
        expected.insert(rel, content);
    }
    let report = bytes(7, 500_000);
    let single = w.dir.path().join("report.docx");
    std::fs::write(&single, &report).unwrap();
    expected.insert(PathBuf::from("report.docx"), report);
    let l = local.clone();
    client(move || {
        smbd.mput_dir(&l);
        smbd.put(&single, "report.docx.tmp");
        smbd.rename("report.docx.tmp", "report.docx");
    })
    .await;
    w.wait_placed(expected.len(), Duration::from_secs(240))
        .await;
    assert_eq!(World::files_in(&w.clean), expected);
    assert_eq!(
        uploads(&w),
        expected.len() as u64,
        "each file uploaded once"
    );
    assert!(w.inbox_files().is_empty());
    agent.stop().await.0.unwrap();
}

/// Without leases (`lease_check = "off"`: what an inbox on a client mount gets), a client that
/// pauses longer than `settle_empty` has its empty file taken, but loses nothing: its bytes land
/// in the kept original, which goes back to the inbox and is scanned as a new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smb_without_leases_a_paused_client_loses_nothing_its_bytes_come_back_as_a_new_version() {
    let Some((w, smbd)) = smb_world("lease_check = \"off\"\nkeep_original = \"30s\"").await else {
        return;
    };
    let agent = w.start_agent();
    let data = bytes(8, 1_000_000);
    let d = data.clone();
    let status = client(move || smbd.put_paced("late.pdf", &[(Duration::from_secs(5), d)])).await;
    assert!(status.success(), "smbclient: {status:?}");
    let o = w.wait_placed(2, LIMIT).await;
    assert_eq!(o[Path::new("late (1).pdf")], Outcome::Clean);
    assert_eq!(std::fs::read(w.clean.join("late (1).pdf")).unwrap(), data);
    assert!(std::fs::read(w.clean.join("late.pdf")).unwrap().is_empty());
    agent.stop().await.0.unwrap();
}

/// A world whose inbox is exported by NFS-Ganesha.
async fn nfs_world(watch_extra: &str, ganesha: &GaneshaOptions) -> Option<(World, Ganesha)> {
    let mut w = World::quick().await;
    w.settle = "1s";
    w.watch_extra = watch_extra.to_string();
    match Ganesha::start_with(&w.inbox, ganesha) {
        Ok(g) => Some((w, g)),
        Err(skip) => {
            eprintln!("{skip}");
            None
        }
    }
}

/// Issue reproduction 4: an NFS client creates the file and writes it seconds later. It was
/// released as 0 bytes. With NFSv4 Ganesha holds its descriptor through the pause (the lease
/// sees it); with NFSv3 Ganesha (closing descriptors promptly, as the README advises) closes it
/// during the pause, and the empty-file rule (`settle_empty` longer than the pause) holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_a_file_created_then_written_seconds_later_is_released_whole() {
    let opts = GaneshaOptions {
        extra_config: MDCACHE_PROMPT_CLOSE.to_string(),
    };
    let Some((mut w, ganesha)) = nfs_world("", &opts).await else {
        return;
    };
    w.settle_empty = "8s";
    let agent = w.start_agent();
    let ganesha = std::sync::Arc::new(ganesha);
    let mut versions = vec![(NfsVersion::V4, "v4.bin")];
    if ganesha.has_v3() {
        versions.push((NfsVersion::V3, "v3.bin"));
    } else {
        eprintln!("skipped: NFSv3 (Ganesha serves NFSv4 only here)");
    }
    let n = versions.len();
    for (i, (v, name)) in versions.iter().enumerate() {
        let data = bytes(40 + i as u64, 300_000);
        let (g, d, v, name) = (std::sync::Arc::clone(&ganesha), data.clone(), *v, *name);
        let r =
            client(move || g.create_then_write_version(v, name, Duration::from_secs(4), &d)).await;
        if let Err(skip) = r {
            eprintln!("{skip}");
            return;
        }
        let o = w.wait_placed(i + 1, LIMIT).await;
        assert_eq!(o[Path::new(name)], Outcome::Clean);
        assert_eq!(std::fs::read(w.clean.join(name)).unwrap(), data, "{name}");
    }
    assert_eq!(
        uploads(&w),
        n as u64,
        "one upload per file, none of an empty one"
    );
    agent.stop().await.0.unwrap();
}

/// Ganesha 4.3 with its default cache settings never closes the descriptor it wrote a file
/// through, so the lease is refused for ever: such a file is taken once it has been unchanged
/// and held open for `held_open_limit`, its original kept for `keep_original` and, since
/// Ganesha may still write through that descriptor, for as long as it stays open: it is dropped
/// once the server lets go of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_a_server_that_never_closes_its_descriptor_delays_files_only_for_held_open_limit() {
    let extra = "held_open_limit = \"3s\"\nkeep_original = \"2s\"";
    let Some((w, ganesha)) = nfs_world(extra, &GaneshaOptions::default()).await else {
        return;
    };
    let agent = w.start_agent();
    let data = bytes(9, 200_000);
    let local = w.dir.path().join("local.bin");
    std::fs::write(&local, &data).unwrap();
    let g = std::sync::Arc::new(ganesha);
    let g2 = std::sync::Arc::clone(&g);
    let copied = client(move || {
        if g2.has_v3() {
            g2.cp(&local, "held.bin")
        } else {
            g2.create_then_write_version(NfsVersion::V4, "held.bin", Duration::ZERO, &data)
        }
    })
    .await;
    if let Err(skip) = copied {
        eprintln!("{skip}");
        return;
    }
    placed_clean(&w, "held.bin").await;
    assert_eq!(
        std::fs::read(w.clean.join("held.bin")).unwrap(),
        std::fs::read(w.dir.path().join("local.bin")).unwrap()
    );
    assert_eq!(uploads(&w), 1);
    let staging = w.inbox.join(".dropscan/test");
    let kept = || {
        std::fs::read_dir(&staging)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".orig"))
            .count()
    };
    // Past `keep_original` (2 s), the original is still held open by Ganesha: kept, so that
    // nothing written through that descriptor goes into a deleted inode.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(kept(), 1, "kept while the server holds it open");
    // Once the server lets go of it, the kept original goes.
    drop(
        std::sync::Arc::try_unwrap(g)
            .ok()
            .expect("the client is done"),
    );
    let left = wait_for(LIMIT, || (kept() == 0).then_some(())).await;
    assert!(left.is_some(), "the kept original is dropped");
    agent.stop().await.0.unwrap();
}

/// Local writers on the file server that restore old mtimes: `rsync -t` (a dot-temp renamed to its
/// name at the end, throttled so that it takes seconds) and `cp -p`, into the exported folder.
/// Each file lands once, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsync_and_cp_p_with_old_mtimes_into_the_share_land_once_whole() {
    let Some((w, _smbd)) = smb_world("").await else {
        return;
    };
    let Some(rsync) = crate::shares_fixture::find_tool("rsync") else {
        eprintln!("skipped: rsync not installed (Debian package rsync)");
        return;
    };
    let agent = w.start_agent();
    let src = w.dir.path().join("src");
    std::fs::create_dir_all(src.join("tree")).unwrap();
    let big = bytes(21, 3 << 20);
    let small = bytes(22, 10_000);
    let kept = bytes(23, 200_000);
    std::fs::write(src.join("tree/big.bin"), &big).unwrap();
    std::fs::write(src.join("tree/small.txt"), &small).unwrap();
    std::fs::write(src.join("kept.doc"), &kept).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(86_400 * 400);
    for p in ["tree/big.bin", "tree/small.txt", "kept.doc"] {
        std::fs::File::options()
            .write(true)
            .open(src.join(p))
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let (inbox, s) = (w.inbox.clone(), src.clone());
    let (rs, cp) = client(move || {
        let rs = std::process::Command::new(rsync)
            .args(["-rt", "--bwlimit=1000"])
            .arg(s.join("tree"))
            .arg(&inbox)
            .status()
            .unwrap();
        let cp = std::process::Command::new("cp")
            .arg("-p")
            .arg(s.join("kept.doc"))
            .arg(inbox.join("kept.doc"))
            .status()
            .unwrap();
        (rs, cp)
    })
    .await;
    assert!(rs.success() && cp.success(), "rsync {rs:?}, cp {cp:?}");
    w.wait_placed(3, LIMIT).await;
    assert!(std::fs::read(w.clean.join("tree/big.bin")).unwrap() == big);
    assert_eq!(
        std::fs::read(w.clean.join("tree/small.txt")).unwrap(),
        small
    );
    assert_eq!(std::fs::read(w.clean.join("kept.doc")).unwrap(), kept);
    assert_eq!(uploads(&w), 3);
    agent.stop().await.0.unwrap();
}

/// An NFSv3 client holds no open state: Ganesha (closing idle descriptors) lets go of the file
/// while the client pauses, and the lease is granted. With `keep_originals = "always"` the
/// user's inode is kept even so, and what the client writes after a pause longer than
/// `settle_empty` lands in it and comes back as a new version: nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs3_with_keep_originals_always_a_client_pausing_past_settle_loses_nothing() {
    let opts = GaneshaOptions {
        extra_config: MDCACHE_PROMPT_CLOSE.to_string(),
    };
    let extra = "keep_originals = \"always\"\nkeep_original = \"60s\"";
    let Some((w, ganesha)) = nfs_world(extra, &opts).await else {
        return;
    };
    if !ganesha.has_v3() {
        eprintln!("skipped: NFSv3 (Ganesha serves NFSv4 only here)");
        return;
    }
    let agent = w.start_agent();
    let data = bytes(51, 300_000);
    let d = data.clone();
    let r = client(move || {
        ganesha.create_then_write_version(NfsVersion::V3, "late.bin", Duration::from_secs(6), &d)
    })
    .await;
    if let Err(skip) = r {
        eprintln!("{skip}");
        return;
    }
    let o = w.wait_placed(2, LIMIT).await;
    assert_eq!(o[Path::new("late (1).bin")], Outcome::Clean, "{o:?}");
    assert_eq!(std::fs::read(w.clean.join("late (1).bin")).unwrap(), data);
    assert!(std::fs::read(w.clean.join("late.bin")).unwrap().is_empty());
    agent.stop().await.0.unwrap();
}
