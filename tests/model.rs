//! Model-based test of the whole pipeline: random sequences of what users and copy tools do in an
//! inbox (whole drops, slow appends, `.part` files renamed when done, folders moved in with
//! files, the same names again), checked against the model "every dropped file arrives in clean
//! exactly once, with its final content, never half-written".

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use proptest::prelude::*;

use crate::util::{World, bytes};

#[derive(Debug, Clone)]
enum Op {
    /// A complete file appears at once (written under a temp name, renamed).
    Drop { name: u8, len: usize },
    /// A file is written in place in chunks, with pauses shorter than `settle`.
    SlowWrite { name: u8, chunks: u8, len: usize },
    /// A `name.part` is written, then renamed to `name` (browsers, SFTP clients).
    PartThenRename { name: u8, len: usize },
    /// A folder with files is moved into the inbox at once.
    MoveInFolder { files: u8, len: usize },
    /// Nothing happens for a while.
    Pause { ms: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 0usize..20_000).prop_map(|(name, len)| Op::Drop { name, len }),
        (0u8..6, 2u8..5, 1usize..4000).prop_map(|(name, chunks, len)| Op::SlowWrite {
            name,
            chunks,
            len
        }),
        (0u8..6, 1usize..20_000).prop_map(|(name, len)| Op::PartThenRename { name, len }),
        (1u8..4, 0usize..5000).prop_map(|(files, len)| Op::MoveInFolder { files, len }),
        (0u16..300).prop_map(|ms| Op::Pause { ms }),
    ]
}

/// Runs the ops; returns the contents that must end up in clean.
async fn play(w: &World, ops: &[Op]) -> Vec<Vec<u8>> {
    let mut expected = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let seed = 10_000 + step as u64 * 97;
        match op {
            Op::Drop { name, len } => {
                let data = bytes(seed, *len);
                // Unique names: dropping onto a name not yet taken would be the user replacing
                // their own file, which the model does not track.
                w.drop_file(&format!("drop-{name}-{step}.bin"), &data);
                expected.push(data);
            }
            Op::SlowWrite { name, chunks, len } => {
                // A fresh name per write: writing into a file the agent already claimed would
                // be a user writing to a file after it was complete.
                let path = w.inbox.join(format!("slow-{name}-{step}.log"));
                let mut f = std::fs::File::create(&path).unwrap();
                let mut all = Vec::new();
                for c in 0..*chunks {
                    let chunk = bytes(seed + u64::from(c), *len);
                    f.write_all(&chunk).unwrap();
                    all.extend_from_slice(&chunk);
                    tokio::time::sleep(Duration::from_millis(80)).await;
                }
                expected.push(all);
            }
            Op::PartThenRename { name, len } => {
                let data = bytes(seed, *len);
                let part = w.inbox.join(format!("dl-{name}-{step}.zip.part"));
                std::fs::write(&part, &data).unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                #[allow(clippy::disallowed_methods)]
                std::fs::rename(&part, w.inbox.join(format!("dl-{name}-{step}.zip"))).unwrap();
                expected.push(data);
            }
            Op::MoveInFolder { files, len } => {
                let src = w.dir.path().join(format!("outside-{step}"));
                std::fs::create_dir_all(src.join("deeper")).unwrap();
                for i in 0..*files {
                    let data = bytes(seed + u64::from(i), *len + usize::from(i));
                    let sub = if i % 2 == 0 { "" } else { "deeper/" };
                    std::fs::write(src.join(format!("{sub}f{i}.dat")), &data).unwrap();
                    expected.push(data);
                }
                #[allow(clippy::disallowed_methods)]
                std::fs::rename(&src, w.inbox.join(format!("moved-{step}"))).unwrap();
            }
            Op::Pause { ms } => tokio::time::sleep(Duration::from_millis(u64::from(*ms))).await,
        }
    }
    expected
}

fn multiset(v: impl IntoIterator<Item = Vec<u8>>) -> BTreeMap<Vec<u8>, usize> {
    let mut m = BTreeMap::new();
    for x in v {
        *m.entry(x).or_insert(0) += 1;
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 4,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_drop_arrives_once_whole(ops in proptest::collection::vec(op(), 1..14)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut w = World::quick().await;
            // Writes pause 80 ms at most; a wide settle keeps the margin on a loaded machine.
            w.settle = "1s";
            let agent = w.start_agent();
            let expected = play(&w, &ops).await;
            let found = crate::util::wait_for(Duration::from_secs(60), || {
                let clean = World::files_in(&w.clean);
                (clean.len() >= expected.len()).then_some(clean)
            })
            .await
            .unwrap_or_else(|| World::files_in(&w.clean));
            // Let anything extra (a duplicate or a half-written copy) show up before judging: the
            // next walk of the inbox offers whatever is left, and every record the journal
            // holds is finished.
            w.wait_idle(w.walks()).await;
            let found = if World::files_in(&w.clean).len() > found.len() {
                World::files_in(&w.clean)
            } else {
                found
            };
            assert!(World::files_in(&w.failed).is_empty(), "failed: {:?}", World::files_in(&w.failed).keys());
            assert_eq!(
                multiset(found.into_values()),
                multiset(expected),
                "clean must hold every dropped file's final content exactly once"
            );
            assert!(w.inbox_files().is_empty(), "left in the inbox: {:?}", w.inbox_files().keys());
            agent.stop().await.0.unwrap();
        });
    }
}
