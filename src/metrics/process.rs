//! The standard process series (`process_start_time_seconds`, `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`), read from
//! `/proc/self` at scrape time, unprefixed as every Prometheus client library names them (the
//! "agent restarting" alert and the dashboards expect those names). Elsewhere than Linux, or
//! when `/proc` cannot be read, the series are left out: never a made-up zero.

/// Clock ticks per second of `/proc/self/stat` times (`USER_HZ`: 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;
/// Bytes per page of `/proc/self/stat`'s rss (4 KiB on x86-64 and most arm64 kernels; the
/// exact figure comes from `/proc/self/status` when it is readable).
const PAGE_SIZE: u64 = 4096;

/// One reading of the process.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Process {
    start_time_seconds: Option<f64>,
    cpu_seconds: Option<f64>,
    resident_bytes: Option<u64>,
    open_fds: Option<usize>,
    max_fds: Option<u64>,
}

impl Process {
    /// Reads `/proc/self`; what cannot be read stays `None`.
    pub(super) fn read() -> Process {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().and_then(stat_fields);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s));
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| status_kib(&s, "VmRSS:"));
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| soft_limit(&s, "Max open files"));
        #[allow(clippy::cast_precision_loss)]
        Process {
            start_time_seconds: fields
                .as_ref()
                .zip(boot)
                .map(|(f, b)| b as f64 + f.start_ticks as f64 / USER_HZ),
            cpu_seconds: fields
                .as_ref()
                .map(|f| (f.utime + f.stime) as f64 / USER_HZ),
            resident_bytes: rss_kib
                .map(|k| k * 1024)
                .or_else(|| fields.as_ref().map(|f| f.rss_pages * PAGE_SIZE)),
            open_fds,
            max_fds,
        }
    }

    /// The series in the text format 0.0.4.
    pub(super) fn encode(&self, out: &mut String) {
        let mut series = |name: &str, kind: &str, help: &str, value: Option<String>| {
            if let Some(v) = value {
                out.push_str(&format!(
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
                ));
            }
        };
        series(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds.map(|v| format!("{v:.2}")),
        );
        series(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds.map(|v| format!("{v:.2}")),
        );
        series(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_bytes.map(|v| v.to_string()),
        );
        series(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds.map(|v| v.to_string()),
        );
        series(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            self.max_fds.map(|v| v.to_string()),
        );
    }
}

/// The fields of `/proc/self/stat` we use.
#[derive(Debug, PartialEq)]
struct StatFields {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    rss_pages: u64,
}

/// Parses `/proc/self/stat`. The command name (field 2) is in parentheses and may hold spaces
/// and parentheses itself, so the fields are counted after its *last* `)`.
fn stat_fields(stat: &str) -> Option<StatFields> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts with field 3 (state): field n is at index n - 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(StatFields {
        utime: at(14)?,
        stime: at(15)?,
        start_ticks: at(22)?,
        rss_pages: at(24)?,
    })
}

/// `btime` of `/proc/stat`: boot time, Unix seconds.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// A `kB` line of `/proc/self/status` (`VmRSS:    1234 kB`).
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        l.strip_prefix(key)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// The soft limit of a `/proc/self/limits` row (`Max open files  1024  524288  files`).
fn soft_limit(limits: &str, row: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix(row)?.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let stat = "4242 (drop (scan) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    150 50 0 0 20 0 9 0 123456 987654 321 18446744073709551615";
        assert_eq!(
            stat_fields(stat),
            Some(StatFields {
                utime: 150,
                stime: 50,
                start_ticks: 123_456,
                rss_pages: 321,
            })
        );
        assert_eq!(stat_fields("garbage"), None);
    }

    #[test]
    fn proc_tables_are_read() {
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
        assert_eq!(
            status_kib("Name:\tx\nVmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2048)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(soft_limit(limits, "Max open files"), Some(1024));
    }

    #[test]
    fn this_process_reads_as_running() {
        let p = Process::read();
        let mut out = String::new();
        p.encode(&mut out);
        for name in [
            "process_start_time_seconds ",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
        ] {
            assert!(out.lines().any(|l| l.starts_with(name)), "{name} in\n{out}");
        }
        assert!(p.start_time_seconds.unwrap_or(0.0) > 1.6e9, "{p:?}");
    }
}
