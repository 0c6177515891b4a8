//! Real file servers on loopback, so that tests can write into an inbox the way real clients do:
//! Samba's `smbd` (clients: `smbclient`, and a scanner-style writer on the Python package
//! `smbprotocol`) and NFS-Ganesha with FSAL VFS (clients: libnfs's `nfs-cp`, and a
//! create-pause-write writer on the libnfs shared library through Python's ctypes).
//!
//! Each server gets its own temp folder for everything it writes (config, pid, locks, state,
//! logs), listens on a free port of 127.0.0.1 only, runs in its own process group, and is stopped
//! by PID on drop (SIGTERM, then SIGKILL after a bounded wait). Every wait is bounded. When a tool
//! is missing, `start` returns `Err(reason)` with a printable "skipped: ..." reason, which the
//! self-tests below print with `eprintln!` (never a silent pass).
//!
//! NFS-Ganesha 4.3 as Debian builds it must register NFSv3 and MOUNT with rpcbind or it exits
//! ("Cannot register NFS V3 on TCP"). Rather than run the host's rpcbind, the fixture answers the
//! registrations itself on a Unix socket in its temp folder and starts Ganesha in a private mount
//! namespace (`unshare --mount`) where that folder is bind-mounted over `/run`, so Ganesha's
//! libntirpc finds `/run/rpcbind.sock`. That also hides the D-Bus system socket, so Ganesha runs
//! without D-Bus. Where a mount namespace cannot be made (no CAP_SYS_ADMIN), Ganesha serves NFSv4
//! only (v4 registration is optional) and [`Ganesha::has_v3`] is false.
//!
//! The Python helpers live in `tests/shares/`. `smbprotocol` is taken from the venv `.ci/run`
//! makes at `target/share-venv` (or `$DROPSCAN_SHARE_VENV`).

#![allow(clippy::unwrap_used, dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one client command may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// `name` on PATH or in the sbin folders (which a non-root PATH often lacks).
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn require(name: &str, package: &str) -> Result<PathBuf, String> {
    find_tool(name)
        .ok_or_else(|| format!("skipped: {name} not installed (Debian package {package})"))
}

/// A port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The folder with the Python helpers.
pub(crate) fn helpers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/shares")
}

/// The venv with `smbprotocol`: `$DROPSCAN_SHARE_VENV`, else `target/share-venv` under the
/// cargo target folder.
pub(crate) fn share_venv() -> PathBuf {
    if let Some(v) = std::env::var_os("DROPSCAN_SHARE_VENV") {
        return PathBuf::from(v);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("share-venv")
}

/// Waits (bounded) until 127.0.0.1:`port` accepts, failing early if `child` exits.
fn wait_listening(child: &mut Child, port: u16, what: &str, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .is_ok()
        {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{what} exited ({status}) before listening on port {port}; log {}:\n{}",
                log.display(),
                tail(log)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what} not listening on port {port} after {START_TIMEOUT:?}; log {}:\n{}",
                log.display(),
                tail(log)
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The last lines of a log, for error messages.
fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Waits (bounded) for `child`; kills it when the time is up.
pub(crate) fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            return child.wait().unwrap();
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a client command (bounded) and returns its status and combined output.
fn run(cmd: &mut Command) -> (ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).ok();
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).ok();
        s
    });
    let status = wait_bounded(&mut child, CLIENT_TIMEOUT);
    let text = t_out.join().unwrap() + &t_err.join().unwrap();
    (status, text)
}

/// Runs a client command that must succeed.
fn run_ok(cmd: &mut Command) -> String {
    let (status, text) = run(cmd);
    assert!(status.success(), "{cmd:?} failed ({status}):\n{text}");
    text
}

/// SIGTERM to `pid`, a bounded wait, then SIGKILL; then SIGKILL to whatever is left of its
/// process group (the server was started as a group leader, so the group is its own).
fn stop(child: &mut Child) {
    let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) else {
        return;
    };
    if child.try_wait().ok().flatten().is_none() {
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait().ok().flatten().is_none() {
            child.kill().ok();
            child.wait().ok();
        }
    }
    rustix::process::kill_process_group(pid, rustix::process::Signal::KILL).ok();
}

/// How many open file descriptors of the processes in process group `pgid` refer to `path`
/// (from /proc; the servers are started as their own group leaders).
pub(crate) fn group_fds_on(pgid: u32, path: &Path) -> usize {
    let Ok(procs) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for entry in procs.flatten() {
        let proc_dir = entry.path();
        let Ok(stat) = fs::read_to_string(proc_dir.join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may hold blanks, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if rest.split_whitespace().nth(2) != Some(&pgid.to_string()) {
            continue;
        }
        for fd in fs::read_dir(proc_dir.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if fs::read_link(fd.path()).is_ok_and(|t| t == path) {
                n += 1;
            }
        }
    }
    n
}

/// Quotes a path or name for an smbclient command line (which splits on blanks and `;`).
fn smb_quote(s: &str) -> String {
    assert!(
        !s.contains('"') && !s.contains(';'),
        "smbclient commands cannot carry {s:?}"
    );
    format!("\"{s}\"")
}

// ---------------------------------------------------------------------------------------------
// Samba
// ---------------------------------------------------------------------------------------------

/// A private `smbd` on 127.0.0.1 with one guest-writable share `drop`.
pub(crate) struct Smbd {
    dir: tempfile::TempDir,
    share: PathBuf,
    port: u16,
    conf: PathBuf,
    smbclient: PathBuf,
    child: Child,
}

impl Smbd {
    /// Starts smbd sharing `share_path` as `//127.0.0.1/drop` on a free port. `Err` is a
    /// printable skip reason (tool missing) or a start failure with the log's tail.
    pub(crate) fn start(share_path: &Path) -> Result<Smbd, String> {
        Smbd::start_with(share_path, "")
    }

    /// [`Smbd::start`] with `share_conf` (lines such as `create mask = 0000`) added to the
    /// share's section.
    pub(crate) fn start_with(share_path: &Path, share_conf: &str) -> Result<Smbd, String> {
        let smbd = require("smbd", "samba")?;
        let smbclient = require("smbclient", "smbclient")?;
        let dir = tempfile::Builder::new()
            .prefix("dropscan-smbd-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        for sub in ["pid", "lock", "state", "cache", "private", "ncalrpc", "log"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        let share = share_path
            .canonicalize()
            .map_err(|e| format!("share path {} unusable: {e}", share_path.display()))?;
        let mut last_err = String::new();
        // A free port can be taken between the probe and smbd's bind: a few tries.
        for _ in 0..3 {
            let port = free_port();
            let conf = root.join("smb.conf");
            let r = root.display();
            fs::write(
                &conf,
                format!(
                    r#"[global]
    server role = standalone server
    netbios name = DROPSCANTEST
    workgroup = WORKGROUP
    interfaces = lo
    bind interfaces only = yes
    smb ports = {port}
    disable netbios = yes
    pid directory = {r}/pid
    lock directory = {r}/lock
    state directory = {r}/state
    cache directory = {r}/cache
    private dir = {r}/private
    binddns dir = {r}/private/bind-dns
    ncalrpc dir = {r}/ncalrpc
    passdb backend = tdbsam:{r}/private/passdb.tdb
    log file = {r}/log/log.%m
    max log size = 0
    usershare path =
    registry shares = no
    map to guest = Bad User
    guest account = nobody
    load printers = no
    printing = bsd
    printcap name = /dev/null
    disable spoolss = yes
[drop]
    path = {share}
    read only = no
    guest ok = yes
    guest only = yes
    force user = root
    force group = root
{share_conf}
"#,
                    share = share.display()
                ),
            )
            .unwrap();
            let log = root.join("log/smbd.stdout");
            let out = fs::File::create(&log).unwrap();
            let mut child = Command::new(&smbd)
                .args([
                    "-F",
                    "--no-process-group",
                    "--debug-stdout",
                    "-d",
                    "1",
                    "-s",
                ])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .process_group(0)
                .spawn()
                .map_err(|e| format!("cannot start smbd: {e}"))?;
            match wait_listening(&mut child, port, "smbd", &log) {
                Ok(()) => {
                    return Ok(Smbd {
                        dir,
                        share,
                        port,
                        conf,
                        smbclient,
                        child,
                    });
                }
                Err(e) => {
                    stop(&mut child);
                    last_err = e;
                }
            }
        }
        Err(last_err)
    }

    /// `smb://127.0.0.1:PORT/drop`.
    pub(crate) fn smb_url(&self) -> String {
        format!("smb://127.0.0.1:{}/drop", self.port)
    }

    /// The TCP port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// smbd's PID (the parent; per-client smbd children are its children).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The shared folder (canonical).
    pub(crate) fn share_path(&self) -> &Path {
        &self.share
    }

    /// How many descriptors smbd (parent and per-client children) holds open on `path`.
    pub(crate) fn open_fds_on(&self, path: &Path) -> usize {
        group_fds_on(self.child.id(), path)
    }

    /// smbd's log file (stdout/stderr).
    pub(crate) fn log(&self) -> PathBuf {
        self.dir.path().join("log/smbd.stdout")
    }

    /// An `smbclient` command for the share, as guest, with the private config (so the client
    /// writes its own state into the fixture's folder too). Add `-c` and the commands.
    pub(crate) fn smbclient(&self) -> Command {
        let mut cmd = Command::new(&self.smbclient);
        cmd.arg("-N")
            .arg("//127.0.0.1/drop")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-s")
            .arg(&self.conf);
        cmd
    }

    /// Runs `smbclient -c COMMANDS`; panics on failure; returns the output.
    pub(crate) fn client(&self, commands: &str) -> String {
        run_ok(self.smbclient().arg("-c").arg(commands))
    }

    /// `mkdir` commands for the parent folders of `remote_name` missing from the share.
    fn mkdirs_for(&self, remote_name: &str) -> String {
        let mut cmds = String::new();
        let parts: Vec<&str> = remote_name.split('/').collect();
        for i in 1..parts.len() {
            let rel = parts[..i].join("/");
            if !self.share.join(&rel).is_dir() {
                cmds += &format!("mkdir {}; ", smb_quote(&rel.replace('/', "\\")));
            }
        }
        cmds
    }

    /// `smbclient put LOCAL REMOTE_NAME`; missing parent folders of `remote_name` (separated by
    /// `/`) are made over SMB first.
    pub(crate) fn put(&self, local: &Path, remote_name: &str) {
        let cmds = format!(
            "{}put {} {}",
            self.mkdirs_for(remote_name),
            smb_quote(&local.display().to_string()),
            smb_quote(&remote_name.replace('/', "\\"))
        );
        self.client(&cmds);
    }

    /// `smbclient put /dev/stdin REMOTE_NAME` fed through a pipe: for each chunk, sleeps the
    /// pause and then writes the bytes; then closes the pipe and waits (bounded) for the exit.
    /// smbclient creates the remote file as soon as it starts, before reading its input.
    pub(crate) fn put_paced(
        &self,
        remote_name: &str,
        chunks: &[(Duration, Vec<u8>)],
    ) -> ExitStatus {
        let mkdirs = self.mkdirs_for(remote_name);
        if !mkdirs.is_empty() {
            self.client(&mkdirs);
        }
        let mut child = self
            .smbclient()
            .arg("-c")
            .arg(format!(
                "put /dev/stdin {}",
                smb_quote(&remote_name.replace('/', "\\"))
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        for (pause, bytes) in chunks {
            thread::sleep(*pause);
            if stdin.write_all(bytes).is_err() {
                break;
            }
        }
        drop(stdin);
        wait_bounded(&mut child, CLIENT_TIMEOUT)
    }

    /// `smbclient` with `prompt off; recurse on; lcd LOCAL_DIR; mput *`: the whole tree into the
    /// share's top folder.
    pub(crate) fn mput_dir(&self, local_dir: &Path) {
        self.client(&format!(
            "prompt off; recurse on; lcd {}; mput *",
            smb_quote(&local_dir.display().to_string())
        ));
    }

    /// `smbclient rename FROM TO` (names relative to the share, `/`-separated).
    pub(crate) fn rename(&self, from: &str, to: &str) {
        self.client(&format!(
            "rename {} {}",
            smb_quote(&from.replace('/', "\\")),
            smb_quote(&to.replace('/', "\\"))
        ));
    }

    /// `smbclient mkdir NAME`.
    pub(crate) fn mkdir(&self, name: &str) {
        self.client(&format!("mkdir {}", smb_quote(&name.replace('/', "\\"))));
    }

    /// `smbclient del NAME`.
    pub(crate) fn del(&self, name: &str) {
        self.client(&format!("del {}", smb_quote(&name.replace('/', "\\"))));
    }

    /// Starts the scanner-style writer (`tests/shares/smb_slow_writer.py` on `smbprotocol`):
    /// one SMB2 open of `name` held throughout; `count` times: write `chunk` bytes, FLUSH, sleep
    /// `pause` (not after the last); then close. Chunk i is the byte `b'A' + i % 26` repeated
    /// (see [`slow_writer_content`]). Its stdout has one timestamped line per step. `Err` is a
    /// skip reason when the venv with `smbprotocol` is missing.
    pub(crate) fn spawn_slow_writer(
        &self,
        name: &str,
        chunk: usize,
        count: usize,
        pause: Duration,
    ) -> Result<Child, String> {
        let python = share_venv().join("bin/python");
        let probe = Command::new(&python)
            .args(["-c", "import smbprotocol"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(probe, Ok(s) if s.success()) {
            return Err(format!(
                "skipped: no Python venv with smbprotocol at {} (.ci/run makes it: python3 -m venv \
                 target/share-venv && target/share-venv/bin/pip install smbprotocol)",
                share_venv().display()
            ));
        }
        Ok(Command::new(python)
            .arg(helpers_dir().join("smb_slow_writer.py"))
            .args(["127.0.0.1", &self.port.to_string(), "drop", name])
            .args([
                chunk.to_string(),
                count.to_string(),
                pause.as_secs_f64().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap())
    }

    /// [`Smbd::spawn_slow_writer`], waited for (bounded by the expected duration plus a minute);
    /// returns the exit status and the writer's output.
    pub(crate) fn slow_writer(
        &self,
        name: &str,
        chunk: usize,
        count: usize,
        pause: Duration,
    ) -> Result<(ExitStatus, String), String> {
        let mut child = self.spawn_slow_writer(name, chunk, count, pause)?;
        let limit = pause * count as u32 + CLIENT_TIMEOUT;
        Ok(finish(&mut child, limit))
    }
}

impl Drop for Smbd {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// What [`Smbd::slow_writer`] writes.
pub(crate) fn slow_writer_content(chunk: usize, count: usize) -> Vec<u8> {
    (0..count)
        .flat_map(|i| std::iter::repeat_n(b'A' + (i % 26) as u8, chunk))
        .collect()
}

/// Waits (bounded) for a spawned helper whose stdout and stderr are piped; returns its status
/// and combined output.
pub(crate) fn finish(child: &mut Child, limit: Duration) -> (ExitStatus, String) {
    let out = child.stdout.take();
    let err = child.stderr.take();
    let reader = |s: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut s) = s {
                s.read_to_string(&mut text).ok();
            }
            text
        })
    };
    let t_out = reader(out.map(|s| Box::new(s) as Box<dyn Read + Send>));
    let t_err = reader(err.map(|s| Box::new(s) as Box<dyn Read + Send>));
    let status = wait_bounded(child, limit);
    (status, t_out.join().unwrap() + &t_err.join().unwrap())
}

// ---------------------------------------------------------------------------------------------
// NFS-Ganesha
// ---------------------------------------------------------------------------------------------

/// An NFS protocol version for the libnfs clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NfsVersion {
    V3,
    V4,
}

/// An `MDCACHE` block that makes Ganesha 4.3 close the descriptors it keeps for written files
/// within about a second (the LRU reaper runs every second and reaps down to 0 open fds). With
/// the defaults, Ganesha keeps a write descriptor open on every file an NFSv3 or NFSv4 client
/// wrote (also after an NFSv4 CLOSE) until it has 50% of its fd limit open, i.e. in practice
/// forever. Caveat: it also closes an NFSv3 file's descriptor while the client pauses between
/// CREATE and WRITE. (`FD_HWMark_Percent = 0` crashes Ganesha 4.3: divide error.)
pub(crate) const MDCACHE_PROMPT_CLOSE: &str = "MDCACHE {
    FD_LWMark_Percent = 0;
    LRU_Run_Interval = 1;
}";

/// Extra lines for Ganesha's config (e.g. [`MDCACHE_PROMPT_CLOSE`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct GaneshaOptions {
    pub extra_config: String,
}

/// A private NFS-Ganesha (FSAL VFS) on 127.0.0.1 exporting one folder as `/drop` (NFSv3 and
/// NFSv4; v3 mounts use the pseudo path too).
pub(crate) struct Ganesha {
    dir: tempfile::TempDir,
    export: PathBuf,
    nfs_port: u16,
    mnt_port: u16,
    v3: bool,
    child: Child,
    rpcbind: Option<FakeRpcbind>,
}

impl Ganesha {
    /// Starts Ganesha exporting `export_path`. `Err` is a printable skip reason (tool missing)
    /// or a start failure with the log's tail.
    pub(crate) fn start(export_path: &Path) -> Result<Ganesha, String> {
        Ganesha::start_with(export_path, &GaneshaOptions::default())
    }

    /// [`Ganesha::start`] with extra config.
    pub(crate) fn start_with(export_path: &Path, opts: &GaneshaOptions) -> Result<Ganesha, String> {
        let ganesha = require("ganesha.nfsd", "nfs-ganesha")?;
        let plugins = [
            "/usr/lib/x86_64-linux-gnu/ganesha",
            "/usr/lib64/ganesha",
            "/usr/lib/ganesha",
        ]
        .into_iter()
        .map(PathBuf::from)
        .chain(
            // Other multiarch triplets.
            fs::read_dir("/usr/lib")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("ganesha")),
        )
        .find(|d| d.join("libfsalvfs.so").is_file())
        .ok_or("skipped: Ganesha's FSAL VFS not installed (Debian package nfs-ganesha-vfs)")?;
        let export = export_path
            .canonicalize()
            .map_err(|e| format!("export path {} unusable: {e}", export_path.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("dropscan-ganesha-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        for sub in ["recovery", "run", "krb5"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        // NFSv3 needs the rpcbind stand-in and a mount namespace to show it at /run.
        let unshare = find_tool("unshare").filter(|u| {
            Command::new(u)
                .args(["--mount", "true"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        let rpcbind = match &unshare {
            Some(_) => Some(FakeRpcbind::start(&root.join("run/rpcbind.sock"))?),
            None => None,
        };
        let v3 = rpcbind.is_some();
        let mut last_err = String::new();
        for _ in 0..3 {
            let [nfs_port, mnt_port, nlm_port, rquota_port] =
                [free_port(), free_port(), free_port(), free_port()];
            let conf = root.join("ganesha.conf");
            let r = root.display();
            let protocols = if v3 { "3, 4" } else { "4" };
            fs::write(
                &conf,
                format!(
                    r#"NFS_Core_Param {{
    Bind_Addr = 127.0.0.1;
    NFS_Port = {nfs_port};
    MNT_Port = {mnt_port};
    NLM_Port = {nlm_port};
    Rquota_Port = {rquota_port};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Protocols = {protocols};
    mount_path_pseudo = true;
    Plugins_Dir = "{plugins}";
    Dbus_Name_Prefix = "dropscantest{nfs_port}";
}}
NFS_KRB5 {{
    Active_krb5 = false;
    CCacheDir = "{r}/krb5";
}}
NFSv4 {{
    RecoveryBackend = fs;
    RecoveryRoot = "{r}/recovery";
    Graceless = true;
    Lease_Lifetime = 10;
}}
EXPORT {{
    Export_Id = 1;
    Path = "{export}";
    Pseudo = /drop;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = {protocols};
    Transports = TCP;
    FSAL {{
        Name = VFS;
    }}
}}
LOG {{
    Default_Log_Level = EVENT;
}}
{extra}
"#,
                    plugins = plugins.display(),
                    export = export.display(),
                    extra = opts.extra_config,
                ),
            )
            .unwrap();
            let log = root.join("ganesha.log");
            let stdout = root.join("ganesha.stdout");
            let out = fs::File::create(&stdout).unwrap();
            let ganesha_args = format!(
                "-F -L {log} -f {conf} -p {r}/ganesha.pid -N NIV_EVENT",
                log = log.display(),
                conf = conf.display()
            );
            let mut cmd = match &unshare {
                // unshare execs sh, sh execs ganesha.nfsd: the child's PID is Ganesha's.
                Some(unshare) => {
                    let mut c = Command::new(unshare);
                    c.args(["--mount", "--propagation", "private", "sh", "-c"])
                        .arg(format!(
                            "mount --bind {r}/run /run && exec {} {ganesha_args}",
                            ganesha.display()
                        ));
                    c
                }
                None => {
                    let mut c = Command::new(&ganesha);
                    c.args(ganesha_args.split(' '));
                    c
                }
            };
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .process_group(0)
                .spawn()
                .map_err(|e| format!("cannot start ganesha.nfsd: {e}"))?;
            let ready = wait_listening(&mut child, nfs_port, "ganesha.nfsd", &log).and_then(|()| {
                if v3 {
                    wait_listening(&mut child, mnt_port, "ganesha.nfsd (MOUNT)", &log)
                } else {
                    Ok(())
                }
            });
            match ready {
                Ok(()) => {
                    return Ok(Ganesha {
                        dir,
                        export,
                        nfs_port,
                        mnt_port,
                        v3,
                        child,
                        rpcbind,
                    });
                }
                Err(e) => {
                    stop(&mut child);
                    last_err = e;
                }
            }
        }
        Err(last_err)
    }

    /// Whether NFSv3 is served (needs a mount namespace; see the module docs).
    pub(crate) fn has_v3(&self) -> bool {
        self.v3
    }

    /// Ganesha's PID.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exported folder (canonical).
    pub(crate) fn export_path(&self) -> &Path {
        &self.export
    }

    /// How many descriptors Ganesha holds open on `path`.
    pub(crate) fn open_fds_on(&self, path: &Path) -> usize {
        group_fds_on(self.child.id(), path)
    }

    /// Ganesha's log file.
    pub(crate) fn log(&self) -> PathBuf {
        self.dir.path().join("ganesha.log")
    }

    /// The export's libnfs URL for `version` (a folder URL: append `/NAME` for a file).
    pub(crate) fn url(&self, version: NfsVersion) -> String {
        self.url_for(version, "")
    }

    fn url_for(&self, version: NfsVersion, name: &str) -> String {
        let name = if name.is_empty() {
            String::new()
        } else {
            format!("/{}", name.trim_start_matches('/'))
        };
        match version {
            NfsVersion::V3 => format!(
                "nfs://127.0.0.1/drop{name}?nfsport={}&mountport={}&version=3",
                self.nfs_port, self.mnt_port
            ),
            NfsVersion::V4 => format!(
                "nfs://127.0.0.1/drop{name}?nfsport={}&version=4",
                self.nfs_port
            ),
        }
    }

    fn check_version(&self, version: NfsVersion) -> Result<(), String> {
        if version == NfsVersion::V3 && !self.v3 {
            return Err(
                "skipped: NFSv3 needs a private mount namespace for the rpcbind stand-in \
                 (unshare --mount failed: no CAP_SYS_ADMIN?)"
                    .into(),
            );
        }
        Ok(())
    }

    /// `nfs-cp LOCAL nfs://.../drop/REMOTE_NAME` over NFSv3 (the parent folder must exist).
    /// libnfs 4.0's `nfs-cp` cannot write over NFSv4 (see `tests/shares/nfs_writer.py`).
    pub(crate) fn cp(&self, local: &Path, remote_name: &str) -> Result<(), String> {
        self.cp_version(NfsVersion::V3, local, remote_name)
    }

    /// [`Ganesha::cp`] with a version. `Err` is a skip reason (tool or protocol missing).
    pub(crate) fn cp_version(
        &self,
        version: NfsVersion,
        local: &Path,
        remote_name: &str,
    ) -> Result<(), String> {
        self.check_version(version)?;
        let nfs_cp = require("nfs-cp", "libnfs-utils")?;
        run_ok(
            Command::new(nfs_cp)
                .arg(local)
                .arg(self.url_for(version, remote_name)),
        );
        Ok(())
    }

    /// Starts `tests/shares/nfs_writer.py`: mounts, makes missing parent folders, CREATES
    /// `name` empty, sleeps `pause`, writes `data`, closes. Its stdout has one timestamped line
    /// per step. `Err` is a skip reason.
    pub(crate) fn spawn_create_then_write(
        &self,
        version: NfsVersion,
        name: &str,
        pause: Duration,
        data: &[u8],
    ) -> Result<Child, String> {
        self.check_version(version)?;
        let python = require("python3", "python3")?;
        let data_file = tempfile::NamedTempFile::new_in(self.dir.path()).unwrap();
        fs::write(data_file.path(), data).unwrap();
        // The helper reads the file at start; keep it until the fixture goes.
        let (_, data_path) = data_file.keep().unwrap();
        Ok(Command::new(python)
            .arg(helpers_dir().join("nfs_writer.py"))
            .arg(self.url(version))
            .arg(name)
            .arg(pause.as_secs_f64().to_string())
            .arg(data_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap())
    }

    /// [`Ganesha::spawn_create_then_write`] over NFSv3, waited for (bounded); panics when the
    /// client fails.
    pub(crate) fn create_then_write(
        &self,
        name: &str,
        pause: Duration,
        data: &[u8],
    ) -> Result<(), String> {
        self.create_then_write_version(NfsVersion::V3, name, pause, data)
    }

    /// [`Ganesha::create_then_write`] with a version.
    pub(crate) fn create_then_write_version(
        &self,
        version: NfsVersion,
        name: &str,
        pause: Duration,
        data: &[u8],
    ) -> Result<(), String> {
        let mut child = self.spawn_create_then_write(version, name, pause, data)?;
        let (status, text) = finish(&mut child, pause + CLIENT_TIMEOUT);
        assert!(
            status.success(),
            "nfs_writer.py {version:?} {name} failed ({status}):\n{text}"
        );
        Ok(())
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        stop(&mut self.child);
        drop(self.rpcbind.take());
    }
}

/// Answers rpcbind's SET and UNSET (and anything else) with TRUE on a Unix socket, so Ganesha
/// can "register" without the host's rpcbind. Nothing ever looks the registrations up: the
/// clients are given the ports.
struct FakeRpcbind {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeRpcbind {
    fn start(path: &Path) -> Result<FakeRpcbind, String> {
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    thread::spawn(move || serve_rpcbind(conn));
                }
            }
        });
        Ok(FakeRpcbind {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FakeRpcbind {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        UnixStream::connect(&self.path).ok();
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

/// One connection: ONC RPC records (record marking) in, "accepted, success, TRUE" out.
fn serve_rpcbind(mut conn: UnixStream) {
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    loop {
        let mut msg = Vec::new();
        loop {
            let mut mark = [0u8; 4];
            if conn.read_exact(&mut mark).is_err() {
                return;
            }
            let mark = u32::from_be_bytes(mark);
            let mut frag = vec![0u8; (mark & 0x7fff_ffff) as usize];
            if conn.read_exact(&mut frag).is_err() {
                return;
            }
            msg.extend_from_slice(&frag);
            if mark & 0x8000_0000 != 0 {
                break;
            }
        }
        if msg.len() < 4 {
            return;
        }
        // xid, REPLY, MSG_ACCEPTED, verifier AUTH_NONE (flavor, length), SUCCESS, bool TRUE.
        let mut reply = Vec::with_capacity(32);
        reply.extend_from_slice(&msg[..4]);
        for word in [1u32, 0, 0, 0, 0, 1] {
            reply.extend_from_slice(&word.to_be_bytes());
        }
        let mark = 0x8000_0000u32 | reply.len() as u32;
        let mut out = mark.to_be_bytes().to_vec();
        out.extend_from_slice(&reply);
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Self-tests
// ---------------------------------------------------------------------------------------------

/// Starts a server or prints why the test is skipped.
macro_rules! or_skip {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(reason) => {
                eprintln!("{reason}");
                return;
            }
        }
    };
}

/// Bytes that differ everywhere (so a misplaced chunk shows).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

#[test]
fn smbd_put_round_trip_and_subfolders() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    let smbd = or_skip!(Smbd::start(&share));
    let local = tmp.path().join("local.bin");
    let data = pattern(3 << 20, 1);
    fs::write(&local, &data).unwrap();
    smbd.put(&local, "one.bin");
    assert_eq!(fs::read(share.join("one.bin")).unwrap(), data);
    smbd.put(&local, "a/b c/two.bin");
    assert_eq!(fs::read(share.join("a/b c/two.bin")).unwrap(), data);
    smbd.rename("one.bin", "a/renamed.bin");
    assert!(!share.join("one.bin").exists());
    assert_eq!(fs::read(share.join("a/renamed.bin")).unwrap(), data);
    assert!(smbd.smb_url().starts_with("smb://127.0.0.1:"));
}

#[test]
fn smbd_put_paced_writes_the_whole_file() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    let smbd = or_skip!(Smbd::start(&share));
    let first = pattern(1 << 20, 2);
    let second = pattern(100_000, 3);
    let status = smbd.put_paced(
        "sub/paced.bin",
        &[
            (Duration::ZERO, first.clone()),
            (Duration::from_secs(2), second.clone()),
        ],
    );
    assert!(status.success(), "smbclient: {status}");
    assert_eq!(
        fs::read(share.join("sub/paced.bin")).unwrap(),
        [first, second].concat()
    );
}

#[test]
fn smbd_mput_of_a_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    let smbd = or_skip!(Smbd::start(&share));
    let src = tmp.path().join("src");
    let files = [
        ("top.txt", 10),
        ("d1/x.bin", 70_000),
        ("d1/d2/y.bin", 1),
        ("d3/z.txt", 0),
    ];
    for (i, (name, len)) in files.iter().enumerate() {
        let p = src.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, pattern(*len, i as u8)).unwrap();
    }
    smbd.mput_dir(&src);
    for (i, (name, len)) in files.iter().enumerate() {
        assert_eq!(
            fs::read(share.join(name)).unwrap(),
            pattern(*len, i as u8),
            "{name}"
        );
    }
}

#[test]
fn smbd_slow_writer_holds_the_file_open_between_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    let smbd = or_skip!(Smbd::start(&share));
    let mut child =
        or_skip!(smbd.spawn_slow_writer("slow.bin", 1 << 20, 3, Duration::from_secs(1)));
    // Between chunks the file exists, partly written.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::metadata(share.join("slow.bin")).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "nothing written");
        thread::sleep(Duration::from_millis(20));
    }
    let (status, text) = finish(&mut child, Duration::from_secs(60));
    assert!(status.success(), "slow writer failed ({status}):\n{text}");
    assert_eq!(
        fs::read(share.join("slow.bin")).unwrap(),
        slow_writer_content(1 << 20, 3)
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("flushed")).count(),
        3,
        "{text}"
    );
}

#[test]
fn ganesha_cp_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    fs::create_dir(&export).unwrap();
    let nfs = or_skip!(Ganesha::start(&export));
    let local = tmp.path().join("local.bin");
    let data = pattern(3 << 20, 4);
    fs::write(&local, &data).unwrap();
    or_skip!(nfs.cp(&local, "cp3.bin"));
    assert_eq!(fs::read(export.join("cp3.bin")).unwrap(), data);
}

#[test]
fn ganesha_create_then_write_v3_and_v4() {
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export");
    fs::create_dir(&export).unwrap();
    let nfs = or_skip!(Ganesha::start(&export));
    for (version, name) in [
        (NfsVersion::V3, "v3/late.bin"),
        (NfsVersion::V4, "v4/late.bin"),
    ] {
        let data = pattern(1 << 20, 5);
        let mut child =
            or_skip!(nfs.spawn_create_then_write(version, name, Duration::from_secs(1), &data));
        // Created empty first, then written.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !export.join(name).exists() {
            assert!(Instant::now() < deadline, "{version:?}: never created");
            thread::sleep(Duration::from_millis(10));
        }
        let (status, text) = finish(&mut child, Duration::from_secs(60));
        assert!(status.success(), "{version:?} failed ({status}):\n{text}");
        assert!(
            text.contains("created") && text.contains("closed"),
            "{text}"
        );
        assert_eq!(fs::read(export.join(name)).unwrap(), data, "{version:?}");
    }
}

#[test]
fn ganesha_keeps_write_fds_by_default_and_closes_them_with_prompt_close() {
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("local.bin");
    fs::write(&local, pattern(100_000, 6)).unwrap();
    for prompt in [false, true] {
        let export = tmp.path().join(format!("export-{prompt}"));
        fs::create_dir(&export).unwrap();
        let opts = GaneshaOptions {
            extra_config: if prompt {
                MDCACHE_PROMPT_CLOSE.into()
            } else {
                String::new()
            },
        };
        let nfs = or_skip!(Ganesha::start_with(&export, &opts));
        let name = "held.bin";
        if let Err(reason) = nfs.cp(&local, name) {
            // No NFSv3 here: write over NFSv4 instead.
            eprintln!("{reason}: using NFSv4");
            nfs.create_then_write_version(
                NfsVersion::V4,
                name,
                Duration::ZERO,
                &fs::read(&local).unwrap(),
            )
            .unwrap();
        }
        let file = export.canonicalize().unwrap().join(name);
        let deadline = Instant::now() + Duration::from_secs(5);
        while nfs.open_fds_on(&file) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let open = nfs.open_fds_on(&file);
        if prompt {
            assert_eq!(open, 0, "with MDCACHE_PROMPT_CLOSE, closed within 5 s");
        } else {
            assert!(
                open > 0,
                "Ganesha 4.3 defaults keep the write fd (if this fails, a newer Ganesha closes it: fine, update the doc)"
            );
        }
    }
}

#[test]
fn smbd_holds_no_descriptor_after_the_client_closes() {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    fs::create_dir(&share).unwrap();
    let smbd = or_skip!(Smbd::start(&share));
    let local = tmp.path().join("local.bin");
    fs::write(&local, pattern(100_000, 7)).unwrap();
    smbd.put(&local, "done.bin");
    assert_eq!(smbd.open_fds_on(&smbd.share_path().join("done.bin")), 0);
}
